"""A Pyro model + guide pair as an elbolab model: ``from_pyro(model, guide, encoder=..., decoder=...)``.

``model(x)`` and ``guide(x)`` take a batch x ``[B, D]`` and put every sample site inside
one plate over the batch (``pyro.plate("data", B)``), as Pyro's VAE tutorial does. The
log weights are Pyro's own densities: the guide is traced with K particles (an outer
plate, as Pyro's ``vectorize_particles``), the model is replayed against it, and

    log w[k, b] = sum over model sites log p(.) - sum over guide sites log q(.)

summed per data point (over every dimension but the particle and data-plate ones).
Observed sites make ``log_likelihood``, the model's latent sites ``log_prior``, the
guide's ``log_posterior``. Diagnostics that need densities read the guide's one latent
site when it is a diagonal Normal (``posterior``) and the model's distribution of it
(``prior``). Gradient estimators split parameters by the ``encoder`` and ``decoder``
modules given (parameters made with ``pyro.param`` live in Pyro's param store, not here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributions import DiagonalGaussian
from ..errors import ConfigError
from ..models.base import LatentVariableModel, LogWeightTerms, NoPosterior
from ..priors import Prior

EXTRA = "pip install 'elbolab[pyro]'"


class PyroModelError(ConfigError):
    """A Pyro model / guide pair the adapter cannot score per data point (one line, naming the site)."""

PARTICLES = "_elbolab_particles"


def require_pyro() -> Any:
    """The pyro module, or a one-line ImportError naming the extra."""
    try:
        import pyro
        import pyro.poutine  # noqa: F401
    except ImportError as e:
        raise ImportError(f"elbolab.adapters.pyro needs pyro-ppl ({e}): {EXTRA}") from None
    return pyro


def _sample_sites(trace: Any) -> list[tuple[str, dict]]:
    """The trace's sample sites, plates' subsample sites and our particle plate left out."""
    from pyro.poutine.util import site_is_subsample

    return [(n, s) for n, s in trace.nodes.items()
            if s["type"] == "sample" and not site_is_subsample(s) and n != PARTICLES]


def _normal_parts(fn: Any, site: str) -> tuple[Tensor, Tensor]:
    """(loc, scale) of a Normal, or of Independent(Normal) with one event dimension."""
    import pyro.distributions as dist

    base = fn.base_dist if isinstance(fn, torch.distributions.Independent) else fn
    events = len(fn.event_shape)
    if not isinstance(base, dist.Normal | torch.distributions.Normal) or events != 1:
        raise NoPosterior(f"site {site!r}: {type(base).__name__} with event shape {tuple(fn.event_shape)}; "
                        "posterior(x) and the prior need a diagonal Normal with one event dimension "
                        "(dist.Normal(loc, scale).to_event(1))")
    return base.loc, base.scale


def _detached(fn: Any, site: str) -> Any:
    """The same density with its parameters cut from the graph (STL / DReG), for Normal guides."""
    import pyro.distributions as dist

    loc, scale = _normal_parts(fn, site)
    return dist.Normal(loc.detach(), scale.detach()).to_event(1)


class PyroPrior(Prior):
    """p(z) of the model's one latent site, read from a trace of the model on one data point."""

    def __init__(self, owner: PyroModel, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self._owner = [owner]  # a list, not a submodule: the model owns the prior

    def _fn(self) -> Any:
        owner = self._owner[0]
        site = owner.latent_sites[0]
        trace = owner.pyro.poutine.trace(owner.model_fn).get_trace(owner.probe)
        return trace.nodes[site]["fn"]

    def log_prob(self, z: Tensor) -> Tensor:
        """``[..., d] -> [...]``."""
        return self._fn().log_prob(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        loc, scale = _normal_parts(self._fn(), self._owner[0].latent_sites[0])
        loc, scale = loc.reshape(-1, loc.shape[-1])[:1], scale.reshape(-1, scale.shape[-1])[:1]
        eps = torch.randn((n, loc.shape[-1]), generator=generator, dtype=loc.dtype, device=loc.device)
        return loc + scale * eps


class PyroModel(LatentVariableModel):
    """``log_weight_terms`` from Pyro's traces of ``model`` and ``guide``; see the module docstring."""

    def __init__(self, model: Callable[[Tensor], Any], guide: Callable[[Tensor], Any], *,
                 encoder: nn.Module | None = None, decoder: nn.Module | None = None,
                 data_plate: str = "data", image_shape: tuple[int, ...] | None = None,
                 name: str = "pyro model") -> None:
        super().__init__()
        self.pyro = require_pyro()
        self.model_fn, self.guide_fn = model, guide
        self.encoder = encoder
        self.decoder = decoder
        self.data_plate = data_plate
        self.model_name = name
        self.prior_name = "the model's (pyro)"
        if image_shape is not None:
            self.image_shape = tuple(image_shape)
        #: set on the first batch: sizes of the guide's latent sites, their names, x's width
        self.latent_dims: list[int] = []
        self.latent_sites: list[str] = []
        self.data_dim = 0
        self.max_plate_nesting = 1
        self.probe: Tensor | None = None

    # --- tracing ----------------------------------------------------------------------
    def _cast(self, x: Tensor) -> Tensor:
        """x in the parameters' floating dtype (a float64 model scores float32 images)."""
        p = next((p for p in self.parameters() if p.is_floating_point()), None)
        return x.to(p.dtype) if p is not None else x

    def _inspect(self, x: Tensor) -> None:
        """Read the guide's latent sites and the plate nesting from one trace (first batch only)."""
        self.probe = x[:1].detach()
        if self.latent_sites:
            return
        poutine = self.pyro.poutine
        guide = poutine.trace(self.guide_fn).get_trace(x)
        model = poutine.trace(poutine.replay(self.model_fn, trace=guide)).get_trace(x)
        sites = [(n, s) for n, s in _sample_sites(guide) if not s["is_observed"]]
        if not sites:
            raise PyroModelError("pyro guide: no latent sample site")
        self._check_sites(guide, model, {n for n, _ in sites})
        nesting = [len(s["cond_indep_stack"]) for tr in (guide, model) for _, s in _sample_sites(tr)]
        self.max_plate_nesting = max(nesting + [1])
        self.latent_sites = [n for n, _ in sites]
        self.latent_dims = [int(math.prod(s["value"].shape[s["value"].dim() - len(s["fn"].event_shape):]))
                            for _, s in sites]
        self.data_dim = int(x.shape[-1])
        if len(sites) == 1:
            self.prior = PyroPrior(self, self.latent_dims[0])

    def _check_sites(self, guide: Any, model: Any, latent: set[str]) -> None:
        """Refuse, before any particles are traced, what per-point log weights cannot score: a site
        outside the data plate (a global latent), and a model site that is neither observed nor
        in the guide (the data's ``pyro.sample`` without ``obs=x``, which would be scored as a latent)."""
        for where, trace in (("guide", guide), ("model", model)):
            for n, site in _sample_sites(trace):
                if self.data_plate not in {f.name for f in site["cond_indep_stack"]}:
                    raise PyroModelError(
                        f"pyro {where} site {n!r} is outside the plate {self.data_plate!r}: per-point log weights "
                        "need every sample site inside it (a global latent is not supported; pass data_plate= if "
                        "the plate has another name)")
        stray = [n for n, site in _sample_sites(model) if not site["is_observed"] and n not in latent]
        if stray:
            raise PyroModelError(f"pyro model site(s) {', '.join(map(repr, stray))} neither observed nor in the guide: "
                                 "pass the data as obs= (pyro.sample('x', ..., obs=x)), and sample every latent "
                                 "in the guide too")
        if not any(site["is_observed"] for _, site in _sample_sites(model)):
            raise PyroModelError("pyro model: no observed site; pass the data as obs= (pyro.sample('x', ..., obs=x))")

    def _with_particles(self, fn: Callable, k: int) -> Callable:
        dim = -(self.max_plate_nesting + 1)

        def wrapped(*args: Any) -> Any:
            with self.pyro.plate(PARTICLES, k, dim=dim):
                return fn(*args)

        return wrapped

    def _per_point(self, name: str, site: dict, k: int, b: int) -> Tensor:
        """The site's log-density ``[K, B]``: summed over every dimension but particles and the data plate."""
        frames = {f.name: f.dim for f in site["cond_indep_stack"]}
        if self.data_plate not in frames:
            raise PyroModelError(f"pyro site {name!r} is outside the plate {self.data_plate!r}: per-point log weights "
                             "need every sample site inside it (pass data_plate= if it has another name)")
        lp = site["log_prob"]
        full = self.max_plate_nesting + 1
        lp = lp.reshape((1,) * (full - lp.dim()) + tuple(lp.shape))
        data_axis = full + frames[self.data_plate]
        other = [i for i in range(1, full) if i != data_axis]
        if other:
            lp = lp.sum(other, keepdim=True)
        return lp.reshape(lp.shape[0], lp.shape[data_axis]).expand(k, b)

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        x = self._cast(x)
        self._inspect(x)
        poutine = self.pyro.poutine
        b = x.shape[0]
        guide = poutine.trace(self._with_particles(self.guide_fn, k)).get_trace(x)
        model = poutine.trace(poutine.replay(self._with_particles(self.model_fn, k), trace=guide)).get_trace(x)
        guide_sites = [(n, s) for n, s in _sample_sites(guide) if not s["is_observed"]]
        if stop_posterior_grad and len(guide_sites) > 1:
            raise ValueError("stl / dreg with a pyro guide need one latent site: a guide with several must keep "
                             "the path through earlier samples when its densities are detached")
        log_q: dict[str, Tensor] = {}
        for n, s in guide_sites:
            fn = _detached(s["fn"], n) if stop_posterior_grad else s["fn"]
            s["log_prob"] = fn.log_prob(s["value"])
            log_q[n] = self._per_point(n, s, k, b)
        log_prior: dict[str, Tensor] = {}
        log_lik = torch.zeros((), dtype=x.dtype, device=x.device)
        for n, s in _sample_sites(model):
            s["log_prob"] = s["fn"].log_prob(s["value"])
            term = self._per_point(n, s, k, b)
            if s["is_observed"]:
                log_lik = log_lik + term
            else:
                log_prior[n] = term
        z = {n: s["value"] for n, s in guide_sites}
        return LogWeightTerms(log_lik.expand(k, b), log_prior, log_q, z)

    # --- densities for the diagnostics ----------------------------------------------------
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x) of the guide's latent site, when it is a diagonal Normal, ``[B, d]``."""
        x = self._cast(x)
        self._inspect(x)
        if len(self.latent_sites) != 1:
            raise NoPosterior(f"posterior(x): the guide has {len(self.latent_sites)} latent sites; "
                            "density diagnostics read one")
        site = self.latent_sites[0]
        trace = self.pyro.poutine.trace(self.guide_fn).get_trace(x)
        loc, scale = _normal_parts(trace.nodes[site]["fn"], site)
        return DiagonalGaussian(loc, 2.0 * torch.log(scale))

    def decode_mean(self, z: Tensor) -> Tensor:
        """E[x | z] of the observed site, for z ``[n, d]``: ``[n, D]``."""
        if self.probe is None:
            raise RuntimeError("decode_mean: call log_weights or posterior on data first")
        x = self.probe.expand(z.shape[0], -1)
        conditioned = self.pyro.poutine.condition(self.model_fn, data={self.latent_sites[0]: z})
        trace = self.pyro.poutine.trace(conditioned).get_trace(x)
        observed = [s for n, s in _sample_sites(trace) if s["is_observed"] and n not in self.latent_sites]
        return observed[0]["fn"].mean.reshape(z.shape[0], -1)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)


def from_pyro(model: Callable[[Tensor], Any], guide: Callable[[Tensor], Any], *,
              encoder: nn.Module | None = None, decoder: nn.Module | None = None, data_plate: str = "data",
              image_shape: tuple[int, ...] | None = None, name: str = "pyro model") -> PyroModel:
    """Wrap a Pyro ``model(x)`` / ``guide(x)`` pair; ``encoder`` / ``decoder``: the nn.Modules
    holding the guide's and the model's parameters (for training and the DReG / STL split)."""
    return PyroModel(model, guide, encoder=encoder, decoder=decoder, data_plate=data_plate,
                     image_shape=image_shape, name=name)
