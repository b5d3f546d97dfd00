"""The FFT backend of the large depthwise convolution: forward and both gradients in the frequency domain.

Why: torch's depthwise 3D conv has slow backward passes (im2col GEMM on CPU; a weight-gradient kernel that re-reads
the input once per tap on CUDA), so forward+backward of a 21^3 kernel costs prod(k) = 9261 multiply-adds per voxel and
direction. In the frequency domain every pass costs O(n log n) per voxel, independent of k.

No-aliasing argument for an FFT size n >= D + r per axis (``kernel_geometry``: r the cropped radius; u = the cropped
kernel stored centred, u[j mod n] = w[c + j], |j| <= r):
    forward      y[p]  = sum_q x[q] u[(q - p) mod n]       q - p in [-(D-1), D-1]; a wrong match needs
                                                           |q - p - j| = n for some |j| <= r, i.e. n <= D - 1 + r.
    grad input   gx[q] = sum_p gy[p] u[(q - p) mod n]      the same index set as the forward.
    grad weight  gw[j] = sum_p gy[p] x[(p + j) mod n]      for |j| <= r, p + j + n >= n - r >= D and
                                                           p + j - n <= D - 1 + r - n < 0: only the true term.
So every result is exact up to float rounding, with about (D + r) / (D + k - 1) of the usual linear-conv FFT size.
"""

from __future__ import annotations

import scipy.fft
import torch
from torch import Tensor

from .kernel_geometry import ConvPlan, crop_slices


# ---- the transforms: pocketfft through scipy.fft on the CPU, torch.fft elsewhere ----
def _on_pocketfft(t: Tensor) -> bool:
    """Whether ``t``'s transform runs through scipy.fft (pocketfft): CPU tensors outside autograd and tracing.

    Why: on the CPU torch.fft's multi-dimensional inverse is a c2c transform followed by a 1-D c2r, each behind a
    permuted copy of the spectrum; pocketfft transforms strided arrays in place of those copies. One training step
    of the default network on the Hippocampus plan spends most of its large-kernel time in these transforms (see
    docs/performance.md, "Where a training step's time goes"). Results agree to float rounding (both are exact FFTs).
    Every caller here runs inside the FFT operator or without autograd (prediction); a tensor that needs a gradient,
    or a trace, keeps torch.fft.
    """
    return (t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling())


def _numpy(t: Tensor):
    return t.detach().resolve_conj().resolve_neg().numpy()


def rfftn(t: Tensor, shape: tuple[int, ...], dims: tuple[int, ...]) -> Tensor:
    """``torch.fft.rfftn(t, s=shape, dim=dims)``: zero-padded to ``shape``, the last of ``dims`` halved."""
    if _on_pocketfft(t):
        return torch.from_numpy(scipy.fft.rfftn(_numpy(t), s=shape, axes=dims, workers=torch.get_num_threads()))
    return torch.fft.rfftn(t, s=shape, dim=dims)


def irfftn_read(t: Tensor, plan: ConvPlan, read) -> Tensor:
    """``read(torch.fft.irfftn(t, s=plan.fft_shape(), dim=plan.dims))``, where ``read(x, d)`` keeps a part of axis
    ``d`` (``input_part`` or ``tap_part``); ``t`` may be overwritten.

    On pocketfft the inverse runs one axis at a time and each axis is read right after its transform, so the rows
    that would be thrown away are never transformed along the later axes (the output crop of a 40 x 56 x 40 input on
    a 50 x 70 x 50 FFT keeps 64% of the rows, the weight gradient's 21^3 taps 13%).
    """
    if not _on_pocketfft(t):
        result = torch.fft.irfftn(t, s=plan.fft_shape(), dim=plan.dims)
        for d in plan.dims:
            result = read(result, d)
        return result
    workers = torch.get_num_threads()
    for d in plan.dims[:-1]:
        t = read(torch.from_numpy(scipy.fft.ifft(_numpy(t), axis=d, workers=workers, overwrite_x=True)), d)
    last = plan.dims[-1]
    return read(torch.from_numpy(scipy.fft.irfft(_numpy(t), n=plan.fft_sizes[last], axis=last, workers=workers,
                                                 overwrite_x=True)), last)


