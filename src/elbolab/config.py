"""Typed, frozen run configuration that round-trips through JSON and YAML.

Every key is checked when a config is built: unknown keys get a "did you mean",
wrong types and impossible values name the dotted key, so a typo never starts the
wrong experiment. Configs are never mutated: ``with_overrides`` returns a new one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names the key."""


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class DataConfig:
    #: a name from ``elbolab data list``; the default ships inside the package
    name: str = "binarized-mnist-embedded"
    #: "static" (a fixed binary image), "dynamic" (a fresh Bernoulli draw each time an
    #: image is used) or "none" (grey levels as floats in [0, 1])
    binarization: str = "static"
    #: folder holding the standard dataset files; else $ELBOLAB_DATA, else the user cache
    data_dir: str | None = None
    #: seed of the one-off Bernoulli draw that statically binarizes grey-level data
    binarization_seed: int = 0

    def validate(self, key: str) -> None:
        _require(
            self.binarization in ("static", "dynamic", "none"),
            f"{key}.binarization",
            f"must be 'static', 'dynamic' or 'none', got {self.binarization!r}",
        )


@dataclass(frozen=True)
class PriorConfig:
    #: standard | mog | vampprior | vampprior-data
    name: str = "standard"
    #: mixture components or pseudo-inputs
    components: int = 500
    #: learn the mixing weights of a mixture of Gaussians (else uniform)
    learn_weights: bool = False

    def validate(self, key: str) -> None:
        _require(self.components >= 1, f"{key}.components", f"must be >= 1, got {self.components}")


@dataclass(frozen=True)
class ModelConfig:
    #: a name from elbolab.models.MODELS
    name: str = "one-layer"
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    #: bernoulli (binary images)
    likelihood: str = "bernoulli"
    prior: PriorConfig = field(default_factory=PriorConfig)

    def validate(self, key: str) -> None:
        _require(self.latent_dim >= 1, f"{key}.latent_dim", f"must be >= 1, got {self.latent_dim}")
        _require(
            all(h >= 1 for h in self.hidden), f"{key}.hidden", f"sizes must be >= 1, got {list(self.hidden)}"
        )


@dataclass(frozen=True)
class ObjectiveConfig:
    #: vae (mean of k ELBOs) or iwae (L_k)
    name: str = "iwae"
    #: samples per data point
    k: int = 5
    #: epochs over which the KL weight rises linearly from 0 to 1 (0: no warm-up)
    warmup_epochs: int = 0

    def validate(self, key: str) -> None:
        _require(self.k >= 1, f"{key}.k", f"must be >= 1, got {self.k}")
        _require(self.warmup_epochs >= 0, f"{key}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 80
    batch_size: int = 100
    lr: float = 1e-3
    adam_eps: float = 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.999)
    #: constant | iwae (the IWAE paper's 3^i-epoch passes with lr 1e-3 * 10^(-i/7))
    schedule: str = "constant"
    #: stop after this many epochs without a better validation bound (0: never)
    early_stopping_patience: int = 0
    seed: int = 0
    #: cpu | cuda | cuda:N | auto
    device: str = "cpu"
    #: torch intra-op threads (0: leave torch's default)
    threads: int = 0
    #: evaluate the validation bound every this many epochs (0: never)
    eval_every: int = 1
    #: show a progress bar with the running bound
    progress: bool = True
    #: also write TensorBoard event files (needs the tensorboard extra)
    tensorboard: bool = False

    def validate(self, key: str) -> None:
        _require(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _require(self.adam_eps > 0, f"{key}.adam_eps", f"must be > 0, got {self.adam_eps}")
        _require(
            all(0 <= b < 1 for b in self.adam_betas), f"{key}.adam_betas", "each must be in [0, 1)"
        )
        _require(
            self.schedule in ("constant", "iwae"),
            f"{key}.schedule",
            f"must be 'constant' or 'iwae', got {self.schedule!r}",
        )
        _require(self.early_stopping_patience >= 0, f"{key}.early_stopping_patience", "must be >= 0")
        _require(self.threads >= 0, f"{key}.threads", "must be >= 0")
        _require(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")
        _require(
            self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"),
            f"{key}.device",
            f"must be cpu, cuda, cuda:N or auto, got {self.device!r}",
        )


@dataclass(frozen=True)
class EvalConfig:
    #: samples for the importance-sampled test log-likelihood
    k_importance: int = 1000
    #: test points evaluated together
    batch_size: int = 100
    #: importance samples drawn per chunk (bounds memory); batch_size x chunk_size = 5,000 decoder
    #: rows per pass keeps the activations in cache: 1.7x faster than 500 (docs/bench.md)
    chunk_size: int = 50
    #: threshold on Cov_x(E_q[z_i]) for an active unit (IWAE paper: 0.01)
    active_unit_threshold: float = 0.01
    seed: int = 1

    def validate(self, key: str) -> None:
        for name in ("k_importance", "batch_size", "chunk_size"):
            v = getattr(self, name)
            _require(v >= 1, f"{key}.{name}", f"must be >= 1, got {v}")
        _require(self.active_unit_threshold > 0, f"{key}.active_unit_threshold", "must be > 0")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, key: str = "") -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)

    # --- round trips -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = from_dict(cls, d)
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> RunConfig:
        """A new config with dotted keys replaced: ``{"train.lr": 3e-4}`` or ``["train.lr=3e-4"]``."""
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        d = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(d, dotted, value)
        return RunConfig.from_dict(d)


# --- generic dataclass <-> dict -------------------------------------------------


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, strictly."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key{_did_you_mean(key, names)}")
        kwargs[key] = _convert(hints[key], value, dotted)
    return cls(**kwargs)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        if p not in node or not isinstance(node[p], dict):
            where = ".".join(parts[: i + 1])
            sections = [k for k, v in node.items() if isinstance(v, dict)]
            raise ConfigError(f"{where}: unknown section{_did_you_mean(p, sections)}")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"{dotted}: unknown key{_did_you_mean(parts[-1], list(node))}")
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """Parse an override value: numbers (1e-3 included), booleans, null, lists, or a string."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=3e-4")
        key, text = item.split("=", 1)
        out[key.strip()] = parse_value(text.strip())
    return out


# --- files and presets ----------------------------------------------------------


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML or JSON config (safe loader: never executes code)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(d).__name__}")
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    path = Path(path)
    path.write_text(cfg.to_json() if path.suffix == ".json" else cfg.to_yaml())


#: Named bundles of overrides. ``iwae-paper`` is Burda et al. (2016), section 5.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "iwae-paper": {
        "train.batch_size": 20,
        "train.adam_eps": 1e-4,
        "train.adam_betas": [0.9, 0.999],
        "train.lr": 1e-3,
        "train.schedule": "iwae",
        "train.epochs": 3280,
        "data.binarization": "dynamic",
    },
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}{_did_you_mean(name, sorted(PRESETS))}")
    return RunConfig().with_overrides(dict(PRESETS[name]))
