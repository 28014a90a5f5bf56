"""Deterministic building blocks shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def mlp(in_dim: int, hidden: Sequence[int], act: str) -> tuple[nn.Sequential, int]:
    """Linear + activation per hidden size; returns the stack and its output width."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), activation(act)]
        d = h
    return nn.Sequential(*layers), d


class GaussianHead(nn.Module):
    """Maps features to (mean, log-variance) of a diagonal Gaussian with one GEMM."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.linear = nn.Linear(in_dim, 2 * out_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_var = self.linear(h).split(self.out_dim, dim=-1)
        return mean, log_var
