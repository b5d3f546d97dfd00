"""Rep3D building blocks: the modulated large depthwise convolution, the Rep3D block and the UX-Net block.

Every block with a training-only form implements ``reparameterize()`` (fold to plain conv weights, idempotent) and
accepts a ``deploy=True`` flag that builds the folded form directly. Loading a folded state dict into an unfolded
block switches it to the folded form first, because nnU-Net's predictor builds the network once from the plans and
then loads each fold's weights into it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .backend_cost_model import choose_backend
from .eval_cache import CACHE
from .kernel_geometry import check_kernel_size, fft_workspace_voxels
from .modulation import KernelModulation, check_generator, check_modulation_mode
from .ops import apply_prepared_kernel, depthwise_conv, prepare_kernel

_POINTWISE_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
KERNEL_INITS = ("default", "modulated")


# Masks kept per modulated conv in eval mode, one per distinct set of weights: nnU-Net's predictor loads every fold's
# weights before every case, so a 5-fold ensemble (or folds 0-4 and "all") cycles through up to 6 of them.
EVAL_MASKS_KEPT = 8


# What a conv's parameters are. Its state dict records it (``_extra_state``: the index into this tuple) because
# nnU-Net's load_pretrained_weights (-pretrained_weights) keeps only the keys the receiving network has: an LRBM state
# loaded into a vanilla or folded network would otherwise arrive as W alone, silently dropping M from W * M.
KERNEL_STRUCTURES = ("none", "lrbm", "fixed", "csla", "folded")
_STRUCTURE_WORDS = {
    "none": "a plain kernel (vanilla, no modulation)",
    "lrbm": "a kernel W modulated by a mask M (lrbm: learnable beta and an LRBM generator)",
    "fixed": "a kernel W modulated by a mask M (fixed: beta fixed at 1)",
    "csla": "a CSLA pair (a large and a small kernel)",
    "folded": "a plain kernel folded from a trained one (an export: W * M merged into one kernel)",
    "plain": "a plain kernel (a vanilla network's, or an export's folded one)",  # a state without the record
}
# One plain kernel each: the same convolution whichever of them the weights come from or go to.
_PLAIN_STRUCTURES = {"none", "folded", "plain"}


def _has_key_under(state_dict: dict, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)


def _module_name(prefix: str) -> str:
    return prefix[:-1] if prefix.endswith(".") else (prefix or "the network")


class ModulatedDepthwiseConv(nn.Module):
    """Depthwise convolution with a large kernel whose updates are shaped by a modulation mode.

    Training forward: y = depthwise_conv(x, W_eff) with W_eff = W * M (``lrbm``, ``fixed``), W (``none``), or
    aL * W + aS * pad(W_small) + matching bias (``csla``; by linearity one convolution with the merged kernel gives
    exactly the two-branch output and gradients). W_eff is built functionally in every mode, so gradients reach W,
    beta and the generator. Training computes the mask in float32; eval (with or without autograd, compiled or eager)
    computes it in float64 rounded once, so that a folded export, computed by another process with another thread
    count, holds exactly the kernel the trained model applies; eager eval without autograd keeps the mask and the
    transformed kernel until a parameter changes (``eval_cache``).

    Args:
        channels: C (input == output channels).
        kernel_size: odd size per axis, or one int for every axis of a ``dim``-D kernel.
        dim: 2 or 3 spatial dimensions.
        modulation: one of ``lrbm``, ``fixed``, ``none``, ``csla``.
        generator_depth: LRBM generator depth, 1..3.
        generator_kernel: LRBM generator kernel, 1/3/5/7.
        small_kernel: CSLA small branch size per axis (capped by ``kernel_size``; 1 stays 1).
        csla_scales: the constant scales (aL, aS) of the CSLA branches.
        spacing: voxel spacing of this stage, makes the prior isotropic in physical units.
        bias: whether the convolution has a bias.
        backend: ``auto``, ``direct`` or ``fft`` (see ``ops.depthwise_conv``).
        kernel_init: ``default`` (nn.ConvNd's, variance 1 / (3 prod(k))) or ``modulated`` (variance
            1 / (3 sum(M^2)) with M the mask at initialisation: W * M then starts with the output variance the
            default gives an unmodulated kernel, and Adam's steps, about lr per tap whatever the scale, change the
            kernel by the same fraction as they change a small kernel; equal to ``default`` where M = 1).
        deploy: build the folded form (plain kernel W_eff, no generator or small branch).

    Shapes:
        [N, C, *spatial] -> [N, C, *spatial]
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | Sequence[int],
        dim: int = 3,
        modulation: str = "lrbm",
        generator_depth: int = 2,
        generator_kernel: int = 7,
        small_kernel: int = 3,
        csla_scales: tuple[float, float] = (1.0, 1.0),
        spacing: Sequence[float] | None = None,
        bias: bool = True,
        backend: str = "auto",
        kernel_init: str = "default",
        deploy: bool = False,
    ):
        super().__init__()
        if kernel_init not in KERNEL_INITS:
            raise ValueError(f"Unknown kernel_init {kernel_init!r}; allowed values are {', '.join(KERNEL_INITS)}.")
        if dim not in (2, 3):
            raise ValueError(f"Only 2D and 3D convolutions are supported, got dim={dim!r}.")
        self.modulation_mode = check_modulation_mode(modulation)
        self.kernel_size = check_kernel_size(kernel_size, dim)
        check_generator(generator_depth, generator_kernel)
        self.channels = channels
        self.dim = dim
        self.backend = backend
        self.csla_scales = (float(csla_scales[0]), float(csla_scales[1]))
        self.small_kernel_size = tuple(min(k, s) for k, s in zip(self.kernel_size, check_kernel_size(small_kernel, dim)))

        self.weight = nn.Parameter(torch.empty(channels, 1, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.ConvNd's default, fan_in = prod(kernel)
        self.modulation = None
        self.small_weight = None
        self.small_bias = None
        if modulation in ("lrbm", "fixed"):
            self.modulation = KernelModulation(channels, self.kernel_size, modulation, generator_depth,
                                               generator_kernel, spacing)
        elif modulation == "csla":
            self.small_weight = nn.Parameter(torch.empty(channels, 1, *self.small_kernel_size))
            nn.init.kaiming_uniform_(self.small_weight, a=5 ** 0.5)
            self.small_bias = nn.Parameter(torch.zeros(channels)) if bias else None
        if kernel_init == "modulated" and self.modulation is not None:
            with torch.no_grad():
                mask = self.modulation()
                self.weight.mul_(torch.sqrt(mask.new_tensor(float(np.prod(self.kernel_size))) / mask.square().sum()))
        self.is_folded = False
        if deploy:
            self._to_folded_structure()

    # ---- the kernel ----
    def _eval_cacheable(self) -> bool:
        """Eager eval without autograd: the one forward that may keep what it derives from the weights (``eval_cache``).

        Every other forward (training, eval with autograd, compiled eval) computes the same kernel in its graph: the
        cache is Python state that torch.compile cannot trace, and gradients must reach the parameters.
        """
        return not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())

    def mask(self) -> torch.Tensor:
        """M, shape [C or 1, 1, *k]: in training as a training step computes it (float32, also under autocast), in
        eval (compiled or eager, with or without autograd) in float64 rounded once to the weight's dtype.

        The float64 eval mask is what makes an export exact: the generator's norm reductions in float32 depend on the
        thread count (about 5e-9 relative), and nnU-Net's instance norms amplify such differences on near-constant
        tiles (1e-4 in probabilities, measured on a 5-fold tiny model); rounded from float64 the mask is the same
        whatever the thread count, so the folded kernels that ``rep3d-nnunet export`` computes are bit for bit the
        ones ``nnUNetv2_predict`` applies with the training folder. Eager eval without autograd keeps the mask per
        distinct content of the modulation's parameters (``EVAL_MASKS_KEPT`` per conv, in ``eval_cache``), so the
        tiles of a case share it, and reloading the same weights, or switching between the folds of an ensemble,
        finds it again.
        """
        if self.training:
            return self.modulation()
        if not self._eval_cacheable():
            return self._eval_mask()
        tensors = [*self.modulation.parameters(), *self.modulation.buffers()]
        mask = CACHE.lookup(self, "mask", tensors, self.weight.dtype)
        if mask is None:
            mask = CACHE.store(self, "mask", tensors, self._eval_mask(), self.weight.dtype, per_owner=EVAL_MASKS_KEPT)
        return mask

    def _eval_mask(self) -> torch.Tensor:
        return self.modulation(torch.float64).to(self.weight.dtype)

    def train(self, mode: bool = True) -> "ModulatedDepthwiseConv":
        if mode:
            CACHE.release(self)  # training changes the parameters; the cached tensors would only hold memory
        return super().train(mode)

    def effective_weight(self) -> torch.Tensor:
        """W_eff, shape [C, 1, *k]: the kernel the convolution applies."""
        if self.modulation is not None:
            return self.weight * self.mask()
        if self.small_weight is not None:
            scale_large, scale_small = self.csla_scales
            return scale_large * self.weight + scale_small * F.pad(self.small_weight, self._small_padding())
        return self.weight

    def effective_bias(self) -> torch.Tensor | None:
        """Bias of the merged convolution, shape [C] or None."""
        if self.small_bias is not None:
            scale_large, scale_small = self.csla_scales
            return scale_large * self.bias + scale_small * self.small_bias
        return self.bias

    def _small_padding(self) -> list[int]:
        pads = []
        for large, small in reversed(list(zip(self.kernel_size, self.small_kernel_size))):
            pads += [(large - small) // 2] * 2
        return pads

    def small_branch_parameters(self) -> list[nn.Parameter]:
        """The CSLA small branch's parameters, for their own optimizer group (paper Table 8)."""
        return [p for p in (self.small_weight, self.small_bias) if p is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dim + 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"Expected input of shape [N, {self.channels}, {'D, ' if self.dim == 3 else ''}H, W], got {tuple(x.shape)}."
            )
        if not self._eval_cacheable():
            return depthwise_conv(x, self.effective_weight(), self.effective_bias(), backend=self.backend)
        return apply_prepared_kernel(x, self._prepared_kernel(x))  # the same values, the kernel transformed once

    def _prepared_kernel(self, x: torch.Tensor):
        """The kernel transformed for inputs like ``x`` (eval, eager): once per weights and input shape, so the tiles
        and mirror flips of nnU-Net's sliding window share one kernel spectrum (kept in ``eval_cache``)."""
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        condition = (tuple(x.shape[1:]), x.dtype, x.device, autocast, self.backend)
        tensors = [*self.parameters(), *self.buffers()]
        prepared = CACHE.lookup(self, "kernel", tensors, condition)
        if prepared is None:
            CACHE.discard(self, "kernel")  # the old spectrum is freed before the new one is made
            prepared = CACHE.store(self, "kernel", tensors, condition=condition, value=prepare_kernel(
                x, self.effective_weight(), self.effective_bias(), self.backend))
        return prepared

    # ---- folding ----
    def _to_folded_structure(self) -> None:
        self.modulation = None
        self.small_weight = None
        self.small_bias = None
        CACHE.release(self)
        self.is_folded = True

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replaces W by W_eff (and merges the CSLA bias); drops the generator, prior and small branch. Idempotent."""
        if self.is_folded:
            return
        weight, bias = self.effective_weight().clone(), self.effective_bias()
        bias = None if bias is None else bias.clone()
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self._to_folded_structure()

    def structure_name(self) -> str:
        """One of ``KERNEL_STRUCTURES``: the modulation mode, or ``folded``."""
        return "folded" if self.is_folded else self.modulation_mode

    def structure(self) -> str:
        """What the parameters are, in words: ``folded`` (a plain kernel W_deploy), or the training-time form."""
        return _STRUCTURE_WORDS[self.structure_name()]

    def get_extra_state(self) -> torch.Tensor:
        """The structure's index in ``KERNEL_STRUCTURES``, a 0-d int64 tensor (a weights-only load accepts it, and
        nnU-Net's load_pretrained_weights compares its shape like any other entry's)."""
        return torch.tensor(KERNEL_STRUCTURES.index(self.structure_name()))

    def set_extra_state(self, state) -> None:
        """Nothing to set: ``_load_from_state_dict`` has refused any state of another structure."""

    @staticmethod
    def _state_structure(state_dict: dict, prefix: str) -> str | None:
        """The structure a state dict holds under ``prefix``: its record, else what its keys show (states written
        before the record existed), None without a kernel there.

        Raises:
            ValueError: a record that names no known structure.
        """
        record = state_dict.get(prefix + "_extra_state")
        if isinstance(record, torch.Tensor) and record.numel() == 1 and not record.is_floating_point():
            code = int(record)
            if not 0 <= code < len(KERNEL_STRUCTURES):
                raise ValueError(f"{_module_name(prefix)}: the weights record kernel structure {code}, which this "
                                 f"version does not know ({', '.join(KERNEL_STRUCTURES)}); load them with the "
                                 f"rep3d_nnunet version that wrote them.")
            return KERNEL_STRUCTURES[code]
        if _has_key_under(state_dict, prefix + "modulation.generator."):
            return "lrbm"
        if _has_key_under(state_dict, prefix + "modulation."):
            return "fixed"
        if prefix + "small_weight" in state_dict:
            return "csla"
        return "plain" if prefix + "weight" in state_dict else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        try:
            source = self._state_structure(state_dict, prefix)
        except ValueError as error:
            error_msgs.append(str(error))
            return
        target = self.structure_name()
        if source is not None and source != target and not {source, target} <= _PLAIN_STRUCTURES:
            error_msgs.append(self._refusal(prefix, source, target))
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        record = prefix + "_extra_state"
        if source is not None and record not in state_dict and record in missing_keys:
            missing_keys.remove(record)  # a state written before the record existed: its keys told the structure

    def _refusal(self, prefix: str, source: str, target: str) -> str:
        """The one-line error for weights of structure ``source`` offered to this conv (structure ``target``)."""
        name, words = _module_name(prefix), _STRUCTURE_WORDS
        if source in _PLAIN_STRUCTURES:
            # Never fold silently: an export's plans build the folded form (deploy=True) before its weights load.
            return (f"{name}: the weights hold {words[source]}, but this network has {self.structure()}; loading them "
                    f"would drop its training-only parameters. Load them into the network their own plans build (an "
                    f"exported folder's plans build the folded form), or train with the trainer that wrote them.")
        if target in _PLAIN_STRUCTURES:
            return (f"{name}: the weights hold {words[source]}, but this network has {self.structure()}; loading them "
                    f"would keep W and drop what the weights were trained to apply with it (W * M, or the merged "
                    f"branches). Fold them first (rep3d-nnunet export MODEL_FOLDER writes the folded model folder, "
                    f"rep3d_nnunet.export.fold(network) folds a network) and load the folded weights, or load them "
                    f"into the network their own trainer builds.")
        return (f"{name}: the weights hold {words[source]}, but this network has {self.structure()}; they train "
                f"another kernel than this network applies. Load them into the network their own trainer builds.")

    def extra_repr(self) -> str:
        mode = "folded" if self.is_folded else self.modulation_mode
        return f"{self.channels}, kernel_size={self.kernel_size}, modulation={mode}, backend={self.backend}"

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Voxels of this conv's output for one sample of spatial size ``input_size``."""
        return np.prod([self.channels, *input_size], dtype=np.int64)

    def fft_workspace_size(self, input_size: Sequence[int]) -> np.int64:
        """Transient voxels the FFT path needs for one sample (0 on the direct path).

        Planning is for training on a GPU, so ``auto`` is resolved as it would be there.
        """
        backend = self.backend
        if backend == "auto":
            backend = choose_backend((1, self.channels, *input_size), self.kernel_size, "cuda", requires_grad=True)
        if backend != "fft":
            return np.int64(0)
        return np.int64(self.channels) * np.int64(fft_workspace_voxels(tuple(input_size), self.kernel_size))


def batchnorm_folded(weight: torch.Tensor, bias: torch.Tensor | None, norm: _BatchNorm
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel [C, 1, *k] and bias [C] of a depthwise conv followed by an eval-mode BatchNorm, as one conv."""
    inv_std = torch.rsqrt(norm.running_var + norm.eps)
    scale = inv_std * norm.weight if norm.affine else inv_std
    shift = norm.bias if norm.affine else torch.zeros_like(scale)
    bias = bias if bias is not None else torch.zeros_like(scale)
    return weight * scale.view(-1, *([1] * (weight.ndim - 1))), (bias - norm.running_mean) * scale + shift


@torch.no_grad()
def fuse_batchnorm(conv: ModulatedDepthwiseConv, norm: _BatchNorm) -> None:
    """Folds an eval-mode BatchNorm that directly follows a folded depthwise conv into the conv's weight and bias."""
    weight, new_bias = batchnorm_folded(conv.weight, conv.bias, norm)
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


class _DepthwiseThenNorm(nn.Module):
    """Shared folding logic of blocks that start with ``self.conv`` (modulated depthwise) then ``self.norm``."""

    conv: ModulatedDepthwiseConv
    norm: nn.Module

    def can_fuse_norm(self) -> bool:
        """Whether folding fuses the norm into the conv (a BatchNorm with running statistics)."""
        return isinstance(self.norm, _BatchNorm) and self.norm.track_running_stats and self.norm.running_mean is not None

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Folds the conv's training-only parts; a BatchNorm with running statistics is fused into the conv."""
        self.conv.reparameterize()
        if self.can_fuse_norm():
            fuse_batchnorm(self.conv, self.norm)
            self.norm = nn.Identity()

    def _fuse_norm_at_construction(self) -> None:
        """The deploy form of a block whose BatchNorm folding fuses: no norm, a conv bias to hold the norm's shift."""
        if self.can_fuse_norm():
            self.norm = nn.Identity()
            if self.conv.bias is None:
                self.conv.bias = nn.Parameter(torch.zeros(self.conv.channels))


class Rep3DBlock(_DepthwiseThenNorm):
    """Modulated large depthwise conv -> norm -> nonlinearity (GELU by default), the authors' order.

    Args:
        channels: C.
        kernel_size: large kernel, odd per axis.
        dim: 2 or 3.
        norm_op, norm_op_kwargs: normalisation class and its kwargs (nnU-Net style); None for none.
        nonlin, nonlin_kwargs: nonlinearity class and kwargs.
        layer_scale_init: None: the authors' plain block, y = act(norm(conv(x))); a number: a residual block,
            y = x + s * act(norm(conv(x))) with a per-channel scale s starting at this value (0: the block starts as
            the identity, so the stage starts as the plan's own convolutions).
        pointwise: mix the channels after the nonlinearity with a 1x1 convolution (a depthwise-separable block,
            y = [x +] s * pw(act(norm(conv(x))))).
        **conv_kwargs: forwarded to ``ModulatedDepthwiseConv`` (modulation, generator_*, spacing, backend, deploy...).

    Shapes:
        [N, C, *spatial] -> [N, C, *spatial]
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | Sequence[int],
        dim: int = 3,
        norm_op: type[nn.Module] | None = None,
        norm_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = nn.GELU,
        nonlin_kwargs: dict | None = None,
        layer_scale_init: float | None = None,
        pointwise: bool = False,
        **conv_kwargs,
    ):
        super().__init__()
        self.conv = ModulatedDepthwiseConv(channels, kernel_size, dim, **conv_kwargs)
        self.norm = norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
        self.nonlin = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()
        self.pointwise = _POINTWISE_CONV[dim](channels, channels, 1) if pointwise else None
        self.layer_scale = (
            nn.Parameter(torch.full((channels,), float(layer_scale_init))) if layer_scale_init is not None else None
        )
        if conv_kwargs.get("deploy"):
            self._fuse_norm_at_construction()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nonlin(self.norm(self.conv(x)))
        if self.pointwise is not None:
            y = self.pointwise(y)
        if self.layer_scale is None:
            return y
        return x + y * self.layer_scale.view(1, -1, *([1] * (x.ndim - 2)))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        size = self.conv.compute_conv_feature_map_size(input_size)
        return size * 2 if self.pointwise is not None else size


class UXNetBlock(_DepthwiseThenNorm):
    """3D UX-Net block: depthwise conv (k=7, optionally modulated) -> norm -> 1x1 expand x4 -> GELU -> 1x1 project,
    scaled per channel (layer scale) and added to the input.

    Args:
        channels: C.
        kernel_size: depthwise kernel, 7 in UX-Net.
        dim: 2 or 3.
        norm_op, norm_op_kwargs: normalisation after the depthwise conv.
        expansion: hidden width factor of the pointwise MLP.
        layer_scale_init: initial per-channel scale of the residual branch (UX-Net: 1e-6); None disables it.
        **conv_kwargs: forwarded to ``ModulatedDepthwiseConv`` (``modulation="lrbm"`` gives "3D UX-Net + LRBM").

    Shapes:
        [N, C, *spatial] -> [N, C, *spatial]
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | Sequence[int] = 7,
        dim: int = 3,
        norm_op: type[nn.Module] | None = None,
        norm_op_kwargs: dict | None = None,
        expansion: int = 4,
        layer_scale_init: float | None = 1e-6,
        **conv_kwargs,
    ):
        super().__init__()
        pointwise = _POINTWISE_CONV[dim]
        self.conv = ModulatedDepthwiseConv(channels, kernel_size, dim, **conv_kwargs)
        self.norm = norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
        self.expand = pointwise(channels, expansion * channels, 1)
        self.nonlin = nn.GELU()
        self.project = pointwise(expansion * channels, channels, 1)
        self.expansion = expansion
        self.layer_scale = (
            nn.Parameter(torch.full((channels,), float(layer_scale_init))) if layer_scale_init is not None else None
        )
        if conv_kwargs.get("deploy"):
            self._fuse_norm_at_construction()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.nonlin(self.expand(self.norm(self.conv(x)))))
        if self.layer_scale is not None:
            y = y * self.layer_scale.view(1, -1, *([1] * (x.ndim - 2)))
        return x + y

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        voxels = np.prod(input_size, dtype=np.int64)
        return self.conv.compute_conv_feature_map_size(input_size) + (self.expansion + 1) * self.conv.channels * voxels
