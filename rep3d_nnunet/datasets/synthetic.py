"""Synthetic nnU-Net v2 raw datasets: a quick demo task and a task that needs long-range context.

Layout written (nnU-Net v2 raw format, plus ``labelsTs`` for evaluating the held-out cases; nnU-Net ignores it)::

    raw_root/DatasetXXX_Name/
        dataset.json                     (nnU-Net's own generate_dataset_json)
        imagesTr/case_000_0000.nii.gz    one file per channel, float32
        labelsTr/case_000.nii.gz         uint8, 0 background, 1 and 2 foreground
        imagesTs/test_000_0000.nii.gz
        labelsTs/test_000.nii.gz

Arrays are handled in numpy order (z, y, x); ``size`` and ``spacing`` are given in that order too and reversed
only where SimpleITK wants (x, y, z). Both tasks have two foreground classes and the same image model: a signal
(blobs, markers) times a per-channel gain, plus Gaussian noise, then z-scored per channel and case.

Tasks
-----
``local``
    2-4 non-overlapping axis-aligned ellipsoids per case with radii in millimetres (so anisotropic spacing still
    gives round objects in physical space). Class 1 blobs are bright, class 2 blobs are dark: a 3x3x3 receptive
    field decides the class. Every case holds at least one blob of each class.
``long_range``
    Every blob looks the same (bright, same radius distribution); its class comes from a marker far away.
    Rule: a marker plate of ``t = max(1, round(Y / 16))`` rows spans all of z at one end of the y axis (top or
    bottom, random per case) and is split at ``x = X // 2`` into two halves of opposite polarity: one bright, one
    dark (which is which is random per case). **A blob is class 1 if the marker half in its own x-half is bright
    and class 2 if it is dark**, equivalently: the class is the polarity of the marker plate nearest to the blob.
    Blobs sit in the far part of the volume: every blob voxel is at least ``min(20, Y // 2)`` rows away from the
    marker's inner face, and one column away from the x midline, so both halves hold 1-2 blobs and every case
    holds both classes. The marker itself is background (label 0): the task is to label the blobs, not the marker.

    Why polarity rather than "marker at the top -> class 1": nnU-Net trains and predicts with mirroring (and
    rotations), which swap top and bottom but keep the labels, so a position-based rule would be contradicted by
    the augmentation. "Nearest marker's polarity" survives mirroring and rotation. Nothing within the blob's
    neighbourhood tells the classes apart (same intensity, shape and noise, and left/right carries no information
    because the polarities are drawn at random), so a small receptive field is at chance.

Determinism: case ``i`` of split ``s`` (0 train, 1 test) is drawn from ``numpy.random.default_rng([seed, s, i])``,
so the same call writes byte-identical files, and the test cases do not depend on ``num_training``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .layout import check_int, check_target, move_into_place

TASKS = ("local", "long_range")
DEFAULT_NAMES = {"local": "Rep3DSynthLocal", "long_range": "Rep3DSynthLongRange"}
LABELS = {
    "local": {"background": 0, "bright_blob": 1, "dark_blob": 2},
    "long_range": {"background": 0, "blob_near_bright_marker": 1, "blob_near_dark_marker": 2},
}
FILE_ENDING = ".nii.gz"
MIN_SIZE = 8
GENERATOR_VERSION = 1  # bump when the images a given seed produces change

# Image model, in units of the noise-free signal; the noise keeps the local task easy (contrast/noise ~ 3) but
# not a copy of the label.
BLOB_CONTRAST = 1.0
MARKER_CONTRAST = 1.5
NOISE_STD = 0.35
# Blob radii as a fraction of the smallest physical extent of the volume: small enough that several fit.
RADIUS_FRACTION = (0.09, 0.16)
AXIS_STRETCH = (0.8, 1.25)  # per-axis factor on the radius: ellipsoids rather than spheres
PLACEMENT_ATTEMPTS = 200


@dataclass(frozen=True)
class Box:
    """Half-open voxel box ``[lo, hi)`` per axis (z, y, x) that a blob must lie inside."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]


@dataclass(frozen=True)
class Blob:
    """An axis-aligned ellipsoid: integer centre voxel and semi-axes in voxels, both (z, y, x)."""

    centre: tuple[int, int, int]
    semi_axes: tuple[float, float, float]

    def half_extent(self) -> np.ndarray:
        """Voxels the blob reaches from its centre per axis: a voxel at offset d is inside only if d <= semi-axis."""
        return np.floor(np.asarray(self.semi_axes)).astype(int)


# ----------------------------------------------------------------------------------------------------- public API


