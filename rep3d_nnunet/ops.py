"""Depthwise convolution with large kernels: a direct backend (torch's conv), an FFT backend, and a cost-model choice.

``depthwise_conv(x, weight, bias, backend)`` has the semantics of ``F.conv2d/conv3d(x, weight, bias, padding=k // 2,
groups=C)``: stride 1, zero "same" padding, cross-correlation, one filter per channel.

Why an FFT backend: torch's depthwise 3D conv has slow backward passes (im2col GEMM on CPU; a weight-gradient
kernel that re-reads the input once per tap on CUDA), so forward+backward of a 21^3 kernel costs prod(k) = 9261
multiply-adds per voxel and direction. In the frequency domain every pass costs O(n log n) per voxel, independent of k.

Exactness trick (both backends): along an axis of length D only offsets |o| <= D - 1 reach an input voxel from an
output voxel, so the kernel is cropped to radius r = min(k // 2, D - 1). The cropped taps multiply padding only,
contribute nothing, and get an exactly zero gradient. The FFT size per axis is the smallest 7-smooth n >= D + r.

No-aliasing argument for n >= D + r (u = the cropped kernel stored centred, u[j mod n] = w[c + j], |j| <= r):
    forward      y[p]  = sum_q x[q] u[(q - p) mod n]       q - p in [-(D-1), D-1]; a wrong match needs
                                                           |q - p - j| = n for some |j| <= r, i.e. n <= D - 1 + r.
    grad input   gx[q] = sum_p gy[p] u[(q - p) mod n]      the same index set as the forward.
    grad weight  gw[j] = sum_p gy[p] x[(p + j) mod n]      for |j| <= r, p + j + n >= n - r >= D and
                                                           p + j - n <= D - 1 + r - n < 0: only the true term.
So every result is exact up to float rounding, with about (D + r) / (D + k - 1) of the usual linear-conv FFT size.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "direct", "fft")

# ---- cost model ----------------------------------------------------------------------------------------------------
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
# direct constant is the fit's upper range, since oneDNN's per-MAC speed varies 3x with k). CUDA: a model,
# not measured: direct at ~10% of an H100's fp32 peak (the native depthwise kernel re-reads the input per
# weight tap in its weight-gradient pass), FFT at half the memory-bound rate of unfused torch.fft calls (DESIGN.md,
# section 4), ~20 kernel launches of overhead per forward+backward.
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
_SMALL_KERNEL_TAPS = 27


class _Plan(NamedTuple):
    """Geometry of one convolution: per spatial axis the cropped radius and the FFT size.

    ``dims`` are the negative tensor axes transformed by the FFT (those with a radius > 0); along the others the
    cropped kernel has one tap and acts as a per-position scale, so no transform is needed there.
    """

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    radii: tuple[int, ...]
    fft_sizes: tuple[int, ...]
    dims: tuple[int, ...]

    @property
    def cropped(self) -> bool:
        return any(2 * r + 1 != k for r, k in zip(self.radii, self.kernel))

    def fft_shape(self) -> tuple[int, ...]:
        return tuple(self.fft_sizes[d] for d in self.dims)


def next_smooth_size(minimum: int) -> int:
    """Smallest integer >= ``minimum`` whose prime factors are all in {2, 3, 5, 7} (fast for pocketfft and cuFFT)."""
    n = max(1, int(minimum))
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _as_kernel_size(kernel_size: int | Sequence[int], dim: int) -> tuple[int, ...]:
    sizes = (int(kernel_size),) * dim if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    if len(sizes) != dim:
        raise ValueError(f"Kernel size {sizes} has {len(sizes)} axes but the input has {dim} spatial axes.")
    if any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"Kernel size {sizes} is not allowed: every axis must be a positive odd number (1, 3, ...).")
    return sizes


def _plan(spatial: tuple[int, ...], kernel: tuple[int, ...]) -> _Plan:
    radii = tuple(min(k // 2, max(d - 1, 0)) for d, k in zip(spatial, kernel))
    fft_sizes = tuple(next_smooth_size(d + r) if r > 0 else d for d, r in zip(spatial, radii))
    nd = len(spatial)
    dims = tuple(i - nd for i in range(nd) if radii[i] > 0)
    return _Plan(spatial, kernel, radii, fft_sizes, dims)


def _crop_slices(plan: _Plan) -> tuple[slice, ...]:
    """Slices of the kernel's spatial axes that keep the taps within the radius of the centre."""
    return tuple(slice(k // 2 - r, k // 2 + r + 1) for k, r in zip(plan.kernel, plan.radii))


# ---- FFT backend ---------------------------------------------------------------------------------------------------
def _kernel_spectrum(weight: Tensor, plan: _Plan) -> Tensor:
    """Spectrum of the cropped kernel stored centred (tap offset j at index j mod n).

    Args:
        weight: [C, 1, *k] real.

    Returns:
        [C, *m] complex, m the rfftn shape along ``plan.dims`` and 1 along the other axes; without transformed axes
        the real cropped kernel [C, 1, ...] itself (a per-channel scale).
    """
    u = weight[(slice(None), 0) + _crop_slices(plan)]
    if not plan.dims:
        return u
    # Transform the kernel stored at indices 0..2r, then centre it with a phase ramp (a shift by -r is a factor
    # exp(+2 pi i f r / n) per axis): one pass over the spectrum instead of padding and rolling the real buffer.
    spectrum = torch.fft.rfftn(u, s=plan.fft_shape(), dim=plan.dims)
    return spectrum.mul_(_centring_phase(plan, spectrum.dtype, spectrum.device))


def _centring_phase(plan: _Plan, dtype: torch.dtype, device: torch.device) -> Tensor:
    """exp(2 pi i sum_a f_a r_a / n_a) on the rfftn grid, shaped to broadcast against a [C, *m] spectrum.

    Built on the spectrum's device (a host-to-device copy would synchronise a CUDA stream), in the spectrum's real
    precision; f * r is reduced modulo n in integers first, so every angle is exact before the float rounding.
    """
    real = torch.empty((), dtype=dtype).real.dtype
    nd = len(plan.spatial)
    phase = None
    for d in plan.dims:
        n, r = plan.fft_sizes[d], plan.radii[d]
        freqs = torch.arange(n // 2 + 1 if d == plan.dims[-1] else n, dtype=torch.int64, device=device)
        angle = (freqs * r % n).to(real) * (2 * math.pi / n)
        shape = [1] * nd
        shape[d + nd] = -1
        factor = torch.polar(torch.ones_like(angle), angle).view(shape)
        phase = factor if phase is None else phase * factor
    return phase


def _crop_to_input(t: Tensor, plan: _Plan) -> Tensor:
    for d in plan.dims:
        t = t.narrow(d, 0, plan.spatial[d])
    return t


def _gather_taps(t: Tensor, plan: _Plan) -> Tensor:
    """Reads offsets -r..r (stored at indices n-r..n-1, 0..r) along every transformed axis, in kernel order."""
    for d in plan.dims:
        r, n = plan.radii[d], plan.fft_sizes[d]
        t = torch.cat([t.narrow(d, n - r, r), t.narrow(d, 0, r + 1)], dim=d)
    return t


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context without autocast for ``device_type``; nothing to disable where autocast does not exist."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _prepared_spectrum(weight: Tensor, plan: _Plan, compute: torch.dtype) -> Tensor:
    """The kernel as the forward multiplies it: its spectrum, conjugated (a correlation), in ``compute`` precision.

    Args:
        weight: [C, 1, *k].

    Returns:
        [C, *m] complex (see ``_kernel_spectrum``); without transformed axes the cropped real kernel [C, 1, ...].
    """
    spectrum = _kernel_spectrum(weight.to(compute), plan)
    # Conjugates are taken physically, in place: torch's lazy conjugate views are resolved wrongly (ignored) when
    # this runs inside a graph compiled by AOTAutograd, which silently turns the correlation into a convolution.
    return spectrum.conj_physical_() if plan.dims else spectrum


def _apply_spectrum(x: Tensor, spectrum: Tensor, bias: Tensor | None, plan: _Plan, compute: torch.dtype) -> Tensor:
    """The depthwise conv of x with a ``_prepared_spectrum``, in ``compute`` precision.

    Args:
        x: [N, C, *spatial], or [N, 1, *spatial] read by all C filters (``fan_out_conv``: the input's spectrum
            broadcasts against the C kernel spectra, so it is transformed once).
        spectrum: ``_prepared_spectrum`` of a [C, 1, *k] kernel for this plan; bias: [C] or None.

    Returns:
        [N, C, *spatial] in ``compute``, contiguous.
    """
    x = x.to(compute)
    if plan.dims:
        xf = torch.fft.rfftn(x, s=plan.fft_shape(), dim=plan.dims)
        # in place unless one shared input channel broadcasts against the C filters
        xf = xf.mul_(spectrum) if xf.shape[1] == spectrum.shape[0] else xf * spectrum
        del spectrum  # the last reference in a training forward: freed before the inverse transform allocates
        y = _crop_to_input(torch.fft.irfftn(xf, s=plan.fft_shape(), dim=plan.dims), plan)
        del xf
    else:
        y = x * spectrum  # all radii 0: a 1-tap kernel is a per-channel scale
    # The crop is a view into the padded buffer; the add (or the copy) materialises it so the buffer is freed.
    return y + bias.to(compute).view(-1, *([1] * len(plan.spatial))) if bias is not None else y.contiguous()


def _fft_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, compute: torch.dtype) -> Tensor:
    """The depthwise conv in the frequency domain, in ``compute`` precision.

    Args:
        x: [N, C, *spatial] or [N, 1, *spatial] (see ``_apply_spectrum``).
        weight: [C, 1, *k]; bias: [C] or None.

    Returns:
        [N, C, *spatial] in ``compute``, contiguous.
    """
    return _apply_spectrum(x, _prepared_spectrum(weight, plan, compute), bias, plan, compute)


def _fft_backward(grad_y: Tensor, x: Tensor, weight: Tensor, plan: _Plan, compute: torch.dtype,
                  need_x: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``_fft_forward`` with respect to x and the weight (None where not needed), in their dtypes.

    The grad-output spectrum is shared by both gradients, and the weight gradient sums the batch in the frequency
    domain (one inverse transform per channel, not per sample). A shared one-channel input gets the sum of its
    filters' gradients before the single inverse transform.
    """
    shared_input = x.shape[1] == 1 and weight.shape[0] > 1
    x_dtype, weight_dtype = x.dtype, weight.dtype
    x, weight, grad_y = x.to(compute), weight.to(compute), grad_y.to(compute)
    spatial_axes = tuple(range(2, x.ndim))
    grad_x = grad_w = None
    if need_w:
        grad_w = torch.zeros_like(weight)
    if not plan.dims:
        if need_w:
            taps = (grad_y * x).sum(dim=(0,) + spatial_axes)
            grad_w[(slice(None), 0) + _crop_slices(plan)] = taps.view(-1, *([1] * len(plan.spatial)))
        if need_x:
            grad_x = grad_y * _kernel_spectrum(weight, plan)
            grad_x = grad_x.sum(1, keepdim=True) if shared_input else grad_x
    else:
        shape = plan.fft_shape()
        gyf = torch.fft.rfftn(grad_y, s=shape, dim=plan.dims)
        if need_w:
            xf = torch.fft.rfftn(x, s=shape, dim=plan.dims)
            # X * conj(GY) as conj(conj(X) * GY): conjugating X in place (physically, see _fft_forward) needs no
            # copy of the grad-output spectrum, and the second conjugate acts on the batch-summed spectrum only.
            xf = xf.conj_physical_() * gyf if shared_input else xf.conj_physical_().mul_(gyf)
            # Summing the batch (and untransformed axes) in the frequency domain leaves one inverse per channel.
            untransformed = tuple(a for a in spatial_axes if a - x.ndim not in plan.dims)
            cross = xf.sum(dim=(0,) + untransformed, keepdim=True).conj_physical_()
            del xf
            taps = _gather_taps(torch.fft.irfftn(cross, s=shape, dim=plan.dims), plan)
            grad_w[(slice(None), 0) + _crop_slices(plan)] = taps[0]
        if need_x:
            gyf.mul_(_kernel_spectrum(weight, plan))
            if shared_input:  # x was broadcast to every filter: its gradient sums theirs
                gyf = gyf.sum(1, keepdim=True)
            grad_x = _crop_to_input(torch.fft.irfftn(gyf, s=shape, dim=plan.dims), plan).contiguous()
    return (None if grad_x is None else grad_x.to(x_dtype), None if grad_w is None else grad_w.to(weight_dtype))


# The FFT conv is one opaque operator for torch.compile: dynamo records a single call (no graph break, no guards on
# Python objects), inductor calls it as a unit (its transforms stay pocketfft/cuFFT calls), and AOTAutograd saves what
# ``setup_context`` saves. The geometry is derived from the tensors' static spatial and kernel shapes inside, so the
# operator's arguments are tensors and a dtype only.
@torch.library.custom_op("rep3d_nnunet::fft_depthwise_conv", mutates_args=())
def fft_depthwise_conv_op(x: Tensor, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
    """``_fft_forward`` for the plan of these shapes; [N, C, *spatial] in ``compute_dtype``."""
    with _autocast_disabled(x.device.type):
        return _fft_forward(x, weight, bias, _plan(tuple(x.shape[2:]), tuple(weight.shape[2:])), compute_dtype)


@fft_depthwise_conv_op.register_fake
def _(x, weight, bias, compute_dtype):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=compute_dtype)


@torch.library.custom_op("rep3d_nnunet::fft_depthwise_conv_backward", mutates_args=())
def fft_depthwise_conv_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, compute_dtype: torch.dtype,
                                   need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    """``_fft_backward``; a gradient that is not needed comes back as an empty tensor (operators return tensors)."""
    with _autocast_disabled(x.device.type):
        grad_x, grad_w = _fft_backward(grad_y, x, weight, _plan(tuple(x.shape[2:]), tuple(weight.shape[2:])),
                                       compute_dtype, need_x, need_w)
    return (x.new_empty(0) if grad_x is None else grad_x, weight.new_empty(0) if grad_w is None else grad_w)


@fft_depthwise_conv_backward_op.register_fake
def _(grad_y, x, weight, compute_dtype, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0))


def _save_for_fft_backward(ctx, inputs, output) -> None:
    # x and the weight only, uncast, exactly what torch's conv saves: switching backends does not change the
    # activation memory held between forward and backward (the quantity nnU-Net's planner sizes patches by). Under
    # AMP x arrives in half precision; saving its float32 copy would double that. Both spectra are recomputed in
    # backward: saving the input spectrum ([N, C, *m] complex, ~2-2.5x the input at k = 21) would spare 2 of the 8
    # transforms of a batch-1 forward+backward for up to +4.5 inputs of memory per conv.
    x, weight, bias, compute_dtype = inputs
    ctx.save_for_backward(x, weight)
    ctx.compute_dtype = compute_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _fft_depthwise_conv_grad(ctx, grad_y: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x, grad_w = fft_depthwise_conv_backward_op(grad_y, x, weight, ctx.compute_dtype, need_x, need_w)
    grad_b = None
    if need_b and ctx.bias_dtype is not None:
        grad_b = grad_y.sum(dim=(0, *range(2, grad_y.ndim))).to(ctx.bias_dtype)
    return grad_x if need_x else None, grad_w if need_w else None, grad_b, None


fft_depthwise_conv_op.register_autograd(_fft_depthwise_conv_grad, setup_context=_save_for_fft_backward)


def _compute_dtype(x: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the FFT runs in, dtype of the result), matching what torch's conv returns for these inputs."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Autocast runs convolutions in its lower precision dtype on CPU and CUDA; return that, so that "auto" can
        # switch backends without changing dtypes downstream. Half FFTs need power-of-two sizes and bf16 FFTs do
        # not exist, so the transform itself runs in float32.
        return torch.float32, torch.get_autocast_dtype(device_type)
    if x.dtype != weight.dtype:
        raise ValueError(f"Input dtype {x.dtype} and weight dtype {weight.dtype} differ (outside autocast).")
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32, x.dtype
    return x.dtype, x.dtype


def _fft_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    compute, result = _compute_dtype(x, weight)
    with _autocast_disabled(x.device.type):
        y = fft_depthwise_conv_op(x, weight, bias, compute)
    return y.to(result)


def _direct_conv(x: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan) -> Tensor:
    # Cropping is exact (the dropped taps only ever meet padding) and cuts the multiply-adds of all three passes.
    if plan.cropped:
        weight = weight[(slice(None), slice(None)) + _crop_slices(plan)]
    conv = F.conv2d if len(plan.spatial) == 2 else F.conv3d
    return conv(x, weight, bias, stride=1, padding=plan.radii, groups=x.shape[1])


# ---- public API ----------------------------------------------------------------------------------------------------
def estimate_seconds(
    input_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    device_type: str | torch.device = "cpu",
    requires_grad: bool = True,
) -> dict[str, float]:
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
    plan = _plan(tuple(spatial), _as_kernel_size(kernel_size, len(spatial)))
    key = ("cuda" if torch.device(device_type).type == "cuda" else "cpu", bool(requires_grad))
    macs = batch * channels * math.prod(spatial) * math.prod([2 * r + 1 for r in plan.radii])
    points = math.prod(plan.fft_shape())
    fft_units = batch * channels * points * max(math.log2(points), 1.0)
    return {
        "direct": _DIRECT_SECONDS_PER_MAC[key] * macs + _DIRECT_OVERHEAD_SECONDS[key],
        "fft": _FFT_SECONDS_PER_UNIT[key] * fft_units + _FFT_OVERHEAD_SECONDS[key],
    }


def choose_backend(
    input_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    device_type: str | torch.device = "cpu",
    requires_grad: bool = True,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Picks ``"direct"`` or ``"fft"`` for a depthwise conv from the cost model of ``estimate_seconds``.

    FFT is chosen only when modelled ``_FFT_MARGIN`` (2x) faster, so the per-call overheads keep tiny tensors on
    torch's conv; cropped kernels of at most 27 taps (3^3, 1x3x3, 1^3) always stay there. Larger float64 kernels on
    the CPU always take the FFT: oneDNN has no float64 convolution, and torch's fallback (``slow_conv3d``) is the
    path that made the eval-mode LRBM masks (float64) cost seconds per network.

    Args:
        input_shape: [N, C, *spatial], 2 or 3 spatial axes.
        kernel_size: odd size per spatial axis, or one int for all.
        device_type: ``"cpu"``, ``"cuda"`` (or a ``torch.device``).
        requires_grad: whether a backward pass follows (training); inference weighs the forward only.
        dtype: the input's dtype (the cost model's constants are float32's).

    Returns:
        ``"direct"`` or ``"fft"``.
    """
    batch, channels, *spatial = (int(s) for s in input_shape)
    plan = _plan(tuple(spatial), _as_kernel_size(kernel_size, len(spatial)))
    taps = math.prod([2 * r + 1 for r in plan.radii])
    if taps <= _SMALL_KERNEL_TAPS:
        return "direct"
    if dtype == torch.float64 and torch.device(device_type).type == "cpu":
        return "fft"
    cost = estimate_seconds(input_shape, plan.kernel, device_type, requires_grad)
    return "fft" if cost["fft"] * _FFT_MARGIN < cost["direct"] else "direct"


def fft_workspace_voxels(spatial_shape: Sequence[int], kernel_size: int | Sequence[int]) -> int:
    """Float32 elements per (sample, channel) that the FFT backend holds at its peak beyond its input and output.

    The FFT path saves only x and the weight for backward (as torch's conv does), so this is transient memory. It
    counts the backward's peak, during the grad-input inverse: the grad-output spectrum, the recomputed kernel
    spectrum (per channel; counted per sample: exact at batch 1, an overestimate beyond), the copy a c2r transform
    makes of its input, the padded real result prod(n), plus one more spectrum as an allowance for FFT-library work
    areas (cuFFT plans). A spectrum holds prod(m) complex values (2 floats each): m = n along the transformed axes
    but the last, n // 2 + 1 on the last, and D along untransformed axes (radius 0). The forward's peak is smaller.
    Zero when no axis is transformed (a 1-tap kernel after cropping).

    Args:
        spatial_shape: the input's spatial shape, 2 or 3 axes.
        kernel_size: odd size per spatial axis, or one int for all.

    Returns:
        Number of float32 elements; multiply by N*C for a whole layer, by 4 for bytes.
    """
    spatial = tuple(int(s) for s in spatial_shape)
    plan = _plan(spatial, _as_kernel_size(kernel_size, len(spatial)))
    if not plan.dims:
        return 0
    padded = math.prod(plan.fft_sizes)
    last = plan.dims[-1]
    spectrum_complex = padded // plan.fft_sizes[last] * (plan.fft_sizes[last] // 2 + 1)
    return 4 * 2 * spectrum_complex + padded


def fan_out_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "auto") -> Tensor:
    """One input channel, C filters, "same" padding, stride 1: ``F.conv2d/conv3d(x, weight, bias, padding=k // 2)``.

    Equal to ``depthwise_conv(x.expand(N, C, ...), weight, bias)``, but the FFT backend transforms the shared input
    once instead of C times and sums its gradient over the filters before one inverse transform; the direct backend
    is torch's conv with one input channel. The LRBM generator's first conv is one: every filter reads the prior P.

    Args:
        x: [N, 1, *spatial], 2 or 3 spatial axes.
        weight: [C, 1, *k], every k odd.
        bias: [C] or None.
        backend: ``"direct"``, ``"fft"`` or ``"auto"`` (``choose_backend`` for one sample of the expanded shape
            [1, C, *spatial]).

    Returns:
        [N, C, *spatial], dtypes as ``depthwise_conv``.

    Raises:
        ValueError: as ``depthwise_conv``, or an input with more than one channel.
    """
    if x.ndim in (4, 5) and x.shape[1] != 1:
        raise ValueError(f"fan_out_conv expects an input with one channel [N, 1, *spatial], got {tuple(x.shape)}; "
                         f"use depthwise_conv for one filter per channel.")
    plan, backend = _checked_plan(x, weight, bias, backend, channels=weight.shape[0] if weight.ndim else 0)
    if backend == "fft":
        return _fft_conv(x, weight, bias)
    weight = weight[(slice(None), slice(None)) + _crop_slices(plan)] if plan.cropped else weight
    conv = F.conv2d if len(plan.spatial) == 2 else F.conv3d
    return conv(x, weight, bias, stride=1, padding=plan.radii)


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Depthwise "same" convolution, stride 1: ``F.conv2d/conv3d(x, weight, bias, padding=k // 2, groups=C)``.

    Args:
        x: [N, C, *spatial], 2 or 3 spatial axes.
        weight: [C, 1, *k], every k odd (anisotropic allowed, e.g. (1, 21, 21)); may be larger than the input.
        bias: [C] or None.
        backend: ``"direct"`` (torch's conv), ``"fft"`` (real FFTs for forward and both gradients) or ``"auto"``
            (``choose_backend`` for one sample of this shape, this device and whether gradients are needed).

    Returns:
        [N, C, *spatial]. Under autocast the dtype torch's conv would give (the autocast dtype; the FFT itself runs
        in float32), otherwise the input's dtype (float16/bfloat16 inputs are transformed in float32).

    Raises:
        ValueError: unknown backend, input not 4-D/5-D, weight or bias shape not matching the channels, even kernel,
            input and weight dtypes differing outside autocast (FFT backend).
    """
    plan, backend = _checked_plan(x, weight, bias, backend, channels=x.shape[1] if x.ndim > 1 else 0)
    if backend == "fft":
        return _fft_conv(x, weight, bias)
    return _direct_conv(x, weight, bias, plan)


class PreparedKernel(NamedTuple):
    """A depthwise kernel made ready for repeated inference on inputs of one shape (``prepare_kernel``).

    Attributes:
        plan: the geometry for inputs of ``plan.spatial``.
        backend: ``"direct"`` or ``"fft"``.
        kernel: fft: the conjugated kernel spectrum [C, *m] in ``compute_dtype``; direct: the weight [C, 1, *k].
        bias: [C] or None (fft: in ``compute_dtype``).
        compute_dtype, result_dtype: as ``depthwise_conv`` runs and returns them.
    """

    plan: _Plan
    backend: str
    kernel: Tensor
    bias: Tensor | None
    compute_dtype: torch.dtype
    result_dtype: torch.dtype


def prepare_kernel(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "auto") -> PreparedKernel:
    """Everything ``depthwise_conv(x, weight, bias, backend)`` derives from the kernel alone, for inputs like ``x``.

    A sliding-window predictor runs the network with unchanged weights on every tile and mirror flip of a case, all of
    one shape: the FFT backend then transforms each kernel once instead of once per call. ``x`` is only read for its
    shape, dtype and device (and grad mode and autocast state decide as in ``depthwise_conv``).

    Args:
        x: [N, C, *spatial], an input of the shape to come.
        weight: [C, 1, *k]; bias: [C] or None; backend: as ``depthwise_conv``.

    Returns:
        A ``PreparedKernel`` for ``apply_prepared_kernel``; it holds no autograd history of its own (use it without
        gradients).

    Raises:
        ValueError: as ``depthwise_conv``.
    """
    plan, backend = _checked_plan(x, weight, bias, backend, channels=x.shape[1] if x.ndim > 1 else 0)
    if backend != "fft":
        return PreparedKernel(plan, backend, weight, bias, weight.dtype, weight.dtype)
    compute, result = _compute_dtype(x, weight)
    with _autocast_disabled(x.device.type):
        spectrum = _prepared_spectrum(weight, plan, compute)
    return PreparedKernel(plan, backend, spectrum, None if bias is None else bias.to(compute), compute, result)


def apply_prepared_kernel(x: Tensor, prepared: PreparedKernel) -> Tensor:
    """``depthwise_conv`` of ``x`` with a ``prepare_kernel`` result: the same values, without the kernel's transform.

    Args:
        x: [N, C, *spatial] with the [C, *spatial] the kernel was prepared for (any N).

    Returns:
        [N, C, *spatial], dtypes as ``depthwise_conv``.

    Raises:
        ValueError: ``x`` has another spatial shape than the one the kernel was prepared for.
    """
    if tuple(x.shape[2:]) != prepared.plan.spatial:
        raise ValueError(f"The kernel was prepared for inputs of spatial shape {prepared.plan.spatial}, got "
                         f"{tuple(x.shape[2:])}; prepare it again for this shape.")
    if prepared.backend != "fft":
        return _direct_conv(x, prepared.kernel, prepared.bias, prepared.plan)
    with _autocast_disabled(x.device.type):
        y = _apply_spectrum(x, prepared.kernel, prepared.bias, prepared.plan, prepared.compute_dtype)
    return y.to(prepared.result_dtype)


def _checked_plan(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str, channels: int) -> tuple[_Plan, str]:
    """Validates the arguments of a conv with ``channels`` outputs; returns its plan and the backend to use."""
    requires_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    # the batch axis stays out: it is the one axis torch.compile may make dynamic (a symbol, not a constant)
    return _geometry(tuple(x.shape[1:]), tuple(weight.shape), None if bias is None else tuple(bias.shape), channels,
                     backend, x.device.type, requires_grad, x.dtype)


# Pure function of shapes and flags: torch.compile calls it once while tracing and keeps its result as a constant
# (the shapes it reads are static there, grad mode and device are guarded anyway), instead of symbolically executing
# the size rounding and the cost model for every convolution of the network.
@torch.compiler.assume_constant_result
def _geometry(sample_shape: tuple, weight_shape: tuple, bias_shape: tuple | None, channels: int, backend: str,
              device_type: str, requires_grad: bool, dtype: torch.dtype) -> tuple[_Plan, str]:
    """``_checked_plan`` on shapes: ``sample_shape`` is the input's [C, *spatial] (without the batch axis)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; allowed values are {', '.join(map(repr, BACKENDS))}.")
    if len(sample_shape) not in (3, 4):
        raise ValueError(f"Expected an input [N, C, *spatial] with 2 or 3 spatial axes, got shape "
                         f"[N, {', '.join(map(str, sample_shape))}].")
    spatial = sample_shape[1:]
    if len(weight_shape) != len(sample_shape) + 1 or weight_shape[0] != channels or weight_shape[1] != 1:
        raise ValueError(
            f"Depthwise weight must have shape [C, 1, *k] = [{channels}, 1, {', '.join('k' * len(spatial))}] "
            f"for an input with {channels} channels and {len(spatial)} spatial axes; got {weight_shape}."
        )
    if bias_shape is not None and bias_shape != (channels,):
        raise ValueError(f"Bias must have shape [{channels}], got {bias_shape}.")
    plan = _plan(spatial, _as_kernel_size(weight_shape[2:], len(spatial)))
    if backend == "auto":
        # One sample's shape decides: a batch size that changes (the last batch, torch.compile's dynamic batch axis)
        # then never switches backends or adds guards on the batch size.
        backend = choose_backend((1, channels, *spatial), plan.kernel, device_type, requires_grad, dtype)
    return plan, backend