def _axis_transform(t: Tensor, dim: int) -> Tensor:
    """The 1-D FFT along ``dim``: real input gives the half spectrum (rfft), complex input the full one (fft);
    ``t`` may be overwritten."""
    real = not t.is_complex()
    if _on_pocketfft(t):
        transform = scipy.fft.rfft if real else scipy.fft.fft
        return torch.from_numpy(transform(_numpy(t), axis=dim, workers=torch.get_num_threads(), overwrite_x=True))
    return torch.fft.rfft(t, dim=dim) if real else torch.fft.fft(t, dim=dim)


def kernel_spectrum(weight: Tensor, plan: ConvPlan) -> Tensor:
    """Spectrum of the cropped kernel stored centred (tap offset j at index j mod n).

    Args:
        weight: [C, 1, *k] real.

    Returns:
        [C, *m] complex, m the rfftn shape along ``plan.dims`` and 1 along the other axes; without transformed axes
        the real cropped kernel [C, 1, ...] itself (a per-channel scale).
    """
    u = weight[(slice(None), 0) + crop_slices(plan)]
    if not plan.dims:
        return u
    # Pruned transform, one axis at a time from the last: along each axis the 2r + 1 taps are placed centred (offset
    # j at index j mod n, a wrap of the small cropped kernel, no phase ramp) and transformed, so the rows that are all
    # zero in the padded kernel are never transformed. At k = 21 on a 50 x 70 x 50 FFT that skips 91% of the
    # last axis's rows and 70% of the middle axis's.
    last = plan.dims[-1]
    spectrum = _axis_transform(_centred(u, last, plan), last)
    for d in reversed(plan.dims[:-1]):
        spectrum = _axis_transform(_centred(spectrum, d, plan), d)
    return spectrum


def _centred(t: Tensor, d: int, plan: ConvPlan) -> Tensor:
    """The 2r + 1 taps along axis ``d`` (stored at 0..2r) moved to indices n - r..n - 1, 0..r of a length-n axis."""
    r, n = plan.radii[d], plan.fft_sizes[d]
    zeros = t.new_zeros(t.shape[:t.ndim + d] + (n - 2 * r - 1,) + t.shape[t.ndim + d + 1:])
    return torch.cat([t.narrow(d, r, r + 1), zeros, t.narrow(d, 0, r)], dim=d)


def input_part(plan: ConvPlan):
    """``irfftn_read``'s reader of the input's extent: indices 0..D-1 along each transformed axis."""
    return lambda t, d: t.narrow(d, 0, plan.spatial[d])


def tap_part(plan: ConvPlan):
    """``irfftn_read``'s reader of the kernel taps: offsets -r..r (stored at indices n-r..n-1, 0..r), in kernel
    order."""
    def read(t: Tensor, d: int) -> Tensor:
        r, n = plan.radii[d], plan.fft_sizes[d]
        return torch.cat([t.narrow(d, n - r, r), t.narrow(d, 0, r + 1)], dim=d)
    return read


def prepared_spectrum(weight: Tensor, plan: ConvPlan, compute: torch.dtype) -> Tensor:
    """The kernel as the forward multiplies it: its spectrum, conjugated (a correlation), in ``compute`` precision.

    Args:
        weight: [C, 1, *k].

    Returns:
        [C, *m] complex (see ``kernel_spectrum``); without transformed axes the cropped real kernel [C, 1, ...].
    """
    spectrum = kernel_spectrum(weight.to(compute), plan)
    # Conjugates are taken physically, in place: torch's lazy conjugate views are resolved wrongly (ignored) when
    # this runs inside a graph compiled by AOTAutograd, which silently turns the correlation into a convolution.
    return spectrum.conj_physical_() if plan.dims else spectrum


