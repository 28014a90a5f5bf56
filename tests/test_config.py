"""Configs round-trip and reject bad input naming the key."""

from __future__ import annotations

import json

import pytest

from elbolab.config import ConfigError, RunConfig, load_config, preset, save_config


def test_json_and_yaml_round_trip(tmp_path) -> None:
    cfg = RunConfig().with_overrides({"train.lr": 3e-4, "model.hidden": [100, 50], "objective.k": 50})
    for name in ("c.json", "c.yaml"):
        save_config(cfg, tmp_path / name)
        assert load_config(tmp_path / name) == cfg
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.model.hidden == (100, 50)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1e-3", r"train\.lrr: unknown key \(did you mean 'lr'\?\)"),
        ("objective.k=0", r"objective\.k: must be >= 1"),
        ("train.lr=-1", r"train\.lr: must be a finite number > 0"),
        ("model.latent_dim=0", r"model\.latent_dim: must be >= 1"),
        ("train.epochs=ten", r"train\.epochs: expected an integer"),
        ("modle.latent_dim=3", r"modle: unknown section \(did you mean 'model'\?\)"),
        ("data.binarization=sometimes", r"data\.binarization: must be"),
        ("train.device=tpu", r"train\.device"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides([override])


def test_override_parsing_accepts_scientific_notation_and_lists() -> None:
    cfg = RunConfig().with_overrides(["train.lr=1e-3", "model.hidden=[64, 32]", "train.progress=false"])
    assert cfg.train.lr == 1e-3 and cfg.model.hidden == (64, 32) and cfg.train.progress is False


def test_config_file_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 20\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.batch_sise: unknown key \(did you mean 'batch_size'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_configs_are_frozen_and_overrides_return_new_objects() -> None:
    cfg = RunConfig()
    new = cfg.with_overrides({"objective.k": 50})
    assert cfg.objective.k == 5 and new.objective.k == 50
    with pytest.raises(AttributeError):
        cfg.objective.k = 3  # type: ignore[misc]


def test_iwae_paper_preset_matches_the_paper() -> None:
    t = preset("iwae-paper").train
    assert (t.batch_size, t.adam_eps, t.schedule, t.epochs) == (20, 1e-4, "iwae", 3280)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("iwea-paper")


def test_evaluation_chunk_follows_the_device_and_keeps_reproduction_keys() -> None:
    from elbolab.config import EvalConfig
    from elbolab.reproduce.tables import config_key

    e = EvalConfig()
    assert e.chunk_for("cpu") == e.chunk_size == 50
    assert e.chunk_for("cuda:1") == e.chunk_for(__import__("torch").device("cuda")) == e.gpu_chunk_size == 2000
    cfg = RunConfig()
    # a GPU-only evaluation setting does not move cached reproduction rows (like train.device)
    assert config_key(cfg) == config_key(cfg.with_overrides({"eval.gpu_chunk_size": 10}))
    with pytest.raises(ConfigError, match="eval.gpu_chunk_size: must be between 1 and"):
        cfg.with_overrides({"eval.gpu_chunk_size": 0})


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("objective.k", 10**7, "objective.k: must be between 1 and 1,000,000, got 10,000,000"),
    ("train.batch_size", 10**8, "train.batch_size: must be between 1 and 10,000,000"),
    ("train.threads", 100_000, "train.threads: must be between 0 and 4,096, got 100,000"),
    ("train.seed", 10**29, "train.seed: must be between 0 and 9,223,372,036,854,775,807"),
    ("train.seed", 2**63, "train.seed: must be between 0 and 9,223,372,036,854,775,807"),
    ("train.seed", -1, "train.seed: must be between 0"),
    ("eval.seed", 2**64, "eval.seed: must be between 0"),
    ("data.binarization_seed", 2**70, "data.binarization_seed: must be between 0"),
    ("model.prior.data_seed", -5, "model.prior.data_seed: must be between 0"),
    ("model.hidden", [200, 10**7], "model.hidden: sizes must be between 1 and 1,000,000"),
    ("model.latent_dim", 10**7, "model.latent_dim: must be between 1 and 1,000,000"),
    ("model.prior.components", 10**7, "model.prior.components: must be between 1 and 1,000,000"),
    ("train.epochs", 10**9, "train.epochs: must be between 1 and 100,000,000"),
    ("eval.bound_ks", [1, 10**8], "eval.bound_ks: must be k values between 1 and 10,000,000"),
    ("eval.active_unit_threshold", float("inf"), "eval.active_unit_threshold: must be a finite number > 0"),
])
def test_absurd_values_are_refused_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig().with_overrides({key: value})
    assert expected in str(err.value)


