"""Typed, frozen run configuration that round-trips through JSON and YAML.

Every key is checked when a config is built: unknown keys get a "did you mean",
wrong types and impossible values name the dotted key, so a typo never starts the
wrong experiment. Configs are never mutated: ``with_overrides`` returns a new one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, did_you_mean, shown
from ..limits import MAX_BATCH, MAX_EPOCHS, MAX_SAMPLES, MAX_SEED, MAX_THREADS, MAX_WIDTH, in_range
from ..registry import INDEX, check_name
from .yaml_io import parse_value, read_config_mapping

#: name suffix -> the ``data.binarization`` it selects: ``mnist-dynamic`` is dataset ``mnist``
#: binarized dynamically (the binarization stays a transform; the suffix only picks it)
BINARIZATION_SUFFIXES: dict[str, str] = {"-dynamic": "dynamic", "-static": "static", "-grey": "none"}


def split_binarization_suffix(name: str) -> tuple[str, str | None]:
    """``"mnist-dynamic"`` -> ``("mnist", "dynamic")``; a name without a suffix -> ``(name, None)``."""
    for suffix, binarization in BINARIZATION_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], binarization
    return name, None


def require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def check_sizes(values: tuple[int, ...], key: str) -> None:
    require(all(1 <= v <= MAX_WIDTH for v in values), key,
             f"sizes must be between 1 and {MAX_WIDTH:,}, got {list(values)}")


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
        require(self.validation >= 0, f"{key}.validation", f"must be >= 0, got {self.validation}")
        in_range(self.binarization_seed, 0, MAX_SEED, f"{key}.binarization_seed")
        require(
            self.binarization in ("static", "dynamic", "none"),
            f"{key}.binarization",
            f"must be 'static', 'dynamic' or 'none', got {shown(self.binarization)}",
        )


@dataclass(frozen=True)
class PriorConfig:
    #: standard | mog | vampprior | vampprior-data | af (elbolab.priors.PRIORS)
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
    #: af: autoregressive steps of the flow prior (alternating variable order)
    flow_steps: int = 2
    #: af: hidden units of each step's MADE (two hidden layers)
    flow_width: int = 640

    def validate(self, key: str) -> None:
        in_range(self.components, 1, MAX_WIDTH, f"{key}.components")
        in_range(self.data_seed, 0, MAX_SEED, f"{key}.data_seed")
        in_range(self.flow_steps, 0, 64, f"{key}.flow_steps")
        in_range(self.flow_width, 1, MAX_WIDTH, f"{key}.flow_width")
        check_name("prior", self.name, f"{key}.name")
        require(
            self.pseudo_inputs_init in ("normal", "data"),
            f"{key}.pseudo_inputs_init",
            f"must be 'normal' or 'data', got {shown(self.pseudo_inputs_init)}",
        )
        require(self.pseudo_inputs_std is None or 0 <= self.pseudo_inputs_std < math.inf, f"{key}.pseudo_inputs_std",
                 "must be a finite number >= 0")
        require(self.pseudo_inputs_mean is None or math.isfinite(self.pseudo_inputs_mean), f"{key}.pseudo_inputs_mean",
                 "must be a finite number")

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
class PosteriorConfig:
    """q's form: each Gaussian layer of q, optionally pushed through a normalizing flow
    (elbolab.flows; docs/flows.md)."""

    #: none | planar (Rezende & Mohamed 2015) | iaf (Kingma et al. 2016), on every Gaussian layer of q
    flow: str = "none"
    #: flow steps per stochastic layer (0: the Gaussian itself)
    length: int = 10
    #: iaf: hidden units of each step's MADE and size of the encoder's context h(x) (planar: unused)
    width: int = 320

    @property
    def active(self) -> bool:
        """Whether q is more than its Gaussians."""
        return self.flow != "none" and self.length > 0

    def validate(self, key: str) -> None:
        check_name("flow", self.flow, f"{key}.flow")
        require(self.length >= 0, f"{key}.length", f"must be >= 0, got {self.length}")
        require(self.width >= 1, f"{key}.width", f"must be >= 1, got {self.width}")


def flow_stl_refusal(flow: str) -> str | None:
    """Why the STL / DReG estimators cannot run with this flow (None: they can), read from its registry."""
    registry = INDEX.get("flow")
    if registry is None or not registry.knows(flow):
        return None
    return getattr(registry[registry.canonical(flow)], "stl_refusal", None)


#: ``model.<key>`` -> (the dataclass of that section, its comment); each model registers its
#: own section beside its code (:func:`model_section`), so adding a model edits no list here
MODEL_SECTIONS: dict[str, tuple[type, str]] = {}


def model_section(key: str, comment: str) -> typing.Callable[[type], type]:
    """Class decorator: the frozen dataclass becomes section ``model.<key>`` of every config,
    with ``comment`` above it in ``elbolab config show``."""

    def register(cls: type) -> type:
        MODEL_SECTIONS[key] = (cls, comment)
        return cls

    return register


def _default_sections() -> tuple[tuple[str, Any], ...]:
    return tuple((key, cls()) for key, (cls, _) in MODEL_SECTIONS.items())


@dataclass(frozen=True)
class ModelConfig:
    #: a model registered in elbolab.models.MODELS, each by its own file in models/ (one-layer: an MLP VAE)
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
    #: the prior p(z) of the top stochastic layer
    prior: PriorConfig = field(default_factory=PriorConfig)
    #: q's form (a Gaussian per layer, or a normalizing flow after each)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    #: each model's own section (``model.two_layer``, ...), as registered in MODEL_SECTIONS: in a
    #: config file they stand as keys of ``model`` like the fields above
    sections: tuple[tuple[str, Any], ...] = field(default_factory=_default_sections, metadata={"sections": True})

    def __getattr__(self, key: str) -> Any:
        """A model's section by its key: ``cfg.model.two_layer``."""
        for name, section in self.__dict__.get("sections", ()):
            if name == key:
                return section
        raise AttributeError(f"{type(self).__name__} has no field or model section {key!r}")

    def with_section(self, key: str, section: Any) -> ModelConfig:
        """This config with section ``key`` replaced."""
        return dataclasses.replace(self, sections=tuple((k, section if k == key else v) for k, v in self.sections))

    def validate(self, key: str) -> None:
        require(self.latent_dim >= 1, f"{key}.latent_dim", f"must be >= 1, got {self.latent_dim}")
        in_range(self.latent_dim, 1, MAX_WIDTH, f"{key}.latent_dim")
        check_sizes(self.hidden, f"{key}.hidden")
        check_name("model", self.name, f"{key}.name")
        check_name("activation", self.activation, f"{key}.activation")
        check_name("likelihood", self.likelihood, f"{key}.likelihood")
        self.prior.validate(f"{key}.prior")
        self.posterior.validate(f"{key}.posterior")
        # a VampPrior mixes q(z|u_k) densities at any z; a flow gives log q only at its own samples
        require(
            not (self.posterior.active and self.prior.name.startswith("vampprior")),
            f"{key}.posterior.flow",
            f"a VampPrior's components are q(z|u_k), which a flow posterior ({self.posterior.flow}) cannot evaluate "
            "at other points' z; use model.prior.name standard or mog with a flow",
        )
        for name, section in self.sections:
            section.validate(f"{key}.{name}")


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
        require(self.k >= 1, f"{key}.k", f"must be >= 1, got {self.k}")
        in_range(self.k, 1, MAX_SAMPLES, f"{key}.k")
        require(self.warmup_epochs >= 0, f"{key}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        in_range(self.warmup_epochs, 0, MAX_EPOCHS, f"{key}.warmup_epochs")
        check_name("gradient estimator", self.estimator, f"{key}.estimator")
        require(self.m >= 1, f"{key}.m", f"must be >= 1, got {self.m}")
        in_range(self.m * self.k, 1, MAX_SAMPLES, f"{key}.m x {key}.k")
        require(
            self.m == 1 or self.name in ("miwae", "piwae"),
            f"{key}.m",
            f"only miwae and piwae use m (objective {self.name!r} draws k samples); got m={self.m}",
        )
        require(0.0 <= self.beta <= 1.0, f"{key}.beta", f"must be in [0, 1], got {self.beta}")


@dataclass(frozen=True)
class TrainConfig:
    #: passes over the training split (the most; early stopping may end sooner)
    epochs: int = 80
    #: training images per step
    batch_size: int = 100
    #: learning rate (the schedule's starting value)
    lr: float = 1e-3
    #: Adam's epsilon
    adam_eps: float = 1e-8
    #: Adam's (beta1, beta2)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    #: adam | adamnormgrad (Adam on each parameter's gradient divided by its norm, the
    #: VampPrior code's optimizer); adam_eps and adam_betas apply to both (elbolab.optimizers)
    optimizer: str = "adam"
    #: constant | iwae (the IWAE paper's 3^i-epoch passes with lr 1e-3 * 10^(-i/7))
    schedule: str = "constant"
    #: stop after this many epochs without a better validation bound (0: never); epochs
    #: in KL warm-up are not counted, as in the VampPrior code
    early_stopping_patience: int = 0
    #: seed of the weights' init, the batch order and the training samples
    seed: int = 0
    #: cpu | cuda | cuda:N | auto
    device: str = "cpu"
    #: torch intra-op threads (0: leave torch's default)
    threads: int = 0
    #: evaluate the validation bound every this many epochs (0: never)
    eval_every: int = 1
    #: show a progress bar with the running bound
    progress: bool = True
    #: also write TensorBoard event files to RUN/tensorboard (needs the tensorboard extra)
    tensorboard: bool = False
    #: also log to Weights & Biases (needs the wandb extra; files in RUN/wandb)
    wandb: bool = False
    #: "offline" (files only, no network; upload later with `wandb sync`) or "online"
    wandb_mode: str = "offline"
    #: the Weights & Biases project the run is logged under
    wandb_project: str = "elbolab"
    #: log collapse diagnostics every this many epochs and at the last (0: never): per-unit
    #: KL, active units and the mutual information I(x; z) on a fixed subsample (about 1% of
    #: an epoch of the embedded data at 5; docs/diagnostics.md)
    monitor_every: int = 5
    #: images in that subsample (validation split, else training split); I(x; z) <= log of it
    monitor_points: int = 1000
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
    #: auto | on | off: the fused batch step (elbolab.fused: forward, hand-written backward and
    #: optimizer update with no autograd) for the IWAE paper's dense models; auto uses it where
    #: a run fits (fused.supports), on refuses a run that does not, off never uses it. Fused runs of
    #: one objective, k and estimator stack into one fused step (fused.StackedFusedStep), each run's
    #: bits those of the run alone; the iwae-paper presets set auto
    fused: str = "off"
    #: auto | torch | cpp: how a fused run's step runs: torch ops, or one call into the compiled
    #: step (elbolab.fused_cpp: built on first use, cached; where it cannot build, one line and the
    #: torch-op step). auto is cpp unless the environment sets ELBOLAB_FUSED_CPP=0
    fused_backend: str = "auto"

    def validate(self, key: str) -> None:
        require(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        require(self.fused in ("auto", "on", "off"), f"{key}.fused",
                f"must be auto, on or off, got {self.fused!r}")
        require(self.fused_backend in ("auto", "torch", "cpp"), f"{key}.fused_backend",
                f"must be auto, torch or cpp, got {self.fused_backend!r}")
        check_name("precision", self.precision, f"{key}.precision")
        in_range(self.epochs, 1, MAX_EPOCHS, f"{key}.epochs")
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        in_range(self.batch_size, 1, MAX_BATCH, f"{key}.batch_size")
        in_range(self.seed, 0, MAX_SEED, f"{key}.seed")
        require(0 < self.lr < math.inf, f"{key}.lr", f"must be a finite number > 0, got {self.lr}")
        require(0 < self.adam_eps < math.inf, f"{key}.adam_eps", f"must be a finite number > 0, got {self.adam_eps}")
        require(
            all(0 <= b < 1 for b in self.adam_betas), f"{key}.adam_betas", "each must be in [0, 1)"
        )
        check_name("optimizer", self.optimizer, f"{key}.optimizer")
        check_name("schedule", self.schedule, f"{key}.schedule")
        require(self.early_stopping_patience >= 0, f"{key}.early_stopping_patience", "must be >= 0")
        require(self.threads >= 0, f"{key}.threads", "must be >= 0")
        in_range(self.threads, 0, MAX_THREADS, f"{key}.threads")
        require(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")
        require(self.monitor_every >= 0, f"{key}.monitor_every", f"must be >= 0, got {self.monitor_every}")
        require(self.monitor_points >= 2, f"{key}.monitor_points", f"must be >= 2, got {self.monitor_points}")
        require(self.wandb_mode in ("offline", "online"), f"{key}.wandb_mode",
                 f"must be 'offline' or 'online', got {shown(self.wandb_mode)}")
        require(
            self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"),
            f"{key}.device",
            f"must be cpu, cuda, cuda:N or auto, got {shown(self.device)}",
        )
        require(
            0 <= self.checkpoint_minutes < math.inf,
            f"{key}.checkpoint_minutes",
            f"must be a finite number >= 0, got {self.checkpoint_minutes}",
        )
        require(self.checkpoint_steps >= 0, f"{key}.checkpoint_steps", f"must be >= 0, got {self.checkpoint_steps}")
        require(
            self.nonfinite in ("skip", "stop"), f"{key}.nonfinite",
            f"must be 'skip' or 'stop', got {shown(self.nonfinite)}",
        )
        require(
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
    #: `elbolab train`'s final evaluation and `elbolab reproduce` score a random subset of this
    #: many test images (0: the whole split), the same images as `elbolab diagnose --points N`:
    #: for models too costly to score them all on a CPU
    test_images: int = 0
    #: importance samples drawn per chunk on a CPU (bounds memory); batch_size x chunk_size =
    #: 5,000 decoder rows per pass keeps the activations in cache (docs/bench.md measures the choice)
    chunk_size: int = 50
    #: the same on a GPU, which wants rows to fill it rather than a cache: 100 x 2,000 = 200,000
    #: rows per pass, about 1 GB for the IWAE-paper model (docs/bench.md measures the choice)
    gpu_chunk_size: int = 2000
    #: threshold on Cov_x(E_q[z_i]) for an active unit (IWAE paper: 0.01)
    active_unit_threshold: float = 0.01
    #: seed of every evaluation's samples (they never touch the training stream)
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
            in_range(v, 1, MAX_BATCH if name == "batch_size" else 10 * MAX_SAMPLES, f"{key}.{name}")
        require(self.test_images >= 0, f"{key}.test_images", f"must be >= 0, got {self.test_images}")
        require(0 < self.active_unit_threshold < math.inf, f"{key}.active_unit_threshold",
                 "must be a finite number > 0")
        in_range(self.seed, 0, MAX_SEED, f"{key}.seed")
        for name in ("bound_ks", "q_ew_ks"):
            v = getattr(self, name)
            require(len(v) > 0 and all(1 <= k <= 10 * MAX_SAMPLES for k in v), f"{key}.{name}",
                     f"must be k values between 1 and {10 * MAX_SAMPLES:,}, got {list(v)}")


@dataclass(frozen=True)
class RunConfig:
    #: the dataset and how its images are binarized
    data: DataConfig = field(default_factory=DataConfig)
    #: architecture, likelihood and prior
    model: ModelConfig = field(default_factory=ModelConfig)
    #: the bound trained on and its gradient estimator
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    #: optimizer, schedule, checkpoints and logging
    train: TrainConfig = field(default_factory=TrainConfig)
    #: the test evaluation and `elbolab diagnose`
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, key: str = "") -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        post = self.model.posterior
        if post.active and self.objective.estimator in ("stl", "dreg"):
            reason = flow_stl_refusal(post.flow)
            require(
                reason is None,
                "objective.estimator",
                f"{self.objective.estimator} needs log q(z|x) at its sample with q's weights held fixed, and {reason}; "
                "use estimator standard, or model.posterior.flow planar",
            )

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


def config_items(obj: Any) -> list[tuple[str, Any]]:
    """A config dataclass's (key, value) pairs as a file holds them: its fields, with a field of
    registered sections (``ModelConfig.sections``) standing as one key per section."""
    items: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items.extend(value if f.metadata.get("sections") else [(f.name, value)])
    return items


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {key: to_dict(value) for key, value in config_items(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {shown(value)}")
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
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {shown(value)}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on / off as a boolean (train.fused=off)
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {shown(value)}")
        return value
    return value


def from_dict(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, strictly."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields if not f.metadata.get("sections")]
    holder = next((f.name for f in fields if f.metadata.get("sections")), None)
    sections = dict(_default_sections()) if holder else {}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key in sections:
            sections[key] = _convert(MODEL_SECTIONS[key][0], value, dotted)
        elif key in names:
            kwargs[key] = _convert(hints[key], value, dotted)
        else:
            raise ConfigError(f"{dotted}: unknown key{did_you_mean(key, [*names, *sections])}")
    if holder:
        kwargs[holder] = tuple(sections.items())
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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {shown(item)}: expected key=value, e.g. train.lr=3e-4")
        key, text = item.split("=", 1)
        out[key.strip()] = parse_value(text.strip())
    return out


# --- the keys' comments -------------------------------------------------------------


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's ``#:`` comment, read from the class's source (the lines right above it);
    an inherited field keeps its base class's comment unless the subclass gives its own."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            out.update(field_comments(base))
    lines, _ = inspect.getsourcelines(cls)
    (node,) = ast.parse(textwrap.dedent("".join(lines))).body
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            above: list[str] = []
            i = item.lineno - 2  # the line above, 0-based within ``lines``
            while i >= 0 and lines[i].strip().startswith("#:"):
                above.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if above or item.target.id not in out:
                out[item.target.id] = " ".join(above)
    return out


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(to_dict(value), default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()


def commented_yaml(cfg: Any, width: int = 100) -> str:
    """The config as YAML with every key's comment above it (``elbolab config show``);
    ``yaml.safe_load`` of it gives ``cfg.to_dict()`` back."""
    lines: list[str] = []

    def walk(obj: Any, indent: str) -> None:
        comments = field_comments(type(obj))
        for key, value in config_items(obj):
            comment = comments.get(key) or (MODEL_SECTIONS[key][1] if key in MODEL_SECTIONS else "")
            if comment:
                lines.extend(textwrap.wrap(comment, width, initial_indent=indent + "# ",
                                           subsequent_indent=indent + "# "))
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{key}:")
                walk(value, indent + "  ")
            else:
                lines.append(f"{indent}{key}: {_yaml_value(value)}")

    walk(cfg, "")
    return "\n".join(lines) + "\n"


# --- files ---------------------------------------------------------------------------


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML or JSON config (safe loader: never executes code; a key given twice is refused)."""
    path = Path(path)
    d = read_config_mapping(path)
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    path = Path(path)
    path.write_text(cfg.to_json() if path.suffix == ".json" else cfg.to_yaml())
