"""The FFT convolution as one ``torch.library`` operator (forward, fake and autograd), with autocast's dtypes.

The FFT conv is one opaque operator for torch.compile: dynamo records a single call (no graph break, no guards on
Python objects), inductor calls it as a unit (its transforms stay pocketfft/cuFFT calls), and AOTAutograd saves what
``setup_context`` saves. The geometry is derived from the tensors' static spatial and kernel shapes inside, so the
operator's arguments are tensors and a dtype only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .fft_maths import fft_backward, fft_forward
from .kernel_geometry import conv_plan


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context without autocast for ``device_type``; nothing to disable where autocast does not exist."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("rep3d_nnunet::fft_depthwise_conv", mutates_args=())
def fft_depthwise_conv_op(x: Tensor, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
    """``fft_forward`` for the plan of these shapes; [N, C, *spatial] in ``compute_dtype``."""
    with autocast_disabled(x.device.type):
        return fft_forward(x, weight, bias, conv_plan(tuple(x.shape[2:]), tuple(weight.shape[2:])), compute_dtype)


@fft_depthwise_conv_op.register_fake
def _(x, weight, bias, compute_dtype):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=compute_dtype)


@torch.library.custom_op("rep3d_nnunet::fft_depthwise_conv_backward", mutates_args=())
def fft_depthwise_conv_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, compute_dtype: torch.dtype,
                                   need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    """``fft_backward``; a gradient that is not needed comes back as an empty tensor (operators return tensors)."""
    with autocast_disabled(x.device.type):
        grad_x, grad_w = fft_backward(grad_y, x, weight, conv_plan(tuple(x.shape[2:]), tuple(weight.shape[2:])),
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


def compute_dtypes(x: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
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


def fft_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The FFT depthwise conv with autocast's dtypes (see ``compute_dtypes``)."""
    compute, result = compute_dtypes(x, weight)
    with autocast_disabled(x.device.type):
        y = fft_depthwise_conv_op(x, weight, bias, compute)
    return y.to(result)
