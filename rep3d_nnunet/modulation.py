"""The learned spatial prior of Rep3D ("LRBM") that shapes the updates of a large depthwise kernel.

A large kernel W of shape [C, 1, *k] is used as W_eff = W * M. The mask M is built from a distance-decay prior

    d(i) = || (i - c) * s ||_2,   P(i) = beta / (d(i) + beta),   beta = softplus(raw) (1 at initialisation)

and, in ``lrbm`` mode, a small depthwise generator f: M = P + f(P). Because dW = M * dW_eff, the mask acts as a
per-tap learning rate: taps near the centre learn fast, peripheral taps slowly (paper, section 3).

Modes (``MODULATION_MODES``):
    ``lrbm``  M = P + f(P), learnable beta and generator (the method).
    ``fixed`` M = P with beta frozen at 1 ("Rep3D (Fixed Prior)").
    ``none``  M = 1, a plain large kernel ("Vanilla Rep").
    ``csla``  no mask; a parallel small kernel branch instead (handled by the conv in ``blocks``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import depthwise_conv, fan_out_conv

MODULATION_MODES = ("lrbm", "fixed", "none", "csla")
GENERATOR_DEPTHS = (1, 2, 3)
GENERATOR_KERNELS = (1, 3, 5, 7)
# softplus(_BETA_INIT_RAW) == 1: the authors' code uses 1 / (1 + d); the paper's "beta = 0" would make P == 0.
_BETA_INIT_RAW = math.log(math.e - 1.0)


def check_modulation_mode(mode: str) -> str:
    if mode not in MODULATION_MODES:
        raise ValueError(f"Unknown modulation mode {mode!r}; allowed values are {', '.join(MODULATION_MODES)}.")
    return mode


def check_generator(depth: int, generator_kernel: int) -> None:
    """Raises ValueError naming the allowed values if the LRBM generator's depth or kernel is not allowed."""
    if depth not in GENERATOR_DEPTHS:
        raise ValueError(f"Generator depth {depth!r} is not allowed; allowed values are {GENERATOR_DEPTHS}.")
    if generator_kernel not in GENERATOR_KERNELS:
        raise ValueError(f"Generator kernel {generator_kernel!r} is not allowed; allowed values are {GENERATOR_KERNELS}.")


