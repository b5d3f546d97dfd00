"""One PNG of a case's slices: the image, the ground truth and each model's segmentation side by side.

Rows are orthogonal slices through the ground truth's largest cross-section along each axis; columns are the image,
then the ground truth and every prediction drawn over it. Drawn on matplotlib's Agg canvas directly (no display, no
global pyplot state), as ``inspection`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

# label 0 transparent; then distinct colours that read on a grey MRI (and for colour-blind readers: orange/blue)
LABEL_COLOURS = ListedColormap([(0, 0, 0, 0), (1.0, 0.55, 0.0, 0.75), (0.1, 0.45, 1.0, 0.75), (0.2, 0.8, 0.2, 0.75),
                                (0.9, 0.2, 0.6, 0.75)])
COLOUR_NAMES = ("orange", "blue", "green", "pink")  # of labels 1, 2, 3, 4


def read_array(path: Path) -> np.ndarray:
    """A NIfTI file as a numpy array in SimpleITK's (z, y, x) order."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def central_slices(label: np.ndarray) -> list[tuple[int, int]]:
    """(axis, index) of the slice with the most foreground along each axis of a 3D label map (the middle one when
    the label is empty)."""
    slices = []
    for axis in range(label.ndim):
        other = tuple(a for a in range(label.ndim) if a != axis)
        area = (label > 0).sum(axis=other)
        slices.append((axis, int(area.argmax()) if area.any() else label.shape[axis] // 2))
    return slices


def write_slices_figure(image: Path, ground_truth: Path, predictions: Mapping[str, Path], output: Path,
                        label_names: Mapping[int, str] | None = None, title: str = "") -> Path:
    """Writes the PNG ``output``: one row per axis (slice through the largest ground-truth cross-section), columns
    image | ground truth | each prediction (``predictions``: column title -> segmentation file, same geometry).

    Raises:
        ValueError: a segmentation's shape differs from the image's.
    """
    image_array = read_array(image).astype(np.float32)
    columns = {"ground truth": read_array(ground_truth), **{name: read_array(p) for name, p in predictions.items()}}
    for name, array in columns.items():
        if array.shape != image_array.shape:
            raise ValueError(f"{name}: shape {array.shape} differs from the image's {image_array.shape}")
    low, high = np.percentile(image_array, [0.5, 99.5])
    rows = central_slices(columns["ground truth"])
    figure = Figure(figsize=(2.2 * (len(columns) + 1), 2.3 * len(rows) + 0.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), len(columns) + 1, squeeze=False)
    for row, (axis, index) in enumerate(rows):
        picture = np.take(image_array, index, axis=axis)
        for column, (name, segmentation) in enumerate([("image", None), *columns.items()]):
            ax = axes[row][column]
            ax.imshow(picture, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            if segmentation is not None:
                ax.imshow(np.take(segmentation, index, axis=axis), cmap=LABEL_COLOURS, vmin=0,
                          vmax=LABEL_COLOURS.N - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if column == 0:
                ax.set_ylabel(f"axis {axis}, slice {index}", fontsize=8)
    if label_names:
        legend = ", ".join(f"{name}: {COLOUR_NAMES[value - 1]}" for value, name in sorted(label_names.items())
                           if 0 < value <= len(COLOUR_NAMES))
        title = f"{title}  ({legend})" if title else legend
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output