def test_the_largest_seed_is_accepted_and_usable():
    cfg = RunConfig().with_overrides({"train.seed": 2**63 - 1, "eval.seed": 2**63 - 1})
    import torch

    torch.Generator().manual_seed(cfg.train.seed + 7)  # the shuffler's seed, as the trainer derives it
    m = RunConfig().with_overrides({"objective.name": "miwae", "objective.m": 1000, "objective.k": 1000})
    assert m.objective.m * m.objective.k == 10**6
    with pytest.raises(ConfigError, match=r"objective\.m x objective\.k: must be between 1 and 1,000,000"):
        m.with_overrides({"objective.k": 1001})


def _alias_bomb(levels: int) -> str:
    """A "billion laughs" config: ten ones, then ``levels`` lists of ten aliases of the one before."""
    parts = ["&a0 [" + ", ".join(["1"] * 10) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "train:\n  lr: [" + ", ".join(parts) + "]\n"


@pytest.mark.parametrize("levels", [3, 5, 7])
def test_nested_yaml_aliases_are_refused_in_one_short_line(tmp_path, levels) -> None:
    """Five levels (10^6 values from ~350 bytes) gave a 3.9 MB error line, seven would take GBs."""
    from elbolab.errors import MAX_MESSAGE

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(levels))
    assert len(path.read_bytes()) < 500
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= MAX_MESSAGE and msg.startswith(f"{path}: ")
    if levels > 3:  # 10 + 100 + ... + 10^(levels + 1) values
        assert "aliases (*name) expand to more than 100,000 values" in msg
    else:  # small enough to load: the value's echo in "expected a number" is elided
        assert msg.startswith(f"{path}: train.lr: expected a number, got [[1, 1, 1")
        assert msg.endswith(", ...]]") and len(msg) < len(str(path)) + 250


def test_yaml_aliases_within_the_bound_still_load(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden: &h [16, 8]\n  two_layer: {hidden1: *h, hidden2: *h}\n")
    cfg = load_config(path)
    assert cfg.model.hidden == cfg.model.two_layer.hidden1 == cfg.model.two_layer.hidden2 == (16, 8)


@pytest.mark.parametrize("text, expected", [
    ("train: &a\n  lr: [*a]\n", "an alias at line 1 refers to a value that contains it"),
    ("train: {lr: " + "[" * 3000 + "]" * 3000 + "}\n", "values nested too deeply to be a config"),
])
def test_self_containing_or_deeply_nested_yaml_is_one_line(tmp_path, text, expected) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: {expected}$"):
        load_config(path)


def test_config_errors_echo_at_most_a_bounded_line() -> None:
    from elbolab.errors import MAX_MESSAGE

    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"train": {"x" * 10**6: 1}})
    assert MAX_MESSAGE - 2 <= len(str(e.value)) <= MAX_MESSAGE and " ... " in str(e.value)
    with pytest.raises(ConfigError, match=r"^train.lr: expected a number, got 'x+\.\.\.x+'$") as e:
        RunConfig().with_overrides(["train.lr=" + "x" * 10**6])
    assert len(str(e.value)) < 200


def test_a_model_in_one_file_brings_its_own_config_section() -> None:
    """What a new file under models/ does (a section and a builder, each by decorator) is all a
    model needs: the section is a config key, checked, shown, round-tripped and built from."""
    import dataclasses

    from torch import nn

    from elbolab.config import MODEL_SECTIONS, commented_yaml, model_section
    from elbolab.models import MODELS, build_model, register_model

    @model_section("toy_model", "sizes of model \"toy\"")
    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        #: units of the toy's only layer
        units: int = 3

        def validate(self, key: str) -> None:
            if self.units < 1:
                raise ConfigError(f"{key}.units: must be >= 1, got {self.units}")

    @register_model("toy")
    def build(cfg, data_dim, train_data):
        return nn.Linear(data_dim, cfg.toy_model.units)

    try:
        cfg = RunConfig().with_overrides({"model.name": "toy", "model.toy_model.units": 7})
        assert cfg.model.toy_model == ToyConfig(7) and RunConfig.from_dict(cfg.to_dict()) == cfg
        assert build_model(cfg.model, 5).out_features == 7
        assert "  # sizes of model \"toy\"\n  toy_model:\n    # units of the toy's only layer\n    units: 7\n" in (
            commented_yaml(cfg))
        with pytest.raises(ConfigError, match=r"^model\.toy_model\.units: must be >= 1, got 0$"):
            cfg.with_overrides({"model.toy_model.units": 0})
        with pytest.raises(ConfigError, match=r"^model\.toy_modle: unknown key \(did you mean 'toy_model'\?\)$"):
            RunConfig.from_dict({"model": {"toy_modle": {}}})
    finally:
        MODEL_SECTIONS.pop("toy_model")
        MODELS.pop("toy")
    assert "toy_model" not in RunConfig().to_dict()["model"]


def test_every_module_in_models_is_imported_so_its_registrations_count() -> None:
    import sys
    from pathlib import Path

    import elbolab.models

    files = [p.stem for p in Path(elbolab.models.__file__).parent.glob("*.py") if p.stem != "__init__"]
    assert files and all(f"elbolab.models.{name}" in sys.modules for name in files)
