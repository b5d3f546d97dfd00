"""Depthwise convolution with large kernels: the public API over two backends, ``direct`` and ``fft``.

``depthwise_conv(x, weight, bias, backend)`` has the semantics of ``F.conv2d/conv3d(x, weight, bias, padding=k // 2,
groups=C)``: stride 1, zero "same" padding, cross-correlation, one filter per channel. ``direct`` is torch's conv with
the kernel cropped to the taps that can touch the input, ``fft`` the exact FFT path (both in ``conv_backends``);
``auto`` reads the decision for this shape (``backend_choice``: one per device model, dtype, memory format and
per-sample shape, the same in training and prediction). A shape undecided under the ``measure`` policy is measured
once, here, in eager mode (``backend_measurement``); our trainers decide every shape of a run before it starts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backend_choice, backend_measurement
from .backend_choice import BACKENDS
from .conv_backends import convolve, direct_conv
from .fft_maths import apply_spectrum, prepared_spectrum
from .fft_operator import autocast_disabled, compute_dtypes
from .kernel_geometry import ConvPlan, check_kernel_size, conv_plan


def fan_out_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "auto") -> Tensor:
    """One input channel, C filters, "same" padding, stride 1: ``F.conv2d/conv3d(x, weight, bias, padding=k // 2)``.

    Equal to ``depthwise_conv(x.expand(N, C, ...), weight, bias)``, but the FFT backend transforms the shared input
    once instead of C times and sums its gradient over the filters before one inverse transform; the direct backend
    is torch's conv with one input channel. The LRBM generator's first conv is one: every filter reads the prior P.

    Args:
        x: [N, 1, *spatial], 2 or 3 spatial axes.
        weight: [C, 1, *k], every k odd.
        bias: [C] or None.
        backend: ``"direct"``, ``"fft"`` or ``"auto"`` (``backend_choice`` for this operation and shape).

    Returns:
        [N, C, *spatial], dtypes as ``depthwise_conv``.

    Raises:
        ValueError: as ``depthwise_conv``, or an input with more than one channel.
    """
    if x.ndim in (4, 5) and x.shape[1] != 1:
        raise ValueError(f"fan_out_conv expects an input with one channel [N, 1, *spatial], got {tuple(x.shape)}; "
                         f"use depthwise_conv for one filter per channel.")
    plan, backend = _checked_plan(x, weight, bias, backend, channels=weight.shape[0] if weight.ndim else 0,
                                  operation="fan_out")
    return convolve(backend, "fan_out", x, weight, bias, plan)


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Depthwise "same" convolution, stride 1: ``F.conv2d/conv3d(x, weight, bias, padding=k // 2, groups=C)``.

    Args:
        x: [N, C, *spatial], 2 or 3 spatial axes.
        weight: [C, 1, *k], every k odd (anisotropic allowed, e.g. (1, 21, 21)); may be larger than the input.
        bias: [C] or None.
        backend: ``"direct"`` (torch's conv), ``"fft"`` (real FFTs for forward and both gradients) or ``"auto"``
            (``backend_choice``: one decision per device model, dtype, memory format and per-sample shape, whatever
            the grad mode).

    Returns:
        [N, C, *spatial]. Under autocast the dtype torch's conv would give (the autocast dtype; the FFT itself runs
        in float32), otherwise the input's dtype (float16/bfloat16 inputs are transformed in float32).

    Raises:
        ValueError: unknown backend, input not 4-D/5-D, weight or bias shape not matching the channels, even kernel,
            input and weight dtypes differing outside autocast (FFT backend).
    """
    plan, backend = _checked_plan(x, weight, bias, backend, channels=x.shape[1] if x.ndim > 1 else 0)
    return convolve(backend, "depthwise", x, weight, bias, plan)


class PreparedKernel(NamedTuple):
    """A depthwise kernel made ready for repeated inference on inputs of one shape (``prepare_kernel``).

    Attributes:
        plan: the geometry for inputs of ``plan.spatial``.
        backend: ``"direct"`` or ``"fft"``.
        kernel: fft: the conjugated kernel spectrum [C, *m] in ``compute_dtype``; direct: the weight [C, 1, *k].
        bias: [C] or None (fft: in ``compute_dtype``).
        compute_dtype, result_dtype: as ``depthwise_conv`` runs and returns them.
    """

    plan: ConvPlan
    backend: str
    kernel: Tensor
    bias: Tensor | None
    compute_dtype: torch.dtype
    result_dtype: torch.dtype


def prepare_kernel(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "auto") -> PreparedKernel:
    """Everything ``depthwise_conv(x, weight, bias, backend)`` derives from the kernel alone, for inputs like ``x``.

    A sliding-window predictor runs the network with unchanged weights on every tile and mirror flip of a case, all of
    one shape: the FFT backend then transforms each kernel once instead of once per call. ``x`` is only read for its
    shape, dtype and device (and the autocast state decides as in ``depthwise_conv``).

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
    compute, result = compute_dtypes(x, weight)
    with autocast_disabled(x.device.type):
        spectrum = prepared_spectrum(weight, plan, compute)
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
        return direct_conv(x, prepared.kernel, prepared.bias, prepared.plan, groups=x.shape[1])
    with autocast_disabled(x.device.type):
        y = apply_spectrum(x, prepared.kernel, prepared.bias, prepared.plan, prepared.compute_dtype)
    return y.to(prepared.result_dtype)


def _checked_plan(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str, channels: int,
                  operation: str = "depthwise") -> tuple[ConvPlan, str]:
    """Validates the arguments of a conv with ``channels`` outputs; returns its plan and the backend to use.

    For ``auto`` a shape undecided under the ``measure`` policy is measured first, in eager mode and on fresh
    tensors (``backend_measurement.measure``; while a network's pre-measurement collects, only noted); inside a
    torch.compile trace it is decided without measuring.
    """
    device_type = x.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    memory_format = backend_choice.memory_format_of(x)
    # the batch axis stays out: it is the one axis torch.compile may make dynamic (a symbol, not a constant)
    shapes = (tuple(x.shape[1:]), tuple(weight.shape), None if bias is None else tuple(bias.shape), channels)
    if backend == "auto" and not torch.compiler.is_compiling():
        plan, _ = _geometry(*shapes, "direct", operation, str(x.device), dtype, memory_format)  # validates first
        key = backend_choice.Key(operation, backend_choice.device_identity(str(x.device)), dtype, memory_format,
                                 tuple(x.shape[1:]), plan.kernel, channels)
        if backend_choice.undecided(key):
            backend_measurement.measure(backend_choice.ConvCall(key, x.shape[0], x.dtype, weight.dtype,
                                                                bias is not None, dtype if autocast else None,
                                                                x.device))
    return _geometry(*shapes, backend, operation, str(x.device), dtype, memory_format)


# Pure function of shapes, flags and the process's decisions: torch.compile calls it once while tracing and keeps its
# result as a constant (the shapes it reads are static there), instead of symbolically executing the size rounding
# and the backend choice for every convolution of the network. A decision, once taken, never changes.
@torch.compiler.assume_constant_result
def _geometry(sample_shape: tuple, weight_shape: tuple, bias_shape: tuple | None, channels: int, backend: str,
              operation: str, device: str, dtype: torch.dtype, memory_format: str) -> tuple[ConvPlan, str]:
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
    plan = conv_plan(spatial, check_kernel_size(weight_shape[2:], len(spatial)))
    if backend == "auto":
        # One sample's shape decides, whatever the grad mode: a batch size that changes (the last batch,
        # torch.compile's dynamic batch axis) never switches backends or adds guards, and prediction computes what
        # training did.
        backend = backend_choice.decided(backend_choice.Key(operation, backend_choice.device_identity(device), dtype,
                                                            memory_format, sample_shape, plan.kernel, channels))
    return plan, backend
