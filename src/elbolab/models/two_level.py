"""Two stochastic layers, written once: p(z2) p(z1 | z2) p(x | z1 [, z2]) and a q that draws one
layer from x and the other given x and it.

Two orders of q share this code:

- top-down, q(z2 | x) q(z1 | x, z2): the VampPrior paper's models (hierarchical,
  conv_hierarchical, pixel_hierarchical), whose decoder reads both layers;
- bottom-up, q(z1 | x) q(z2 | z1): the IWAE paper's two-layer model, whose decoder reads z1.

A model builds its networks and says which order it is; the sampling, log weights, flat latent,
per-point posterior, conditional means, reconstructions and samples are all here, so every
diagnostic and flow posterior works on every two-level model alike. The networks:

- ``q_z1``, ``q_z2``: :class:`~.layers.GaussianNet` (body, head); the first-sampled one reads
  x, the other reads (x, the first layer's sample) or, with ``second_reads_x`` False, the sample;
- ``q_flow1``, ``q_flow2``: the normalizing flow after each Gaussian of q, or None;
- ``p_z1``: z2 -> Gaussian; the prior ``self.prior`` is on z2;
- :meth:`decoder_features`: (z1, z2, x) -> what the likelihood's head reads.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor, nn

from ..config import PosteriorConfig
from ..distributions import DiagonalGaussian
from ..flows import Flow, log_prob_fixed, make_flow, push_forward
from ..priors import Prior
from .base import LatentVariableModel, LogWeightTerms
from .layers import GaussianNet, draw, with_detached_params

LAYERS = ("z1", "z2")


class TwoLevelVAE(LatentVariableModel):
    """The shared two-level model; subclasses build the networks listed in the module docstring."""

    prior_layer = "z2"
    #: the layer q draws first, from x alone: "z2" (top-down) or "z1" (bottom-up)
    first = "z2"
    #: whether the second layer's q reads x besides the first layer's sample
    second_reads_x = True
    #: without a flow, evaluate the first layer's log q after drawing the second: the order in
    #: which autograd sums gradients, hence a fixed-seed run's float rounding, is this model's own
    first_log_q_last = False
    #: whether p(x | .) reads z2 too; the decoder's input (:meth:`sample_latents`) is then z1 ++ z2, else z1
    decoder_reads_z2 = True

    q_z1: GaussianNet
    q_z2: GaussianNet
    q_flow1: Flow | None
    q_flow2: Flow | None
    p_z1: nn.Module

    @property
    def second(self) -> str:
        return "z1" if self.first == "z2" else "z2"

    @abstractmethod
    def decoder_features(self, z1: Tensor, z2: Tensor, x: Tensor | None = None) -> Tensor:
        """What the likelihood's head reads for p(x | z1, z2), ``[..., B, H]``; ``x`` ``[B, D]`` is
        the observed image, read only by an autoregressive decoder (teacher forcing)."""

    def make_flows(self, posterior: PosteriorConfig | None, features: dict[str, int]) -> None:
        """q's flow of each layer, made in ``features`` order (layer -> width of the features its
        Gaussian's head reads, on which the flow is conditioned)."""
        for name, width in features.items():
            setattr(self, f"q_flow{name[1]}", make_flow(posterior, self.latent_dims[LAYERS.index(name)], width))

    def attach(self, prior: Prior, posterior: PosteriorConfig | None) -> None:
        """Take the prior on z2, once every network and flow is made."""
        self.attach_prior(prior, posterior, self.q_flow1, self.q_flow2)

    # --- the networks by role -------------------------------------------------------
    def _q(self, name: str) -> GaussianNet:
        return self.q_z1 if name == "z1" else self.q_z2

    def _flow(self, name: str) -> Flow | None:
        return self.q_flow1 if name == "z1" else self.q_flow2

    def _second_inputs(self, x: Tensor, z_first: Tensor) -> tuple[Tensor, ...]:
        return (x, z_first) if self.second_reads_x else (z_first,)

    def decode(self, z1: Tensor, z2: Tensor, x: Tensor | None = None) -> Tensor:
        """Likelihood parameters of p(x | z1, z2), ``[..., P * data_dim]`` (``x`` as in :meth:`decoder_features`)."""
        return self.likelihood.head(self.decoder_features(z1, z2, x))

    def _decoder_input(self, z1: Tensor, z2: Tensor) -> Tensor:
        return torch.cat([z1, z2], dim=-1) if self.decoder_reads_z2 else z1

    def _decoder_latents(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.decoder_reads_z2:
            z1, z2 = z.split(self.latent_dims, dim=-1)
            return z1, z2
        return z, None

    # --- the protocol -------------------------------------------------------------
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q of the first-sampled layer given x (with a flow: the Gaussian before it)."""
        return DiagonalGaussian(*self._q(self.first)(x))

    def sample_posterior(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False,
                         generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        a, b = self.first, self.second
        net_a, net_b, flow_a, flow_b = self._q(a), self._q(b), self._flow(a), self._flow(b)
        ha = net_a.body(x)
        qa = DiagonalGaussian(*net_a.head(ha))
        za0 = qa.rsample(k, generator)  # [K, B, D]
        late = self.first_log_q_last and flow_a is None
        za, log_qa = (za0, None) if late else push_forward(qa, za0, flow_a, ha)
        inputs = self._second_inputs(x, za)
        hb = net_b.body(*inputs)
        qb = DiagonalGaussian(*net_b.head(hb))
        zb0 = draw(qb.mean, qb.log_var, generator)  # [K, B, D]
        zb, log_qb = push_forward(qb, zb0, flow_b, hb)
        if late:
            log_qa = qa.log_prob(za0)
        if stop_posterior_grad:  # x carries no gradient: the first layer's detached outputs are detached weights
            log_qa = log_prob_fixed(qa.detach(), za0, za, flow_a, ha.detach())
            hb = with_detached_params(net_b.body, *inputs)
            qb = DiagonalGaussian(*with_detached_params(net_b.head, hb))
            log_qb = log_prob_fixed(qb, zb0, zb, flow_b, hb)
        z, log_q = {a: za, b: zb}, {a: log_qa, b: log_qb}
        return {n: z[n] for n in LAYERS}, {n: log_q[n] for n in LAYERS}

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        z, log_q = self.sample_posterior(x, k, stop_posterior_grad=stop_posterior_grad)
        z1, z2 = z["z1"], z["z2"]
        log_p2 = self.prior.log_prob(z2)
        log_p1 = DiagonalGaussian(*self.p_z1(z2)).log_prob(z1)
        log_px = self.likelihood.log_prob_from_features(x, self.decoder_features(z1, z2, x))
        return LogWeightTerms(log_px, {"z1": log_p1, "z2": log_p2}, log_q, z)

    # --- the flat latent [z1, z2] -----------------------------------------------------
    def log_p_z(self, z: Tensor) -> Tensor:
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.prior.log_prob(z2) + DiagonalGaussian(*self.p_z1(z2)).log_prob(z1)

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.likelihood.log_prob_from_features(x, self.decoder_features(z1, z2, x))

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z2 = self.prior.sample(n, generator)
        return torch.cat([draw(*self.p_z1(z2), generator=generator), z2], dim=-1)

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.decode_sample(self._decoder_input(*z.split(self.latent_dims, dim=-1)), generator)

    def local_posterior(self, x: Tensor) -> dict[str, Tensor]:
        """The first layer's q mean and log-variance, and per-point shifts (zero: the encoder) of
        the mean and log-variance that the second layer's q computes; its dependence on the
        first layer's sample stays."""
        self.refuse_flow_local()
        q = self.posterior(x)
        zeros = q.mean.new_zeros(*q.mean.shape[:-1], self.latent_dims[LAYERS.index(self.second)])
        b = self.second
        return {"mean": q.mean, "log_var": q.log_var, f"{b}.mean_shift": zeros, f"{b}.log_var_shift": zeros.clone()}

    def log_weights_local(self, x: Tensor, k: int, params: dict[str, Tensor]) -> Tensor:
        a, b = self.first, self.second
        qa = DiagonalGaussian(params["mean"], params["log_var"])
        za = qa.rsample(k)  # [K, B, D]
        m, lv = self._q(b)(*self._second_inputs(x, za))
        qb = DiagonalGaussian(m + params[f"{b}.mean_shift"], lv + params[f"{b}.log_var_shift"])
        zb = draw(qb.mean, qb.log_var)
        z, q = {a: za, b: zb}, {a: qa, b: qb}
        log_joint = self.log_joint(x, torch.cat([z["z1"], z["z2"]], dim=-1))
        return log_joint - q["z1"].log_prob(z["z1"]) - q["z2"].log_prob(z["z2"])

    def conditional_means(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """The first layer's E_q[. | x] ``[B, D]`` and the second layer's q mean at k draws of the
        first ``[K, B, D]`` (its E_q[. | x] is their average, with no closed form), bottom layer
        first. With a flow: draws of both layers."""
        if self.posterior_flow != "none":
            return self.sampled_means(x, k, generator)
        q = self.posterior(x)
        second = self._q(self.second)(*self._second_inputs(x, q.rsample(k, generator)))[0]
        means = {self.first: q.mean, self.second: second}
        return [means["z1"], means["z2"]]

    def latents_given_top(self, z_top: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z1 ~ p(z1 | z2), returned as the decoder reads it (z1 ++ z2, or z1)."""
        return self._decoder_input(draw(*self.p_z1(z_top), generator=generator), z_top)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.latents_given_top(self.prior.sample(n, generator), generator)

    def decode_mean(self, z: Tensor) -> Tensor:
        """E[x | z] for the decoder's input ``z`` as :meth:`sample_latents` returns it."""
        return self.likelihood.mean(self.decode(*self._decoder_latents(z)))

    def decode_sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x ~ p(x | z) for the decoder's input ``z`` as :meth:`sample_latents` returns it."""
        return self.likelihood.sample(self.decode(*self._decoder_latents(z)), generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoded from q's Gaussian means, each pushed through its layer's flow, if any."""
        means = {}
        for name, inputs in ((self.first, (x,)), (self.second, None)):
            net, flow = self._q(name), self._flow(name)
            h = net.body(*(inputs or self._second_inputs(x, means[self.first])))
            m = net.head(h)[0]
            means[name] = m if flow is None else flow(m, h)[0]
        return self.decode_mean(self._decoder_input(means["z1"], means["z2"]))
