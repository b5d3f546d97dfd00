"""Dual-kernel adapters (DKA) for low-data fine-tuning of a pretrained nnU-Net network, 2D and 3D.

The adapter ("Dual-Kernel Adapter", ICLR 2026, https://openreview.net/forum?id=Z6KGt1veeP): down-projection to d
channels, a large depthwise
kernel for context summed with a small one for detail, GELU, up-projection, residual:

    y = x + Up(GELU(DWConv_large(Down(x)) + DWConv_small(Down(x))))

The two depthwise kernels are one ``ModulatedDepthwiseConv`` in ``csla`` mode: by linearity the sum of the two
branches is one convolution with the merged kernel W_large + pad(W_small), so training runs a single (FFT, for large
kernels) convolution and export folds the pair into one kernel exactly (``reparameterize``). The up-projection starts
at zero, so an inserted adapter is the identity and fine-tuning starts from the pretrained function.

Adapters are inserted after every encoder stage, into the stage's own ``nn.Sequential`` under the name
``dka_adapter``: the source network's state-dict keys stay unchanged (a source checkpoint loads as it is, frozen
weights compare key by key) and the adapters' keys all contain ``.dka_adapter.``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from torch import nn

from .blocks import ModulatedDepthwiseConv
from .kernel_geometry import check_kernel_size, stage_kernel_sizes

ADAPTER_NAME = "dka_adapter"
ADAPTER_KINDS = ("dual", "large", "small", "bottleneck", "none")
HEADS = ("seg_layers", "decoder")
_POINTWISE = {2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class AdapterSettings:
    """What a fine-tuning variant inserts and trains.

    Attributes:
        kind: ``dual`` (large + small depthwise kernels, the paper's DKA), ``large`` or ``small`` (one kernel only),
            ``bottleneck`` (a standard adapter: no spatial kernel), ``none`` (no adapter: linear probing or full
            fine-tuning).
        large_kernel_2d, large_kernel_3d: the large kernel per axis (paper, 2D: 51); capped per stage by the feature
            map as the Rep3D kernels are (``kernel_geometry.stage_kernel_sizes``), 1 on the plan's flat axes.
        small_kernel: the small kernel per axis (paper: 5).
        reduction: d = max(C // reduction, min_hidden) channels inside an adapter on a stage of C channels.
        min_hidden: lower bound of d.
        head: what trains besides the adapters: ``seg_layers`` (the decoder's 1x1 segmentation layers) or
            ``decoder`` (the whole decoder).
        train_backbone: full fine-tuning: everything trains (at the head's learning rate).
    """

    kind: str = "dual"
    large_kernel_2d: int = 51
    large_kernel_3d: int = 31
    small_kernel: int = 5
    reduction: int = 4
    min_hidden: int = 8
    head: str = "seg_layers"
    train_backbone: bool = False

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"Unknown adapter kind {self.kind!r}; allowed values are {', '.join(ADAPTER_KINDS)}.")
        if self.head not in HEADS:
            raise ValueError(f"Unknown head {self.head!r}; allowed values are {', '.join(HEADS)}.")
        for k in (self.large_kernel_2d, self.large_kernel_3d, self.small_kernel):
            check_kernel_size(k, 1)
        if self.reduction < 1 or self.min_hidden < 1:
            raise ValueError(f"reduction and min_hidden must be positive, got {self.reduction}, {self.min_hidden}.")

    def replace(self, **changes) -> "AdapterSettings":
        return dataclasses.replace(self, **changes)

    def large_kernel(self, dim: int) -> int:
        return self.large_kernel_3d if dim == 3 else self.large_kernel_2d


class DualKernelAdapter(nn.Module):
    """x + Up(GELU(DWConv(Down(x)))), DWConv = large + small depthwise kernels (or one of them, or none).

    Args:
        channels: C of the stage.
        hidden: d.
        dim: 2 or 3.
        kind: ``dual``, ``large``, ``small`` or ``bottleneck`` (see ``AdapterSettings``).
        large_kernel: the (capped) large kernel per axis.
        small_kernel: the small kernel per axis (capped by the large one where that is smaller).
        deploy: build the folded form (one merged depthwise kernel).

    Shapes:
        [N, C, *spatial] -> [N, C, *spatial]
    """

    def __init__(self, channels: int, hidden: int, dim: int, kind: str, large_kernel: Sequence[int],
                 small_kernel: int, deploy: bool = False):
        super().__init__()
        if kind not in ADAPTER_KINDS[:4]:
            raise ValueError(f"An adapter is one of {ADAPTER_KINDS[:4]}, got {kind!r}.")
        pointwise = _POINTWISE[dim]
        self.kind = kind
        self.down = pointwise(channels, hidden, 1)
        # the small kernel is capped by the large one per axis (flat axes stay 1)
        small = [min(small_kernel, k) for k in large_kernel]
        if kind == "bottleneck":
            self.spatial = None
        elif kind == "dual":
            # csla: W_large + pad(W_small) in one convolution, merged into one kernel by reparameterize()
            self.spatial = ModulatedDepthwiseConv(hidden, large_kernel, dim, modulation="csla",
                                                  small_kernel=small_kernel, deploy=deploy)
        else:
            self.spatial = ModulatedDepthwiseConv(hidden, large_kernel if kind == "large" else small, dim,
                                                  modulation="none", deploy=deploy)
        self.nonlin = nn.GELU()
        self.up = pointwise(hidden, channels, 1)
        nn.init.zeros_(self.up.weight)  # the identity at insertion: fine-tuning starts from the pretrained function
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.spatial is not None:
            h = self.spatial(h)
        return x + self.up(self.nonlin(h))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        voxels = np.prod(input_size, dtype=np.int64)
        hidden = self.down.out_channels
        return (3 * hidden + self.up.out_channels) * voxels  # down, spatial, GELU, up


def _stage_sequential(stage: nn.Module) -> nn.Sequential:
    """The ``nn.Sequential`` whose output is the stage's output: the stage itself (PlainConvUNet, Rep3DUNet) or its
    ``blocks`` (ResidualEncoderUNet's StackedResidualBlocks)."""
    if isinstance(stage, nn.Sequential):
        return stage
    blocks = getattr(stage, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        return blocks
    raise ValueError(f"Cannot insert adapters into an encoder stage of type {type(stage).__name__}: expected an "
                     f"nn.Sequential or a module with .blocks (dynamic-network-architectures' U-Nets).")


def encoder_stages(network: nn.Module) -> list[nn.Module]:
    encoder = getattr(network, "encoder", None)
    stages = getattr(encoder, "stages", None)
    if stages is None:
        raise ValueError(f"{type(network).__name__} has no encoder.stages: adapters go after the encoder stages of "
                         f"dynamic-network-architectures' U-Nets (PlainConvUNet, ResidualEncoderUNet) and Rep3DUNet.")
    return list(stages)


def insert_adapters(network: nn.Module, settings: AdapterSettings, patch_size: Sequence[int],
                    deploy: bool = False) -> nn.Module:
    """Adds a ``dka_adapter`` at the end of every encoder stage, in place; returns the network.

    Nothing is inserted for ``kind == "none"``. The new modules are on the network's device and dtype.

    Raises:
        ValueError: the network has no encoder stages to adapt, or already has adapters.
    """
    if settings.kind == "none":
        return network
    if has_adapters(network):
        raise ValueError("The network already has adapters.")
    reference = next(network.parameters())
    dim = len(patch_size)
    encoder = network.encoder
    kernels = stage_kernel_sizes(patch_size, [maybe_convert_scalar_to_list(encoder.conv_op, s) for s in encoder.strides],
                                 [maybe_convert_scalar_to_list(encoder.conv_op, k) for k in encoder.kernel_sizes],
                                 settings.large_kernel(dim))
    for index, (stage, kernel) in enumerate(zip(encoder_stages(network), kernels)):
        channels = int(network.encoder.output_channels[index])
        hidden = max(channels // settings.reduction, settings.min_hidden)
        adapter = DualKernelAdapter(channels, hidden, dim, settings.kind, kernel, settings.small_kernel, deploy)
        _stage_sequential(stage).add_module(ADAPTER_NAME, adapter.to(device=reference.device, dtype=reference.dtype))
    return network


def has_adapters(network: nn.Module) -> bool:
    return any(name.endswith(ADAPTER_NAME) for name, _ in network.named_modules())


def is_head_parameter(name: str, head: str) -> bool:
    """Whether a parameter (state-dict name) belongs to the head that fine-tuning trains."""
    if head == "decoder":
        # UNetDecoder keeps a reference to the encoder: its keys repeat under decoder.encoder.*
        return name.startswith("decoder.") and not name.startswith("decoder.encoder.")
    return ".seg_layers." in f".{name}"


def is_adapter_parameter(name: str) -> bool:
    return f".{ADAPTER_NAME}." in f".{name}"
