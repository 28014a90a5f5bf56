"""Typed, frozen run configuration that round-trips through JSON and YAML.

Every key is checked when a config is built: unknown keys get a "did you mean",
wrong types and impossible values name the dotted key, so a typo never starts the
wrong experiment. Configs are never mutated: ``with_overrides`` returns a new one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, did_you_mean
from .registry import check_name

__all__ = ["ConfigError", "RunConfig", "load_config", "preset", "save_config"]

#: name suffix -> the ``data.binarization`` it selects: ``mnist-dynamic`` is dataset ``mnist``
#: binarized dynamically (the binarization stays a transform; the suffix only picks it)
BINARIZATION_SUFFIXES: dict[str, str] = {"-dynamic": "dynamic", "-static": "static", "-grey": "none"}


def split_binarization_suffix(name: str) -> tuple[str, str | None]:
    """``"mnist-dynamic"`` -> ``("mnist", "dynamic")``; a name without a suffix -> ``(name, None)``."""
    for suffix, binarization in BINARIZATION_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], binarization
    return name, None


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
    #: hold out the last N training images as the validation split, for datasets without one
    #: (0: train on the whole training split, the IWAE paper's MNIST protocol; 10000: MNIST 50k/10k)
    validation: int = 0

    def __post_init__(self) -> None:
        base, binarization = split_binarization_suffix(self.name)
        if binarization is not None:
            object.__setattr__(self, "name", base)
            object.__setattr__(self, "binarization", binarization)

    def validate(self, key: str) -> None:
        check_name("dataset", self.name, f"{key}.name")
        _require(self.validation >= 0, f"{key}.validation", f"must be >= 0, got {self.validation}")
        _require(
            self.binarization in ("static", "dynamic", "none"),
            f"{key}.binarization",
            f"must be 'static', 'dynamic' or 'none', got {self.binarization!r}",
        )


@dataclass(frozen=True)
class PriorConfig:
    #: standard | mog | vampprior | vampprior-data (elbolab.priors.PRIORS)
    name: str = "standard"
    #: mixture components or pseudo-inputs
    components: int = 500
    #: learn the mixing weights of a mixture of Gaussians (else uniform)
    learn_weights: bool = False
    #: how learned VampPrior pseudo-inputs start: "normal" (N(mean, std) before the
    #: hardtanh, as in Tomczak & Welling's code) or "data" (random training images)
    pseudo_inputs_init: str = "normal"
    #: mean of the normal init; null: the dataset's value, as their code sets it per dataset
    #: (0.05 for MNIST and OMNIGLOT, 0.5 for Caltech-101 and Frey Faces; elbolab.data registry)
    pseudo_inputs_mean: float | None = None
    #: std of the normal init; null: the dataset's value (0.01 for MNIST and OMNIGLOT, 0.02
    #: for Caltech-101 and Frey Faces)
    pseudo_inputs_std: float | None = None
    #: seed choosing the training images of vampprior-data and of the "data" init
    data_seed: int = 0

    def validate(self, key: str) -> None:
        _require(self.components >= 1, f"{key}.components", f"must be >= 1, got {self.components}")
        check_name("prior", self.name, f"{key}.name")
        _require(
            self.pseudo_inputs_init in ("normal", "data"),
            f"{key}.pseudo_inputs_init",
            f"must be 'normal' or 'data', got {self.pseudo_inputs_init!r}",
        )
        _require(self.pseudo_inputs_std is None or self.pseudo_inputs_std >= 0, f"{key}.pseudo_inputs_std",
                 "must be >= 0")

    def with_pseudo_input_init(self, default: tuple[float, float]) -> PriorConfig:
        """This config with an unset pseudo-input mean and std taken from ``default`` (a dataset's)."""
        mean = default[0] if self.pseudo_inputs_mean is None else self.pseudo_inputs_mean
        std = default[1] if self.pseudo_inputs_std is None else self.pseudo_inputs_std
        return dataclasses.replace(self, pseudo_inputs_mean=mean, pseudo_inputs_std=std)

    def pseudo_input_params(self) -> tuple[float, float]:
        """(mean, std) once set (see :meth:`with_pseudo_input_init`)."""
        if self.pseudo_inputs_mean is None or self.pseudo_inputs_std is None:
            raise ValueError("pseudo-input init not resolved; call with_pseudo_input_init first")
        return self.pseudo_inputs_mean, self.pseudo_inputs_std


@dataclass(frozen=True)
class TwoLayerConfig:
    """Sizes of the IWAE paper's two-stochastic-layer model (its section 5; the authors'
    experiments.py: hidden_units_q [[200, 200], [100, 100]], latent_units [100, 50])."""

    #: units of z1 (bottom) and z2 (top)
    latent_dims: tuple[int, int] = (100, 50)
    #: deterministic tanh layers between x and z1 (the decoder mirrors them: z1 -> 200 -> 200 -> x)
    hidden1: tuple[int, ...] = (200, 200)
    #: deterministic tanh layers between z1 and z2 (mirrored: z2 -> 100 -> 100 -> z1)
    hidden2: tuple[int, ...] = (100, 100)

    def validate(self, key: str) -> None:
        _require(all(d >= 1 for d in self.latent_dims), f"{key}.latent_dims", "sizes must be >= 1")
        for name in ("hidden1", "hidden2"):
            _require(all(h >= 1 for h in getattr(self, name)), f"{key}.{name}", "sizes must be >= 1")


@dataclass(frozen=True)
class HierarchicalConfig:
    """Sizes of the VampPrior paper's two-level model (their code's defaults)."""

    #: units of z1 (bottom) and z2 (top)
    latent_dims: tuple[int, int] = (40, 40)
    #: width of every gated dense layer
    width: int = 300
    #: hardtanh range of the Gaussian log-variances (their code: [-6, 2])
    log_var_range: tuple[float, float] = (-6.0, 2.0)

    def validate(self, key: str) -> None:
        _require(all(d >= 1 for d in self.latent_dims), f"{key}.latent_dims", "sizes must be >= 1")
        _require(self.width >= 1, f"{key}.width", f"must be >= 1, got {self.width}")
        lo, hi = self.log_var_range
        _require(lo < hi, f"{key}.log_var_range", f"needs min < max, got [{lo}, {hi}]")


@dataclass(frozen=True)
class ModelConfig:
    #: one-layer | two-layer | hierarchical (elbolab.models.MODELS)
    name: str = "one-layer"
    #: one-layer: units of z
    latent_dim: int = 50
    #: one-layer: deterministic layers of the encoder (the decoder mirrors them)
    hidden: tuple[int, ...] = (200, 200)
    #: activation of the MLP models (one-layer, two-layer)
    activation: str = "tanh"
    #: bernoulli (binary images) | discretized-logistic (256 grey levels) |
    #: gaussian (per-pixel variance from the decoder) | gaussian-pixel-var (learned per-pixel variance)
    likelihood: str = "bernoulli"
    prior: PriorConfig = field(default_factory=PriorConfig)
    #: sizes of model "two-layer"
    two_layer: TwoLayerConfig = field(default_factory=TwoLayerConfig)
    #: sizes of model "hierarchical"
    hierarchical: HierarchicalConfig = field(default_factory=HierarchicalConfig)

    def validate(self, key: str) -> None:
        _require(self.latent_dim >= 1, f"{key}.latent_dim", f"must be >= 1, got {self.latent_dim}")
        _require(
            all(h >= 1 for h in self.hidden), f"{key}.hidden", f"sizes must be >= 1, got {list(self.hidden)}"
        )
        check_name("model", self.name, f"{key}.name")
        check_name("activation", self.activation, f"{key}.activation")
        check_name("likelihood", self.likelihood, f"{key}.likelihood")
        self.prior.validate(f"{key}.prior")
        self.two_layer.validate(f"{key}.two_layer")
        self.hierarchical.validate(f"{key}.hierarchical")


@dataclass(frozen=True)
class ObjectiveConfig:
    #: vae (mean of k ELBOs), iwae (L_k), miwae (mean of m L_k's), ciwae
    #: (beta * ELBO + (1 - beta) * L_k), piwae (decoder on L_{m k}, encoder on miwae)
    name: str = "iwae"
    #: samples per data point (per group for miwae / piwae)
    k: int = 5
    #: epochs over which the KL weight rises linearly from 0 to 1 (0: no warm-up)
    warmup_epochs: int = 0
    #: gradient estimator: standard (the IWAE paper's), stl (sticking the landing,
    #: Roeder et al. 2017) or dreg (doubly reparameterized, Tucker et al. 2018); the
    #: bound's value never depends on it, only the encoder's gradient does
    estimator: str = "standard"
    #: groups of k samples for miwae and piwae (m * k draws per data point)
    m: int = 1
    #: ciwae's weight on the ELBO, in [0, 1] (0: iwae, 1: vae)
    beta: float = 0.5

    def validate(self, key: str) -> None:
        check_name("objective", self.name, f"{key}.name")
        _require(self.k >= 1, f"{key}.k", f"must be >= 1, got {self.k}")
        _require(self.warmup_epochs >= 0, f"{key}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        check_name("gradient estimator", self.estimator, f"{key}.estimator")
        _require(self.m >= 1, f"{key}.m", f"must be >= 1, got {self.m}")
        _require(
            self.m == 1 or self.name in ("miwae", "piwae"),
            f"{key}.m",
            f"only miwae and piwae use m (objective {self.name!r} draws k samples); got m={self.m}",
        )
        _require(0.0 <= self.beta <= 1.0, f"{key}.beta", f"must be in [0, 1], got {self.beta}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 80
    batch_size: int = 100
    lr: float = 1e-3
    adam_eps: float = 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.999)
    #: adam | adamnormgrad (Adam on each parameter's gradient divided by its norm, the
    #: VampPrior code's optimizer); adam_eps and adam_betas apply to both (elbolab.optimizers)
    optimizer: str = "adam"
    #: constant | iwae (the IWAE paper's 3^i-epoch passes with lr 1e-3 * 10^(-i/7))
    schedule: str = "constant"
    #: stop after this many epochs without a better validation bound (0: never); epochs
    #: in KL warm-up are not counted, as in the VampPrior code
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
    #: also checkpoint mid-epoch every this many minutes (0: only at epoch ends)
    checkpoint_minutes: float = 10.0
    #: also checkpoint mid-epoch every this many steps (0: never; deterministic, for tests)
    checkpoint_steps: int = 0
    #: on a non-finite loss or gradient: "skip" the step (up to max_nonfinite_skips
    #: in the whole run, then stop) or "stop" at once; the last checkpoint is kept either way
    nonfinite: str = "skip"
    #: skipped steps tolerated by nonfinite="skip" before the run stops
    max_nonfinite_skips: int = 3
    #: compile the training objective with torch.compile (CUDA graphs on a GPU): compiling
    #: costs seconds once per batch shape, steps get faster (docs/bench.md); a CPU needs a C++
    #: compiler. Random draws stay torch's own stream, so a compiled run matches an eager one
    #: to float rounding (fastpaths.compile_objective)
    compile: bool = False
    #: fp32, or bf16: the step's matrix products in bfloat16 (autocast), parameters, optimizer state,
    #: log weights and bounds in float32; evaluation is float32 either way (fastpaths.with_precision;
    #: docs/bench.md measures its accuracy and speed). Fast only where the hardware multiplies bf16
    precision: str = "fp32"

    def validate(self, key: str) -> None:
        _require(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        check_name("precision", self.precision, f"{key}.precision")
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(0 < self.lr < math.inf, f"{key}.lr", f"must be a finite number > 0, got {self.lr}")
        _require(0 < self.adam_eps < math.inf, f"{key}.adam_eps", f"must be a finite number > 0, got {self.adam_eps}")
        _require(
            all(0 <= b < 1 for b in self.adam_betas), f"{key}.adam_betas", "each must be in [0, 1)"
        )
        check_name("optimizer", self.optimizer, f"{key}.optimizer")
        check_name("schedule", self.schedule, f"{key}.schedule")
        _require(self.early_stopping_patience >= 0, f"{key}.early_stopping_patience", "must be >= 0")
        _require(self.threads >= 0, f"{key}.threads", "must be >= 0")
        _require(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")
        _require(
            self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"),
            f"{key}.device",
            f"must be cpu, cuda, cuda:N or auto, got {self.device!r}",
        )
        _require(
            0 <= self.checkpoint_minutes < math.inf,
            f"{key}.checkpoint_minutes",
            f"must be a finite number >= 0, got {self.checkpoint_minutes}",
        )
        _require(self.checkpoint_steps >= 0, f"{key}.checkpoint_steps", f"must be >= 0, got {self.checkpoint_steps}")
        _require(
            self.nonfinite in ("skip", "stop"), f"{key}.nonfinite", f"must be 'skip' or 'stop', got {self.nonfinite!r}"
        )
        _require(
            self.max_nonfinite_skips >= 0,
            f"{key}.max_nonfinite_skips",
            f"must be >= 0, got {self.max_nonfinite_skips}",
        )


@dataclass(frozen=True)
class EvalConfig:
    #: samples for the importance-sampled test log-likelihood
    k_importance: int = 1000
    #: test points evaluated together
    batch_size: int = 100
    #: importance samples drawn per chunk on a CPU (bounds memory); batch_size x chunk_size =
    #: 5,000 decoder rows per pass keeps the activations in cache (docs/bench.md measures the choice)
    chunk_size: int = 50
    #: the same on a GPU, which wants rows to fill it rather than a cache: 100 x 2,000 = 200,000
    #: rows per pass, about 1 GB for the IWAE-paper model (docs/bench.md measures the choice)
    gpu_chunk_size: int = 2000
    #: threshold on Cov_x(E_q[z_i]) for an active unit (IWAE paper: 0.01)
    active_unit_threshold: float = 0.01
    seed: int = 1
    #: `elbolab diagnose`: the k of the bound-versus-k curve; the largest is the IS sample count
    bound_ks: tuple[int, ...] = (1, 2, 5, 10, 50, 100, 500, 1000, 5000)
    #: `elbolab diagnose`: draws z ~ q(z|x_i) per point for ELBO surgery (each scored against all N)
    surgery_samples: int = 1
    #: `elbolab diagnose`: K of the q_EW panels (2-D latents)
    q_ew_ks: tuple[int, ...] = (1, 10, 100)

    def chunk_for(self, device: object) -> int:
        """Importance samples per chunk for evaluation on ``device`` (a torch.device or its name)."""
        return self.gpu_chunk_size if str(device).startswith("cuda") else self.chunk_size

    def validate(self, key: str) -> None:
        for name in ("k_importance", "batch_size", "chunk_size", "gpu_chunk_size", "surgery_samples"):
            v = getattr(self, name)
            _require(v >= 1, f"{key}.{name}", f"must be >= 1, got {v}")
        _require(self.active_unit_threshold > 0, f"{key}.active_unit_threshold", "must be > 0")
        for name in ("bound_ks", "q_ew_ks"):
            v = getattr(self, name)
            _require(len(v) > 0 and all(k >= 1 for k in v), f"{key}.{name}", f"must be k >= 1 values, got {list(v)}")


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
            raise ConfigError(f"{dotted}: unknown key{did_you_mean(key, names)}")
        kwargs[key] = _convert(hints[key], value, dotted)
    return cls(**kwargs)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        if p not in node or not isinstance(node[p], dict):
            where = ".".join(parts[: i + 1])
            sections = [k for k, v in node.items() if isinstance(v, dict)]
            raise ConfigError(f"{where}: unknown section{did_you_mean(p, sections)}")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"{dotted}: unknown key{did_you_mean(parts[-1], list(node))}")
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


#: Burda et al. (2016), section 5: Adam eps 1e-4, batch 20, 3^i-epoch passes with lr 1e-3 * 10^(-i/7)
_IWAE_PAPER: dict[str, Any] = {
    "train.batch_size": 20,
    "train.adam_eps": 1e-4,
    "train.adam_betas": [0.9, 0.999],
    "train.lr": 1e-3,
    "train.schedule": "iwae",
    "train.epochs": 3280,
    "data.binarization": "dynamic",
}

#: Named bundles of overrides.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "iwae-paper": _IWAE_PAPER,
    # the IWAE paper's second architecture: x -> 200-200 tanh -> z1 (100) -> 100-100 tanh -> z2 (50)
    "iwae-paper-two-layer": {
        **_IWAE_PAPER,
        "model.name": "two-layer",
        "model.two_layer.latent_dims": [100, 50],
        "model.two_layer.hidden1": [200, 200],
        "model.two_layer.hidden2": [100, 100],
    },
    # Tomczak & Welling (2018), section 5 and their code's defaults: the two-level
    # hierarchical VAE with a 500-pseudo-input VampPrior on z2, single-sample ELBO,
    # AdamNormGrad (their experiment.py; betas and eps left at Adam's defaults) lr 5e-4,
    # batch 100, KL warm-up over 100 epochs, early stopping after 50 epochs without a
    # better validation bound (not counted during warm-up), at most 2,000 epochs,
    # 5,000 importance samples
    "vampprior-paper": {
        "train.optimizer": "adamnormgrad",
        "train.adam_eps": 1e-8,
        "train.adam_betas": [0.9, 0.999],
        "train.lr": 5e-4,
        "train.batch_size": 100,
        "train.epochs": 2000,
        "train.early_stopping_patience": 50,
        "objective.name": "vae",
        "objective.k": 1,
        "objective.warmup_epochs": 100,
        "model.name": "hierarchical",
        "model.prior.name": "vampprior",
        "model.prior.components": 500,
        "eval.k_importance": 5000,
    },
}



def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}{did_you_mean(name, sorted(PRESETS))}")
    return RunConfig().with_overrides(dict(PRESETS[name]))