def generate_synthetic_dataset(raw_root: str | Path, dataset_id: int, task: str = "local", num_training: int = 20,
                               num_test: int = 4, size: Sequence[int] = (32, 32, 32),
                               spacing: Sequence[float] = (1.0, 1.0, 1.0), num_channels: int = 1, seed: int = 0,
                               dataset_name: str | None = None, overwrite: bool = False) -> Path:
    """Writes a synthetic nnU-Net v2 raw dataset and returns its folder ``raw_root/DatasetXXX_Name``.

    ``size`` (Z, Y, X) voxels and ``spacing`` (Z, Y, X) millimetres; images have shape (Z, Y, X) per channel.
    See the module docstring for the tasks and the long-range rule. Arguments are checked before anything is
    written; the dataset is built in a hidden folder next to the target and renamed into place at the end, so a
    failure never leaves a half-written dataset (with ``overwrite`` the old one is only removed after that).
    """
    task, size, spacing = _validate(dataset_id, task, num_training, num_test, size, spacing, num_channels, seed)
    name = DEFAULT_NAMES[task] if dataset_name is None else _validate_name(dataset_name)
    raw_root = Path(raw_root).expanduser()
    target = raw_root / f"Dataset{dataset_id:03d}_{name}"
    check_target(raw_root, target, dataset_id, overwrite)

    raw_root.mkdir(parents=True, exist_ok=True)
    staging = raw_root / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # a plain mkdir (not mkdtemp) so the final folder gets the user's umask, not 0700
    try:
        for split, (images, labels, prefix, count) in enumerate(
                [("imagesTr", "labelsTr", "case", num_training), ("imagesTs", "labelsTs", "test", num_test)]):
            for index in range(count):
                image, label = synthesize_case(task, case_rng(seed, split, index), size, spacing, num_channels)
                _write_case(staging / images, staging / labels, f"{prefix}_{index:03d}", image, label, spacing)
        _write_dataset_json(staging, name, task, num_training, num_test, size, spacing, num_channels, seed)
        move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def case_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """The generator for one case: independent per (seed, split, index), so cases never depend on each other."""
    return np.random.default_rng([seed, split, index])


def synthesize_case(task: str, rng: np.random.Generator, size: Sequence[int] = (32, 32, 32),
                    spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    num_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One case in memory: image (C, Z, Y, X) float32, z-scored per channel, and label (Z, Y, X) uint8."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(TASKS)}")
    size = tuple(int(s) for s in size)
    spacing = tuple(float(s) for s in spacing)
    signal, label = (_local_scene if task == "local" else _long_range_scene)(rng, size, spacing)
    return _render(rng, signal, num_channels), label


