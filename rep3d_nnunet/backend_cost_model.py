"""The cost model of the two large-kernel backends: modelled run times from shapes alone, and the choice they imply.

It decides where measuring is off (``REP3D_CONV_BACKEND=model``, the default on the CPU, whose constants were
measured on the project's machine), decides shapes first met while torch.compile traces, narrows what the CPU
measures, and sizes the planner's FFT workspaces. It measures nothing and keeps no state.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .kernel_geometry import check_kernel_size, cropped_radii, next_smooth_size


def _by_key(cpu_train: float, cpu_infer: float, cuda_train: float, cuda_infer: float) -> dict[tuple[str, bool], float]:
    """Constants keyed (device type, a backward pass follows)."""
    return {
        ("cpu", True): cpu_train, ("cpu", False): cpu_infer, ("cuda", True): cuda_train, ("cuda", False): cuda_infer
    }


# Modelled seconds = per-unit constant * work + per-call overhead, keyed (device type, backward follows).
#   direct work: multiply-adds of one pass, N*C*prod(D)*prod(k_eff) (k_eff: the cropped kernel);
#   FFT work:    N*C*prod(n)*log2(prod(n)), the butterfly count of one full-size transform.
# The constants cover all passes (forward; or forward + grad input + grad weight). CPU: fitted to medians measured on
# this project's 2-core CPU (torch 2.15, 2 threads, float32; ``benchmarks/bench_ops.py --calibrate``; the forward-only
# direct constant is the fit's upper range, since oneDNN's per-MAC speed varies 3x with k). CUDA: a model, not
# measured (no GPU has run this project's benchmarks yet): direct at ~10% of an H100's fp32 peak (the native depthwise
# kernel re-reads the input per weight tap in its weight-gradient pass), FFT at half the memory-bound rate of unfused
# torch.fft calls, ~20 kernel launches of overhead per forward+backward. On CUDA the ``measure`` policy decides by
# measuring (``backend_measurement``); the model only sizes the planner's FFT workspaces there.
#                      (cpu, training)  (cpu, inference)  (cuda, training)  (cuda, inference)
_DIRECT_SECONDS_PER_MAC = _by_key(2.2e-9, 4.0e-11, 1.0e-12, 3.0e-13)
_DIRECT_OVERHEAD_SECONDS = _by_key(2.5e-4, 4e-5, 5e-5, 2e-5)
_FFT_SECONDS_PER_UNIT = _by_key(3.6e-9, 1.2e-9, 6.0e-12, 2.5e-12)
_FFT_OVERHEAD_SECONDS = _by_key(2e-3, 5e-4, 3e-4, 1e-4)
# The FFT backend must be modelled this much faster: it allocates spectra, deviates from torch's conv by rounding,
# and near the break-even the model cannot tell the two apart.
_FFT_MARGIN = 2.0
# A cropped kernel this small (3^3, 1x3x3, 1^3, ...) always stays on torch's conv, whatever the shape: measured on
# CPU, FFT wins by 1.5x at most there, and it is where cuDNN/oneDNN are at their best.
SMALL_KERNEL_TAPS = 27
# The CPU measures only backends the model puts within this factor of the fastest: a direct 21^3 forward+backward
# takes tens of seconds there (im2col), which no measurement should spend.
CPU_CANDIDATE_FACTOR = 10.0


def is_small_kernel(spatial: Sequence[int], kernel_size: Sequence[int]) -> bool:
    """Whether the kernel, cropped to what can touch an input of ``spatial`` size, has at most ``SMALL_KERNEL_TAPS``
    taps (torch's conv then, whatever the policy)."""
    return math.prod([2 * r + 1 for r in cropped_radii(spatial, kernel_size)]) <= SMALL_KERNEL_TAPS


def estimate_seconds(input_shape: Sequence[int], kernel_size: int | Sequence[int],
                     device_type: str | torch.device = "cpu", requires_grad: bool = True) -> dict[str, float]:
    """Modelled run time of both backends (a cost model, not a measurement; see the module constants).

    direct = a * N*C*prod(D)*prod(k_eff) and fft = b * N*C*prod(n)*log2(prod(n)), with k_eff the cropped kernel,
    n the FFT sizes, and a, b per device type (``cuda``, anything else uses the CPU constants) and per pass set
    (forward only, or forward + grad input + grad weight).

    Args:
        input_shape: [N, C, *spatial], 2 or 3 spatial axes.
        kernel_size: odd size per spatial axis, or one int for all.
        device_type: ``"cpu"``, ``"cuda"`` (or a ``torch.device``).
        requires_grad: whether a backward pass follows (training) or the forward runs alone (inference).

    Returns:
        ``{"direct": seconds, "fft": seconds}``.
    """
    batch, channels, *spatial = (int(s) for s in input_shape)
    radii = cropped_radii(spatial, check_kernel_size(kernel_size, len(spatial)))
    key = ("cuda" if torch.device(device_type).type == "cuda" else "cpu", bool(requires_grad))
    macs = batch * channels * math.prod(spatial) * math.prod([2 * r + 1 for r in radii])
    points = math.prod([next_smooth_size(d + r) for d, r in zip(spatial, radii) if r > 0] or [1])
    fft_units = batch * channels * points * max(math.log2(points), 1.0)
    return {
        "direct": _DIRECT_SECONDS_PER_MAC[key] * macs + _DIRECT_OVERHEAD_SECONDS[key],
        "fft": _FFT_SECONDS_PER_UNIT[key] * fft_units + _FFT_OVERHEAD_SECONDS[key],
    }


def choose_backend(input_shape: Sequence[int], kernel_size: int | Sequence[int],
                   device_type: str | torch.device = "cpu", requires_grad: bool = True,
                   dtype: torch.dtype = torch.float32) -> str:
    """The cost model's choice, ``"direct"`` or ``"fft"`` (``estimate_seconds``).

    FFT is chosen only when modelled ``_FFT_MARGIN`` (2x) faster, so the per-call overheads keep tiny tensors on
    torch's conv; cropped kernels of at most 27 taps (3^3, 1x3x3, 1^3) always stay there. Larger float64 kernels on
    the CPU always take the FFT: oneDNN has no float64 convolution, and torch's fallback (``slow_conv3d``) is the
    path that made the eval-mode LRBM masks (float64) cost seconds per network.

    Args:
        input_shape: [N, C, *spatial], 2 or 3 spatial axes.
        kernel_size: odd size per spatial axis, or one int for all.
        device_type: ``"cpu"``, ``"cuda"`` (or a ``torch.device``).
        requires_grad: whether a backward pass follows; the convolutions decide for training (True), so that
            prediction computes what training did.
        dtype: the input's dtype (the cost model's constants are float32's).
    """
    spatial = [int(s) for s in input_shape[2:]]
    if is_small_kernel(spatial, check_kernel_size(kernel_size, len(spatial))):
        return "direct"
    if dtype == torch.float64 and torch.device(device_type).type == "cpu":
        return "fft"
    cost = estimate_seconds(input_shape, kernel_size, device_type, requires_grad)
    return "fft" if cost["fft"] * _FFT_MARGIN < cost["direct"] else "direct"
