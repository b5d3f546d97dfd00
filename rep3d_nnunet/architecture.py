"""Rep3DUNet: an nnU-Net-compatible U-Net whose encoder stages carry Rep3D (or UX-Net) large-kernel blocks.

Each encoder stage is the plan's strided conv (changes channels and resolution, as in nnU-Net) followed by
``n_blocks_per_stage`` large-kernel blocks; the decoder is dynamic-network-architectures' ``UNetDecoder``, so deep
supervision (``network.decoder.deep_supervision``) and the plan's pool_op_kernel_sizes work as for nnU-Net's own
networks. Usable as ``network_class_name`` in a plans file (``rep3d_nnunet.architecture.Rep3DUNet``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import (
    convert_conv_op_to_dim,
    maybe_convert_scalar_to_list,
)
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from .backend_choice import adopt as adopt_conv_backend_decisions
from .blocks import Rep3DBlock, UXNetBlock
from .config import BLOCK_TYPES
from .kernel_geometry import fft_kernel_spectrum_floats


def _per_stage(value, n_stages: int, name: str) -> list:
    values = [value] * n_stages if not isinstance(value, (list, tuple)) else list(value)
    if len(values) != n_stages:
        raise ValueError(f"{name} must have one entry per stage ({n_stages}), got {len(values)}: {values}.")
    return values


class Rep3DEncoder(nn.Module):
    """Encoder with the attributes nnU-Net's ``UNetDecoder`` reads (output_channels, strides, kernel_sizes, ops).

    Shapes:
        [N, C_in, *patch] -> list of skips, stage s: [N, features_per_stage[s], *patch / prod(strides[:s+1])]
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Sequence[int],
        conv_op: type[nn.Module],
        kernel_sizes: Sequence,
        strides: Sequence,
        large_kernel_sizes: Sequence[Sequence[int]],
        n_blocks_per_stage: int | Sequence[int] = 2,
        n_conv_per_stage: int | Sequence[int] = 1,
        conv_bias: bool = False,
        norm_op: type[nn.Module] | None = None,
        norm_op_kwargs: dict | None = None,
        dropout_op: type[nn.Module] | None = None,
        dropout_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = None,
        nonlin_kwargs: dict | None = None,
        block: str = "rep3d",
        stage_spacings: Sequence[Sequence[float]] | None = None,
        return_skips: bool = True,
        block_layer_scale: float | None = None,
        n_residual_blocks_per_stage: Sequence[int] | None = None,
        block_pointwise: bool = False,
        **conv_kwargs,
    ):
        super().__init__()
        if block not in BLOCK_TYPES:
            raise ValueError(f"Unknown block type {block!r}; allowed values are {', '.join(BLOCK_TYPES)}.")
        dim = convert_conv_op_to_dim(conv_op)
        features_per_stage = _per_stage(features_per_stage, n_stages, "features_per_stage")
        kernel_sizes = [maybe_convert_scalar_to_list(conv_op, k) for k in _per_stage(kernel_sizes, n_stages, "kernel_sizes")]
        strides = [maybe_convert_scalar_to_list(conv_op, s) for s in _per_stage(strides, n_stages, "strides")]
        large_kernel_sizes = _per_stage(large_kernel_sizes, n_stages, "large_kernel_sizes")
        n_blocks_per_stage = _per_stage(n_blocks_per_stage, n_stages, "n_blocks_per_stage")
        n_conv_per_stage = _per_stage(n_conv_per_stage, n_stages, "n_conv_per_stage")
        spacings = _per_stage(stage_spacings, n_stages, "stage_spacings") if stage_spacings is not None else [None] * n_stages

        norm_nonlin = (conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)
        self.stem = None
        if n_residual_blocks_per_stage is not None:
            # nnU-Net's residual encoder (ResEnc plans): a stem at full resolution, then per stage residual blocks
            # whose first one strides (dynamic-network-architectures' ResidualEncoder)
            n_residual_blocks_per_stage = _per_stage(n_residual_blocks_per_stage, n_stages,
                                                     "n_residual_blocks_per_stage")
            self.stem = StackedConvBlocks(1, conv_op, input_channels, features_per_stage[0], kernel_sizes[0], 1,
                                          *norm_nonlin)
            input_channels = features_per_stage[0]
        stages = []
        for s in range(n_stages):
            if self.stem is None:
                downsample = StackedConvBlocks(n_conv_per_stage[s], conv_op, input_channels, features_per_stage[s],
                                               kernel_sizes[s], strides[s], *norm_nonlin)
            else:
                downsample = StackedResidualBlocks(n_residual_blocks_per_stage[s], conv_op, input_channels,
                                                   features_per_stage[s], kernel_sizes[s], strides[s], *norm_nonlin,
                                                   block=BasicBlockD)
            large_blocks = [
                self._make_block(block, features_per_stage[s], large_kernel_sizes[s], dim, norm_op, norm_op_kwargs,
                                 conv_bias, spacings[s], block_layer_scale, block_pointwise, conv_kwargs)
                for _ in range(n_blocks_per_stage[s])
            ]
            stages.append(nn.Sequential(downsample, *large_blocks))
            input_channels = features_per_stage[s]

        self.stages = nn.Sequential(*stages)
        self.output_channels = features_per_stage
        self.strides = strides
        self.kernel_sizes = kernel_sizes
        self.return_skips = return_skips
        # read by UNetDecoder
        self.conv_op = conv_op
        self.norm_op = norm_op
        self.norm_op_kwargs = norm_op_kwargs
        self.nonlin = nonlin
        self.nonlin_kwargs = nonlin_kwargs
        self.dropout_op = dropout_op
        self.dropout_op_kwargs = dropout_op_kwargs
        self.conv_bias = conv_bias

    @staticmethod
    def _make_block(block, channels, kernel_size, dim, norm_op, norm_op_kwargs, conv_bias, spacing, layer_scale,
                    pointwise, conv_kwargs):
        common = dict(norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, bias=conv_bias, spacing=spacing, **conv_kwargs)
        if block == "uxnet":
            return UXNetBlock(channels, kernel_size, dim, **common)
        return Rep3DBlock(channels, kernel_size, dim, layer_scale_init=layer_scale, pointwise=pointwise, **common)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips if self.return_skips else skips[-1]

    def _blocks_with_input_sizes(self, input_size: Sequence[int]):
        """(large-kernel block, its spatial input size) for every block, stage by stage."""
        for stage, stride in zip(self.stages, self.strides):
            input_size = [i // s for i, s in zip(input_size, stride)]
            for block in stage[1:]:
                yield block, input_size

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Voxels of all encoder feature maps for one sample: nnU-Net's measure, which its planners scale to GB.

        The FFT workspaces are float32 memory of another kind (transient, part of it independent of the batch):
        ``fft_workspace``.
        """
        output = np.int64(0)
        if self.stem is not None:
            output += self.stem.compute_conv_feature_map_size(input_size)
        for stage, stride in zip(self.stages, self.strides):
            output += stage[0].compute_conv_feature_map_size(input_size)
            input_size = [i // s for i, s in zip(input_size, stride)]
            for block in stage[1:]:
                output += block.compute_conv_feature_map_size(input_size)
        return output

    def fft_workspace(self, input_size: Sequence[int]) -> tuple[int, int]:
        """Float32 elements of the largest FFT workspace: (per sample, once per batch: the kernel spectra).

        An FFT workspace lives only while its layer runs, so only the largest one counts; at batch N it holds
        ``N * per_sample + once`` elements (``kernel_geometry.fft_workspace_voxels``, ``fft_kernel_spectrum_floats``).
        """
        best = (0, 0)
        for block, size in self._blocks_with_input_sizes(input_size):
            total = int(block.conv.fft_workspace_size(size))
            if total:
                once = block.conv.channels * fft_kernel_spectrum_floats(size, block.conv.kernel_size)
                best = max(best, (total - once, once), key=lambda parts: parts[0] + parts[1])
        return best


class Rep3DUNet(nn.Module):
    """U-Net with Rep3D large-kernel encoder stages and nnU-Net's decoder.

    Args:
        input_channels, num_classes: as in nnU-Net's architectures.
        n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage_decoder, conv_bias, norm_op,
            norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs: the plan's topology.
        large_kernel_sizes: odd large kernel per stage and axis (``config.stage_kernel_sizes`` derives it).
        n_blocks_per_stage: large-kernel blocks per encoder stage (paper: 2).
        n_conv_per_stage: strided/channel-changing convs at the start of each stage.
        block: ``rep3d`` or ``uxnet``.
        modulation, generator_depth, generator_kernel, small_kernel, csla_scales: see ``blocks.ModulatedDepthwiseConv``.
        stage_spacings: voxel spacing of each stage for a spacing-aware prior, or None.
        conv_backend: ``auto``, ``direct`` or ``fft``.
        block_layer_scale: None: the authors' plain Rep3D blocks; a number: residual blocks whose per-channel scale
            starts there (see ``blocks.Rep3DBlock``).
        kernel_init: ``default`` or ``modulated`` (see ``blocks.ModulatedDepthwiseConv``).
        block_pointwise: a 1x1 convolution after each Rep3D block's nonlinearity (see ``blocks.Rep3DBlock``).
        n_residual_blocks_per_stage: a ResEnc plan's residual blocks per stage: the encoder keeps nnU-Net's residual
            encoder (stem, residual blocks, the first one strided) and adds the large-kernel blocks after each stage's;
            None: ``n_conv_per_stage`` plain convolutions per stage.
        deep_supervision: one output per decoder resolution (highest first), as nnU-Net expects.
        deploy: build the folded form directly (plain kernels, no generator).
        conv_backend_decisions: the large-kernel backend decisions recorded with the model (an export's plans carry
            them here): adopted for the devices this machine has (``backend_choice.adopt``).

    Shapes:
        [N, input_channels, *patch] -> [N, num_classes, *patch] (or a list over scales with deep supervision)
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Sequence[int],
        conv_op: type[nn.Module],
        kernel_sizes: Sequence,
        strides: Sequence,
        num_classes: int,
        large_kernel_sizes: Sequence[Sequence[int]],
        n_conv_per_stage_decoder: int | Sequence[int] = 2,
        n_blocks_per_stage: int | Sequence[int] = 2,
        n_conv_per_stage: int | Sequence[int] = 1,
        conv_bias: bool = False,
        norm_op: type[nn.Module] | None = None,
        norm_op_kwargs: dict | None = None,
        dropout_op: type[nn.Module] | None = None,
        dropout_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = None,
        nonlin_kwargs: dict | None = None,
        deep_supervision: bool = False,
        block: str = "rep3d",
        modulation: str = "lrbm",
        generator_depth: int = 2,
        generator_kernel: int = 7,
        small_kernel: int = 3,
        csla_scales: Sequence[float] = (1.0, 1.0),
        stage_spacings: Sequence[Sequence[float]] | None = None,
        conv_backend: str = "auto",
        block_layer_scale: float | None = None,
        kernel_init: str = "default",
        n_residual_blocks_per_stage: Sequence[int] | None = None,
        block_pointwise: bool = False,
        deploy: bool = False,
        conv_backend_decisions: dict | None = None,
    ):
        super().__init__()
        adopt_conv_backend_decisions(conv_backend_decisions)
        self.encoder = Rep3DEncoder(
            input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, large_kernel_sizes,
            n_blocks_per_stage, n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
            nonlin, nonlin_kwargs, block=block, stage_spacings=stage_spacings, block_layer_scale=block_layer_scale,
            n_residual_blocks_per_stage=n_residual_blocks_per_stage, block_pointwise=block_pointwise,
            modulation=modulation, generator_depth=generator_depth, generator_kernel=generator_kernel,
            small_kernel=small_kernel, csla_scales=tuple(csla_scales), backend=conv_backend, kernel_init=kernel_init,
            deploy=deploy,
        )
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Voxels of all feature maps for one sample, nnU-Net's measure (``planning.network_memory`` adds the FFT
        workspace on the same scale)."""
        self._check_size(input_size)
        return self.encoder.compute_conv_feature_map_size(input_size) + self.decoder.compute_conv_feature_map_size(input_size)

    def fft_workspace(self, input_size: Sequence[int]) -> tuple[int, int]:
        """Float32 elements of the largest FFT workspace, (per sample, once per batch): see ``Rep3DEncoder``."""
        self._check_size(input_size)
        return self.encoder.fft_workspace(input_size)

    def _check_size(self, input_size: Sequence[int]) -> None:
        if len(input_size) != convert_conv_op_to_dim(self.encoder.conv_op):
            raise ValueError(f"Give the spatial input size only (no batch/channel axes), got {tuple(input_size)}.")

    @staticmethod
    def initialize(module: nn.Module) -> None:
        # nnU-Net's He init for the plain convs; ModulatedDepthwiseConv holds raw Parameters, which it leaves alone.
        InitWeights_He(1e-2)(module)