# ------------------------------------------------------------------------------------------------------ CLI glue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the flags of the ``synthetic`` subcommand; :func:`run_from_args` consumes them."""
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (DatasetXXX_...)")
    parser.add_argument("--task", choices=TASKS, default="local",
                        help="local: class visible in the blob; long_range: class set by a distant marker")
    parser.add_argument("--num-training", type=int, default=20, help="cases in imagesTr/labelsTr (default 20)")
    parser.add_argument("--num-test", type=int, default=4, help="cases in imagesTs/labelsTs (default 4)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("Z", "Y", "X"), default=[32, 32, 32],
                        help="volume size in voxels (default 32 32 32)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), default=[1.0, 1.0, 1.0],
                        help="voxel spacing in mm (default 1 1 1)")
    parser.add_argument("--channels", type=int, default=1, help="image channels (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="dataset name after the id (default per task, "
                                                      "e.g. Rep3DSynthLocal)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same folder")
    parser.add_argument("--raw-dir", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")


def run_from_args(args: argparse.Namespace) -> Path:
    """Generates the dataset described by parsed :func:`add_arguments` flags and returns its folder."""
    from ..nnunet_paths import nnunet_folder

    raw_dir = nnunet_folder("nnUNet_raw", args.raw_dir, hint=", or pass --raw-dir", must_exist=False)
    return generate_synthetic_dataset(raw_dir, args.dataset_id, task=args.task, num_training=args.num_training,
                                      num_test=args.num_test, size=args.size, spacing=args.spacing,
                                      num_channels=args.channels, seed=args.seed, dataset_name=args.name,
                                      overwrite=args.overwrite)


# ---------------------------------------------------------------------------------------------------- validation


def _validate(dataset_id, task, num_training, num_test, size, spacing, num_channels, seed):
    """Checks every argument up front (nothing is written before) and returns task, size, spacing normalised."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(TASKS)}")
    check_int("dataset_id", dataset_id, 0, 999)  # nnU-Net names datasets with three digits
    check_int("num_training", num_training, 1)
    check_int("num_test", num_test, 0)
    check_int("num_channels", num_channels, 1)
    check_int("seed", seed, 0)  # numpy's SeedSequence takes non-negative integers only
    size = _triple("size", size)
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size):
        raise ValueError(f"size must be three integers (Z, Y, X), got {size}")
    if min(size) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} voxels along every axis, got {tuple(size)}")
    spacing = _triple("spacing", spacing)
    try:
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three numbers in mm (Z, Y, X), got {spacing}") from None
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive finite numbers in mm (Z, Y, X), got {spacing}")
    return task, tuple(int(s) for s in size), spacing


def _triple(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise ValueError(f"{name} must have three entries (Z, Y, X), got {value!r}")
    return tuple(value)


def _validate_name(name: str) -> str:
    # nnU-Net finds datasets by folder name and splits identifiers on '_' only after the id; keep names path-safe
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ValueError(f"dataset_name must be letters, digits, '_' or '-' (no path separators), got {name!r}")
    return name


# ------------------------------------------------------------------------------------------------------- scenes


def _local_scene(rng: np.random.Generator, size, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Bright (class 1) and dark (class 2) blobs anywhere: signal (Z, Y, X) float64, label (Z, Y, X) uint8."""
    whole = Box((0, 0, 0), size)
    classes = [1, 2] + list(rng.integers(1, 3, size=int(rng.integers(0, 3))))  # one of each, then 0-2 more
    signal = np.zeros(size)
    label = np.zeros(size, np.uint8)
    placed: list[Blob] = []
    for position, cls in enumerate(classes):
        blob = _place_blob(rng, whole, spacing, _radius_range(size, spacing), placed, required=position < 2)
        if blob is None:
            continue
        placed.append(blob)
        mask = _ellipsoid_mask(blob, size)
        signal[mask] = BLOB_CONTRAST if cls == 1 else -BLOB_CONTRAST
        label[mask] = cls
    return signal, label


def long_range_geometry(size: Sequence[int]) -> tuple[int, int]:
    """(marker thickness in rows, minimum rows between the marker's inner face and any blob voxel) for (Z, Y, X)."""
    rows = size[1]
    return max(1, round(rows / 16)), min(20, rows // 2)


def _long_range_scene(rng: np.random.Generator, size, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Identical bright blobs labelled by the polarity of the marker half above/below them (see module docstring).

    Returns signal (Z, Y, X) float64 and label (Z, Y, X) uint8.
    """
    z, y, x = size
    thickness, gap = long_range_geometry(size)
    at_top = bool(rng.random() < 0.5)
    left_bright = bool(rng.random() < 0.5)
    half = x // 2
    signal = np.zeros(size)
    label = np.zeros(size, np.uint8)

    rows = slice(0, thickness) if at_top else slice(y - thickness, y)
    left_sign = 1.0 if left_bright else -1.0
    signal[:, rows, :half] = left_sign * MARKER_CONTRAST
    signal[:, rows, half:] = -left_sign * MARKER_CONTRAST

    # blobs only where they are far from the marker; one empty column each side of the midline keeps the two
    # halves' blobs apart, so the class boundary never runs through an object
    y_lo, y_hi = (thickness + gap, y) if at_top else (0, y - thickness - gap)
    halves = [((0, half - 1), 1 if left_bright else 2), ((half + 1, x), 2 if left_bright else 1)]
    radius_range = _radius_range(size, spacing)
    for (x_lo, x_hi), cls in halves:
        box = Box((0, y_lo, x_lo), (z, y_hi, x_hi))
        placed: list[Blob] = []
        for position in range(int(rng.integers(1, 3))):
            blob = _place_blob(rng, box, spacing, radius_range, placed, required=position == 0)
            if blob is None:
                continue
            placed.append(blob)
            mask = _ellipsoid_mask(blob, size)
            signal[mask] = BLOB_CONTRAST  # the same for both classes: only the marker tells them apart
            label[mask] = cls
    return signal, label


def _radius_range(size, spacing) -> tuple[float, float]:
    """Blob radius range in mm: a fraction of the smallest physical extent, at least 1.5 in-plane voxels."""
    extent = min(n * s for n, s in zip(size, spacing))
    low = max(RADIUS_FRACTION[0] * extent, 1.5 * min(spacing))
    return low, max(RADIUS_FRACTION[1] * extent, low)


def _place_blob(rng: np.random.Generator, box: Box, spacing, radius_range, placed: list[Blob],
                required: bool) -> Blob | None:
    """Draws an ellipsoid inside ``box`` clear of ``placed``; shrinks until it fits if ``required``, else may give up.

    Radii are drawn in mm and converted with the spacing, so objects are round in physical space.
    """
    shrink = 1.0
    while True:
        for _ in range(PLACEMENT_ATTEMPTS):
            radius = rng.uniform(*radius_range) * shrink
            stretch = rng.uniform(*AXIS_STRETCH, size=3)
            semi_axes = radius * stretch / np.asarray(spacing)
            # fit the box: a blob reaches floor(semi-axis) voxels from its integer centre
            room = (np.asarray(box.hi) - np.asarray(box.lo) - 1) / 2
            semi_axes = np.minimum(semi_axes, room)
            reach = np.floor(semi_axes).astype(int)
            centre = tuple(int(rng.integers(lo + r, hi - r)) for lo, hi, r in zip(box.lo, box.hi, reach))
            blob = Blob(centre, tuple(float(a) for a in semi_axes))
            if all(_apart(blob, other) for other in placed):
                return blob
        if not required or shrink < 0.05:
            if required:
                raise RuntimeError(f"could not place a blob in {box}; the volume is too small")
            return None
        shrink *= 0.7


def _apart(a: Blob, b: Blob) -> bool:
    """True if the blobs' bounding boxes are separated by at least one background voxel along some axis."""
    distance = np.abs(np.asarray(a.centre) - np.asarray(b.centre))
    return bool(np.any(distance > a.half_extent() + b.half_extent() + 1))


def _ellipsoid_mask(blob: Blob, size) -> np.ndarray:
    """Boolean (Z, Y, X) mask of the voxels with sum(((i - centre) / semi_axis)^2) <= 1."""
    grids = np.ogrid[tuple(slice(0, n) for n in size)]
    total = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, blob.centre, blob.semi_axes))
    return total <= 1.0


def _render(rng: np.random.Generator, signal: np.ndarray, num_channels: int) -> np.ndarray:
    """Signal (Z, Y, X) -> image (C, Z, Y, X) float32: per-channel gain and noise, then z-score per channel.

    Channels differ in gain (and alternate in sign) so multi-channel data is not just repeated copies.
    """
    channels = []
    for c in range(num_channels):
        gain = (-1.0) ** c / (1.0 + 0.5 * c)
        image = gain * signal + rng.normal(0.0, NOISE_STD, size=signal.shape)
        channels.append((image - image.mean()) / image.std())
    return np.stack(channels).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ writing


def _write_case(images: Path, labels: Path, case: str, image: np.ndarray, label: np.ndarray, spacing) -> None:
    """Writes ``case_XXXX.nii.gz`` per channel of image (C, Z, Y, X) and ``case.nii.gz`` for label (Z, Y, X)."""
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    for c, channel in enumerate(image):
        _write_volume(channel, spacing, images / f"{case}_{c:04d}{FILE_ENDING}")
    _write_volume(label, spacing, labels / f"{case}{FILE_ENDING}")


def _write_volume(array: np.ndarray, spacing, path: Path) -> None:
    volume = sitk.GetImageFromArray(array)  # numpy (z, y, x) -> ITK (x, y, z)
    volume.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # ... so the spacing is reversed too
    sitk.WriteImage(volume, str(path), useCompression=True)


def _write_dataset_json(folder: Path, name: str, task: str, num_training: int, num_test: int, size, spacing,
                        num_channels: int, seed: int) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    # channel names decide nnU-Net's normalisation; anything but "CT" gets z-scoring, which suits these images
    channel_names = {str(c): f"synthetic{c}" for c in range(num_channels)}
    generate_dataset_json(
        str(folder), channel_names, dict(LABELS[task]), num_training, FILE_ENDING, dataset_name=name,
        description=_DESCRIPTIONS[task], license="CC0 (synthetic data generated by rep3d_nnunet)",
        converted_by="rep3d_nnunet.datasets.synthetic", numTest=num_test,
        rep3d_synthetic={"task": task, "seed": seed, "size_zyx": list(size), "spacing_zyx": list(spacing),
                         "generator_version": GENERATOR_VERSION},
    )


_DESCRIPTIONS = {
    "local": "Bright (1) and dark (2) ellipsoids in noise; the class is visible locally.",
    "long_range": "Identical bright ellipsoids; class 1 if the marker plate half at the far y end of their x-half "
                  "is bright, class 2 if it is dark. The marker is background.",
}
