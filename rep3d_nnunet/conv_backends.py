"""The two ways to compute a large "same" convolution on checked arguments: ``direct`` and ``fft``.

``direct`` is torch's conv (cuDNN or the native CUDA kernel, oneDNN on the CPU) with the kernel cropped to the taps
that can touch the input; ``fft`` is the exact FFT operator (``fft_operator``, float32 inside autocast). ``ops``
validates arguments, reads the decision and calls one of them; ``backend_measurement`` times both on fresh tensors.
Neither decides anything.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .fft_operator import fft_conv
from .kernel_geometry import ConvPlan, crop_slices


def direct_conv(x: Tensor, weight: Tensor, bias: Tensor | None, plan: ConvPlan, groups: int) -> Tensor:
    """torch's conv with the kernel cropped to ``plan`` (exact: the dropped taps only ever meet padding; cropping
    cuts the multiply-adds of all three passes). ``groups``: C for a depthwise conv, 1 for a fan-out conv."""
    if plan.cropped:
        weight = weight[(slice(None), slice(None)) + crop_slices(plan)]
    conv = F.conv2d if len(plan.spatial) == 2 else F.conv3d
    return conv(x, weight, bias, stride=1, padding=plan.radii, groups=groups)


def convolve(backend: str, operation: str, x: Tensor, weight: Tensor, bias: Tensor | None, plan: ConvPlan) -> Tensor:
    """``operation`` (``depthwise``: [N, C, *s] with [C, 1, *k]; ``fan_out``: [N, 1, *s] with [C, 1, *k]) computed by
    ``backend`` (``direct`` or ``fft``); [N, C, *s], dtypes as torch's conv gives them."""
    if backend == "fft":
        return fft_conv(x, weight, bias)
    return direct_conv(x, weight, bias, plan, groups=x.shape[1] if operation == "depthwise" else 1)