def distance_from_centre(kernel_size: Sequence[int], spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Euclidean distance of every kernel tap from the centre tap.

    Args:
        kernel_size: odd size per axis, e.g. (5, 21, 21).
        spacing: optional voxel spacing per axis (e.g. (3.0, 0.8, 0.8) mm). Distances are then measured in
            millimetres divided by the finest spacing, so the prior is isotropic in physical space while the
            finest axis keeps index units (and beta = 1 keeps its meaning).

    Returns:
        float32 tensor of shape ``kernel_size``; 0 at the centre.
    """
    if spacing is None:
        scale = [1.0] * len(kernel_size)
    else:
        if len(spacing) != len(kernel_size) or any(s <= 0 for s in spacing):
            raise ValueError(f"Spacing {tuple(spacing)} must have one positive value per kernel axis {tuple(kernel_size)}.")
        finest = min(spacing)
        scale = [s / finest for s in spacing]
    axes = [(torch.arange(k, dtype=torch.float32) - k // 2) * s for k, s in zip(kernel_size, scale)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g * g for g in grids))


class DistancePrior(nn.Module):
    """P(i) = beta / (d(i) + beta): 1 at the centre, strictly decreasing with distance.

    Args:
        kernel_size: odd size per axis.
        spacing: optional voxel spacing per axis (see ``distance_from_centre``).
        learnable_beta: beta = softplus(raw) is a Parameter (``lrbm``); otherwise a buffer fixed at 1 (``fixed``).

    Shapes:
        forward() -> [*kernel_size]
    """

    def __init__(self, kernel_size: Sequence[int], spacing: Sequence[float] | None = None, learnable_beta: bool = True):
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        # Derived from the configuration, so not saved: a state dict stays valid if the formula's units change.
        self.register_buffer("distance", distance_from_centre(self.kernel_size, spacing), persistent=False)
        raw = torch.tensor(_BETA_INIT_RAW)
        if learnable_beta:
            self.beta_raw = nn.Parameter(raw)
        else:
            self.register_buffer("beta_raw", raw)

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.beta_raw)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        beta = self.beta if dtype is None else F.softplus(self.beta_raw.to(dtype))
        distance = self.distance if dtype is None else self.distance.to(dtype)
        return beta / (distance + beta)


class KernelLayerNorm(nn.Module):
    """Layer norm over a kernel's spatial extent, separately per channel, with per-channel affine terms.

    The authors normalise a single channel with LayerNorm, which returns its bias only (a dead generator);
    normalising over the taps of each channel keeps the spatial pattern.

    Shapes:
        [1, C, *k] -> [1, C, *k]
    """

    def __init__(self, channels: int, init_gain: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), float(init_gain)))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # group_norm with one group per channel == normalisation over the spatial taps of each channel.
        return F.group_norm(x, x.shape[1], self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class LRBMGenerator(nn.Module):
    """f(P) = Norm_L(DConv_L(... sigmoid(Norm_1(DConv_1(P))) ...)), paper eq. 15.

    Each DConv is depthwise over the C channels with "same" padding; its kernel is ``generator_kernel`` per axis,
    capped by the large kernel's own size (a 1x21x21 kernel gets a 1x7x7 generator). The last norm's gain starts
    at 0, so f(P) == 0 and M == P at initialisation: the generator learns deviations from the prior. As with any
    zero-initialised gate, only that last norm receives a gradient on the very first step; the layers before it
    do as soon as the gain has moved.

    Args:
        channels: C, the large kernel's channels.
        kernel_size: the large kernel's odd size per axis.
        depth: number of DConv+Norm layers, 1..3.
        generator_kernel: 1, 3, 5 or 7.

    Shapes:
        forward(prior [*k]) -> [C, 1, *k]
    """

    def __init__(self, channels: int, kernel_size: Sequence[int], depth: int = 2, generator_kernel: int = 7):
        super().__init__()
        check_generator(depth, generator_kernel)
        self.channels = channels
        dim = len(kernel_size)
        conv_op = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        taps = tuple(min(generator_kernel, k) for k in kernel_size)
        self.convs = nn.ModuleList(
            conv_op(channels, channels, taps, padding=tuple(t // 2 for t in taps), groups=channels) for _ in range(depth)
        )
        self.norms = nn.ModuleList(
            KernelLayerNorm(channels, init_gain=0.0 if i == depth - 1 else 1.0) for i in range(depth)
        )

    def forward(self, prior: torch.Tensor) -> torch.Tensor:
        x = prior[None, None]  # [1, 1, *k]: every filter of the first conv reads the same prior
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            # both ops pick their backend: on CPU a 7^3 conv over a 21^3 kernel is ~10x faster through FFTs
            conv_op = fan_out_conv if i == 0 else depthwise_conv
            x = norm(conv_op(x, conv.weight.to(x.dtype), conv.bias.to(x.dtype)))
            if i < len(self.convs) - 1:
                x = torch.sigmoid(x)
        return x.transpose(0, 1)


class KernelModulation(nn.Module):
    """Computes the mask M for one large kernel; only exists in the ``lrbm`` and ``fixed`` modes.

    Args:
        channels: C of the kernel.
        kernel_size: odd size per axis.
        mode: ``lrbm`` or ``fixed``.
        generator_depth, generator_kernel: see ``LRBMGenerator`` (``lrbm`` only).
        spacing: optional voxel spacing of the stage (see ``distance_from_centre``).

    Shapes:
        forward() -> [C, 1, *k] (``lrbm``) or [1, 1, *k] (``fixed``), broadcastable against W [C, 1, *k].
    """

    def __init__(
        self,
        channels: int,
        kernel_size: Sequence[int],
        mode: str = "lrbm",
        generator_depth: int = 2,
        generator_kernel: int = 7,
        spacing: Sequence[float] | None = None,
    ):
        super().__init__()
        if mode not in ("lrbm", "fixed"):
            raise ValueError(f"KernelModulation supports the modes 'lrbm' and 'fixed', not {mode!r}.")
        self.mode = mode
        self.prior = DistancePrior(kernel_size, spacing, learnable_beta=mode == "lrbm")
        self.generator = (
            LRBMGenerator(channels, kernel_size, generator_depth, generator_kernel) if mode == "lrbm" else None
        )

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The mask, computed in float32 (or ``dtype``) even under autocast: it scales every kernel tap.

        Args:
            dtype: compute dtype; float64 makes the result independent of how many threads the reductions use.
        """
        device_type = self.prior.distance.device.type
        with torch.autocast(device_type, enabled=False):
            prior = self.prior(dtype)
            if self.generator is None:
                return prior[None, None]
            return prior[None, None] + self.generator(prior)