def apply_spectrum(x: Tensor, spectrum: Tensor, bias: Tensor | None, plan: ConvPlan, compute: torch.dtype) -> Tensor:
    """The depthwise conv of x with a ``prepared_spectrum``, in ``compute`` precision.

    Args:
        x: [N, C, *spatial], or [N, 1, *spatial] read by all C filters (``fan_out_conv``: the input's spectrum
            broadcasts against the C kernel spectra, so it is transformed once).
        spectrum: ``prepared_spectrum`` of a [C, 1, *k] kernel for this plan; bias: [C] or None.

    Returns:
        [N, C, *spatial] in ``compute``, contiguous.
    """
    x = x.to(compute)
    if plan.dims:
        xf = rfftn(x, plan.fft_shape(), plan.dims)
        # in place unless one shared input channel broadcasts against the C filters
        xf = xf.mul_(spectrum) if xf.shape[1] == spectrum.shape[0] else xf * spectrum
        del spectrum  # the last reference in a training forward: freed before the inverse transform allocates
        y = irfftn_read(xf, plan, input_part(plan))
        del xf
    else:
        y = x * spectrum  # all radii 0: a 1-tap kernel is a per-channel scale
    # The crop is a view into the padded buffer; the add (or the copy) materialises it so the buffer is freed.
    return y + bias.to(compute).view(-1, *([1] * len(plan.spatial))) if bias is not None else y.contiguous()


def fft_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: ConvPlan, compute: torch.dtype) -> Tensor:
    """The depthwise conv in the frequency domain, in ``compute`` precision.

    Args:
        x: [N, C, *spatial] or [N, 1, *spatial] (see ``apply_spectrum``).
        weight: [C, 1, *k]; bias: [C] or None.

    Returns:
        [N, C, *spatial] in ``compute``, contiguous.
    """
    return apply_spectrum(x, prepared_spectrum(weight, plan, compute), bias, plan, compute)


def fft_backward(grad_y: Tensor, x: Tensor, weight: Tensor, plan: ConvPlan, compute: torch.dtype,
                  need_x: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``fft_forward`` with respect to x and the weight (None where not needed), in their dtypes.

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
            grad_w[(slice(None), 0) + crop_slices(plan)] = taps.view(-1, *([1] * len(plan.spatial)))
        if need_x:
            grad_x = grad_y * kernel_spectrum(weight, plan)
            grad_x = grad_x.sum(1, keepdim=True) if shared_input else grad_x
    else:
        shape = plan.fft_shape()
        gyf = rfftn(grad_y, shape, plan.dims)
        if need_w:
            xf = rfftn(x, shape, plan.dims)
            # X * conj(GY) as conj(conj(X) * GY): conjugating X in place (physically, see _fft_forward) needs no
            # copy of the grad-output spectrum, and the second conjugate acts on the batch-summed spectrum only.
            xf = xf.conj_physical_() * gyf if shared_input else xf.conj_physical_().mul_(gyf)
            # Summing the batch (and untransformed axes) in the frequency domain leaves one inverse per channel.
            untransformed = tuple(a for a in spatial_axes if a - x.ndim not in plan.dims)
            cross = xf.sum(dim=(0,) + untransformed, keepdim=True).conj_physical_()
            del xf
            taps = irfftn_read(cross, plan, tap_part(plan))
            grad_w[(slice(None), 0) + crop_slices(plan)] = taps[0]
        if need_x:
            gyf.mul_(kernel_spectrum(weight, plan))
            if shared_input:  # x was broadcast to every filter: its gradient sums theirs
                gyf = gyf.sum(1, keepdim=True)
            grad_x = irfftn_read(gyf, plan, input_part(plan)).contiguous()
    return (None if grad_x is None else grad_x.to(x_dtype), None if grad_w is None else grad_w.to(weight_dtype))
