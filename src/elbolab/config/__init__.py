"""Typed, frozen run configuration that round-trips through JSON and YAML.

Every key is checked when a config is built: unknown keys get a "did you mean",
wrong types and impossible values name the dotted key, so a typo never starts the
wrong experiment. Configs are never mutated: ``with_overrides`` returns a new one.

:mod:`.schema` holds the sections and the checking machinery (each model registers its
own ``model.<key>`` section beside its code, :func:`model_section`), :mod:`.yaml_io`
reads config files, :mod:`.presets` the papers' setups.
"""

from ..errors import ConfigError
from .presets import PRESETS, preset
from .schema import (
    BINARIZATION_SUFFIXES,
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_THREADS,
    MAX_WIDTH,
    MODEL_SECTIONS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    PosteriorConfig,
    PriorConfig,
    RunConfig,
    TrainConfig,
    check_sizes,
    commented_yaml,
    config_items,
    field_comments,
    flow_stl_refusal,
    from_dict,
    in_range,
    load_config,
    model_section,
    parse_overrides,
    require,
    save_config,
    split_binarization_suffix,
    to_dict,
)
from .yaml_io import MAX_CONFIG_NODES, parse_value, read_config_mapping

__all__ = [
    "BINARIZATION_SUFFIXES", "MAX_BATCH", "MAX_CONFIG_NODES", "MAX_EPOCHS", "MAX_SAMPLES", "MAX_SEED", "MAX_THREADS",
    "MAX_WIDTH", "MODEL_SECTIONS", "PRESETS", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig",
    "ObjectiveConfig", "PosteriorConfig", "PriorConfig", "RunConfig", "TrainConfig", "check_sizes", "commented_yaml",
    "config_items", "field_comments", "flow_stl_refusal", "from_dict", "in_range", "load_config", "model_section",
    "parse_overrides", "parse_value", "preset", "read_config_mapping", "require", "save_config",
    "split_binarization_suffix", "to_dict",
]
