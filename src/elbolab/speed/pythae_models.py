"""The same MLP architecture built with pythae 0.1.2's own classes, for side-by-side timings.

pythae is an optional dependency (``pip install 'elbolab[bench]'``); without it the
benchmark reports elbolab alone. Its encoder/decoder are written the way pythae asks
(``BaseEncoder``/``BaseDecoder`` returning ``ModelOutput``), with pythae's convention of
a sigmoid output read by ``binary_cross_entropy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

PYTHAE_VERSION = "0.1.2"


def available() -> str | None:
    """None when pythae can be used, else the reason it cannot."""
    try:
        from importlib.metadata import version

        import pythae  # noqa: F401

        v = version("pythae")
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"pythae not importable ({type(e).__name__}); pip install 'elbolab[bench]'"
    if v != PYTHAE_VERSION:
        return f"pythae {v} installed; the comparison is defined against {PYTHAE_VERSION}"
    return None


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers)


def build(objective: str, k: int, data_dim: int = 784, hidden: Sequence[int] = (200, 200), latent_dim: int = 50):
    """A pythae VAE (``objective="vae"``) or IWAE with ``k`` samples, on the one-layer MLP."""
    from pythae.models import IWAE, VAE, IWAEConfig, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            BaseEncoder.__init__(self)
            self.body = _mlp([data_dim, *hidden])
            self.embedding = nn.Linear(hidden[-1], latent_dim)
            self.log_var = nn.Linear(hidden[-1], latent_dim)

        def forward(self, x: Tensor):
            h = self.body(x)
            return ModelOutput(embedding=self.embedding(h), log_covariance=self.log_var(h))

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            BaseDecoder.__init__(self)
            self.body = _mlp([latent_dim, *reversed(hidden)])
            self.out = nn.Linear(hidden[0], data_dim)

        def forward(self, z: Tensor):
            return ModelOutput(reconstruction=torch.sigmoid(self.out(self.body(z))))

    common = dict(input_dim=(data_dim,), latent_dim=latent_dim, reconstruction_loss="bce")
    if objective == "iwae":
        return IWAE(IWAEConfig(number_samples=k, **common), encoder=Encoder(), decoder=Decoder())
    return VAE(VAEConfig(**common), encoder=Encoder(), decoder=Decoder())


def train_step(model, optimizer: torch.optim.Optimizer, x: Tensor, repeat: int = 1) -> float:
    """One step as pythae's BaseTrainer takes it (forward, backward, step, ``loss.item()``).

    pythae's VAE draws one sample per image, so its k-sample ELBO is the VAE run on
    the batch repeated ``repeat`` times (the encoder then also runs k times).
    """
    data = x.repeat(repeat, 1) if repeat > 1 else x
    out = model({"data": data})
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    loss = out.loss.item()
    if loss != loss:
        raise ArithmeticError("NaN detected in train loss")
    return loss
