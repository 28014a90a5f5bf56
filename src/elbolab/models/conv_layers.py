"""Convolutional building blocks of the VampPrior paper's conv and PixelCNN models.

Images travel flat between modules (``[..., D]``, as the data and the VampPrior's
pseudo-inputs do) and are reshaped to ``[N, 1, H, W]`` only inside a convolutional stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis of length ``n``."""
    return (n + 2 * padding - kernel) // stride + 1


class GatedConv2d(nn.Module):
    """h(x) * sigmoid(g(x)) with two convolutions: the gated dense layer's convolutional twin."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.h = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)
        self.g = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * self.g(x).sigmoid()


class ConvFeatures(nn.Module):
    """Flat images ``[..., H*W]`` -> gated convolutions -> flat features ``[..., out_features]``.

    ``layers`` lists (out channels, kernel, stride) per layer; padding is kernel // 2, so a
    stride-2 layer halves each side (rounding up), as in the authors' encoders.
    """

    def __init__(self, image_shape: tuple[int, int], layers: Sequence[tuple[int, int, int]]) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        h, w = self.image_shape
        blocks, c = [], 1
        for out, kernel, stride in layers:
            blocks.append(GatedConv2d(c, out, kernel, stride, kernel // 2))
            h, w = conv_out(h, kernel, stride, kernel // 2), conv_out(w, kernel, stride, kernel // 2)
            c = out
        self.body = nn.Sequential(*blocks)
        self.out_features = c * h * w

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        h = self.body(x.reshape(-1, 1, *self.image_shape))
        return h.reshape(*lead, self.out_features)


def causal_mask(kernel: int, mask_type: str) -> Tensor:
    """``[kernel, kernel]`` ones on the taps a masked convolution keeps: the rows above the
    centre and the pixels left of it (type A), and also the centre itself (type B)."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask type must be 'A' or 'B', got {mask_type!r}")
    mask = torch.ones(kernel, kernel)
    c = kernel // 2
    mask[c, c + (mask_type == "B"):] = 0
    mask[c + 1:] = 0
    return mask


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels before the output's in raster order (van den Oord
    et al. 2016): type A excludes the centre pixel (the first layer, on the image), type B
    includes it (later layers, whose centre already excludes it). Every input channel is
    masked alike, as in the VampPrior code. The mask multiplies the weight in ``forward``,
    so a masked tap has no effect and gets a zero gradient whatever the optimizer does."""

    def __init__(self, mask_type: str, in_channels: int, out_channels: int, kernel: int, padding: int,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel, 1, padding, bias=bias)
        self.mask_type = mask_type
        self.register_buffer("mask", causal_mask(kernel, mask_type), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)
