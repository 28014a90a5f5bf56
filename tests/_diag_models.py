"""Small exact models for the diagnostics tests."""

from __future__ import annotations

import torch
from torch import Tensor

from elbolab.models.linear_gaussian import LinearGaussian


class ReplayModel:
    """``log_weights`` replays a fixed table ``[K_total, N]``; column n belongs to the point
    whose first feature is n, so any batching and chunking sees the same K weights."""

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self.offset = torch.zeros(table.shape[1], dtype=torch.long)

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        idx = x[:, 0].long()
        start = self.offset[idx]
        rows = start[None, :] + torch.arange(k)[:, None]  # [k, B]
        self.offset[idx] += k
        return self.table[rows, idx[None, :].expand(k, -1)]


def orthogonal_linear_gaussian(data_dim: int, latent_dim: int, seed: int = 0) -> LinearGaussian:
    """A linear-Gaussian model whose W has orthogonal columns, with q the exact posterior."""
    m = LinearGaussian(data_dim, latent_dim, noise_std=0.8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    qmat, _ = torch.linalg.qr(torch.randn(data_dim, latent_dim, generator=g, dtype=torch.float64))
    with torch.no_grad():
        m.W.copy_(qmat * torch.linspace(1.0, 2.0, latent_dim, dtype=torch.float64))
    m.set_exact_posterior()
    return m


def data_from(model: LinearGaussian, n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dims[0], generator=g, dtype=torch.float64)
    noise = torch.randn(n, model.data_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return model.decode_mean(z) + torch.exp(0.5 * model.log_noise_var) * noise


def correlated_linear_gaussian() -> LinearGaussian:
    """Columns of W strongly correlated: the posterior is far from diagonal."""
    m = LinearGaussian(8, 3, noise_std=0.8, seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.W[:, 1] = m.W[:, 0] + 0.5 * torch.randn(8, generator=g, dtype=torch.float64)
        m.W[:, 2] = -m.W[:, 0] + 0.5 * torch.randn(8, generator=g, dtype=torch.float64)
    return m


def simulated(m: LinearGaussian, n: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return m.sample_x_given_z(m.sample_z(n, g), g)
