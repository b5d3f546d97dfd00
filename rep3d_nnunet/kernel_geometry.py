"""The geometry of a large depthwise convolution: kernel sizes, the taps that can touch an input, FFT sizes.

Exactness trick (both backends of ``ops``): along an axis of length D only offsets |o| <= D - 1 reach an input voxel
from an output voxel, so the kernel is cropped to radius r = min(k // 2, D - 1). The cropped taps multiply padding only,
contribute nothing, and get an exactly zero gradient. The FFT size per axis is the smallest 7-smooth n >= D + r
(``fft_maths`` derives why that size is free of aliasing). One home for these facts: the backends, the backend
choice, the blocks and the planner all read them here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


def check_kernel_size(kernel_size: int | Sequence[int], dim: int) -> tuple[int, ...]:
    """Expands an int to ``dim`` axes and checks that every axis is a positive odd number.

    Raises:
        ValueError: a size is even or not positive, or the number of axes is not ``dim``.
    """
    sizes = (int(kernel_size),) * dim if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    if len(sizes) != dim:
        raise ValueError(f"Kernel size {tuple(sizes)} has {len(sizes)} axes but the convolution has {dim} spatial "
                         f"axes.")
    if any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(
            f"Kernel size {tuple(sizes)} is not allowed: every axis must be a positive odd number "
            f"(1, 3, 5, ...), so that the kernel has a centre tap."
        )
    return sizes


def cropped_radii(spatial: Sequence[int], kernel: Sequence[int]) -> tuple[int, ...]:
    """Per axis the kernel radius that can touch an input of this length: min(k // 2, D - 1)."""
    return tuple(min(k // 2, max(d - 1, 0)) for d, k in zip(spatial, kernel))


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


class ConvPlan(NamedTuple):
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



def conv_plan(spatial: tuple[int, ...], kernel: tuple[int, ...]) -> ConvPlan:
    """The geometry of a convolution of an input of ``spatial`` size with a kernel of ``kernel`` size."""
    radii = cropped_radii(spatial, kernel)
    fft_sizes = tuple(next_smooth_size(d + r) if r > 0 else d for d, r in zip(spatial, radii))
    nd = len(spatial)
    dims = tuple(i - nd for i in range(nd) if radii[i] > 0)
    return ConvPlan(spatial, kernel, radii, fft_sizes, dims)


def crop_slices(plan: ConvPlan) -> tuple[slice, ...]:
    """Slices of the kernel's spatial axes that keep the taps within the radius of the centre."""
    return tuple(slice(k // 2 - r, k // 2 + r + 1) for k, r in zip(plan.kernel, plan.radii))


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
    plan = conv_plan(spatial, check_kernel_size(kernel_size, len(spatial)))
    if not plan.dims:
        return 0
    return 4 * 2 * _spectrum_complex(plan) + math.prod(plan.fft_sizes)


def fft_kernel_spectrum_floats(spatial_shape: Sequence[int], kernel_size: int | Sequence[int]) -> int:
    """Float32 elements of one channel's kernel spectrum, the part of ``fft_workspace_voxels`` that does not grow with
    the batch (one spectrum per channel, whatever N): a layer's workspace at batch N is
    ``N * C * (fft_workspace_voxels - this) + C * this``."""
    spatial = tuple(int(s) for s in spatial_shape)
    plan = conv_plan(spatial, check_kernel_size(kernel_size, len(spatial)))
    return 2 * _spectrum_complex(plan) if plan.dims else 0


def _spectrum_complex(plan) -> int:
    """Complex values of one (sample, channel) spectrum of ``plan`` (see ``fft_workspace_voxels``)."""
    last = plan.dims[-1]
    return math.prod(plan.fft_sizes) // plan.fft_sizes[last] * (plan.fft_sizes[last] // 2 + 1)


def stage_feature_map_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    """Spatial size of each encoder stage's output for a given patch.

    Raises:
        ValueError: the patch is not divisible by the network's total stride on some axis.
    """
    total_stride = np.prod(np.array(strides), axis=0)
    if any(p % s for p, s in zip(patch_size, total_stride)):
        raise ValueError(
            f"Patch size {list(patch_size)} is too small or not divisible by the network's total stride "
            f"{total_stride.tolist()} (the product of the plan's strides). Fix: use a patch that is a multiple of "
            f"the total stride on every axis, or re-plan (nnUNetv2_plan_and_preprocess / rep3d-nnunet plan)."
        )
    sizes, current = [], list(patch_size)
    for stride in strides:
        current = [c // s for c, s in zip(current, stride)]
        sizes.append(current)
    return sizes


def stage_kernel_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                       plan_kernel_sizes: Sequence[Sequence[int]], requested: int) -> list[list[int]]:
    """Large kernel per stage and axis: ``requested``, capped by what the feature map can use, 1 on flat axes.

    On an axis of length D only taps within D - 1 of the centre can touch the input, so a kernel wider than
    2 * D - 1 only adds taps that are always zero-padded. Axes where the plan's kernel is 1 (anisotropic stages)
    stay 1, as in nnU-Net's own network.
    """
    kernels = []
    for size, plan_kernel in zip(stage_feature_map_sizes(patch_size, strides), plan_kernel_sizes):
        kernels.append([1 if pk == 1 else min(requested, 2 * d - 1) for d, pk in zip(size, plan_kernel)])
    return kernels
