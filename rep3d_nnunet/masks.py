"""Modulation masks of a Rep3D model (``rep3d-nnunet masks``).

``write_masks``: per Rep3D block, central slices of the channel-mean mask M = P + f(P) beside the distance prior P,
plus per-block numbers (centre value, mean, centre/edge ratio, beta), as in the paper's interpretability discussion.
Modes without a mask show the effective kernel |W_eff| instead; in an exported (folded) model folder M has been
multiplied into the kernel, so the folded kernel |W_deploy| is shown beside P at beta = 1.

Writes into a folder of its own (default ``./rep3d_masks_<model folder name>``), never into the model folder.
Loading the model folder and the figure helpers come from ``inspection``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .blocks import ModulatedDepthwiseConv
from .inspection import (
    add_common_arguments,
    central_slices,
    default_output_folder,
    load_rep3d_model,
    new_figure,
    set_title,
)
from .model_folder import DEFAULT_CHECKPOINT
from .modulation import DistancePrior

_STAGE_PATTERN = re.compile(r"stages\.(\d+)\.")


@dataclass
class BlockKernel:
    """One large depthwise kernel of a Rep3D network, as the masks picture shows it.

    Attributes:
        name: module path, e.g. ``encoder.stages.1.2.conv``.
        stage: encoder stage (0 when the module path names none).
        block: index of the block within its stage.
        mode: the modulation mode (``lrbm``, ``fixed``, ``none``, ``csla``), ``... (folded)`` after export.
        kernel_size: odd size per axis.
        shown: what ``values`` holds, e.g. ``M = P + f(P)`` or ``|W_deploy|``.
        values: channel mean of what ``shown`` says, shape [*kernel_size].
        prior: the distance prior beside it, shape [*kernel_size].
        prior_label: what ``prior`` is (the block's own P, or P at beta = 1 for reference).
        beta: the learned beta of the prior (``lrbm``), else None.
    """

    name: str
    stage: int
    block: int
    mode: str
    kernel_size: tuple[int, ...]
    shown: str
    values: np.ndarray = field(repr=False)
    prior: np.ndarray = field(repr=False)
    prior_label: str
    beta: float | None

    def summary(self) -> dict:
        """Per-block numbers of ``values``: centre tap, mean, centre / mean of the kernel's outer faces.

        The outer faces are the taps with index 0 or k - 1 on some axis with k > 1; the ratio is None for a 1-tap
        kernel and inf when the edge mean is 0.
        """
        centre = float(self.values[tuple(k // 2 for k in self.kernel_size)])
        edge = _edge_mean(self.values)
        ratio = None if edge is None else (centre / edge if edge != 0 else math.inf)
        return {
            "stage": self.stage, "block": self.block, "name": self.name, "mode": self.mode,
            "kernel_size": list(self.kernel_size), "shown": self.shown, "beta": self.beta,
            "centre": centre, "mean": float(self.values.mean()), "centre_edge_ratio": ratio,
        }


def _edge_mean(values: np.ndarray) -> float | None:
    shell = np.zeros(values.shape, dtype=bool)
    for axis, size in enumerate(values.shape):
        if size > 1:
            index = [slice(None)] * values.ndim
            index[axis] = [0, size - 1]
            shell[tuple(index)] = True
    return float(values[shell].mean()) if shell.any() else None


def _channel_mean(kernel: torch.Tensor) -> np.ndarray:
    """[C or 1, 1, *k] -> [*k] float64."""
    return kernel.detach().double().mean(dim=(0, 1)).cpu().numpy()


def _block_kernel(name: str, stage: int, block: int, conv: ModulatedDepthwiseConv) -> BlockKernel:
    kernel_size = tuple(conv.kernel_size)
    reference = _channel_mean(DistancePrior(kernel_size, learnable_beta=False)()[None, None])
    # Mode none has nothing to fold: its state dict looks folded (weight only), its kernel is the same either way.
    if conv.is_folded and conv.modulation_mode != "none":
        shown = ("|W_deploy| (CSLA branches merged)" if conv.modulation_mode == "csla"
                 else "|W_deploy| = |W * M| (M folded in)")
        return BlockKernel(name, stage, block, f"{conv.modulation_mode} (folded)", kernel_size, shown,
                           _channel_mean(conv.weight.abs()), reference, "P (beta = 1, reference)", None)
    if conv.modulation is not None:
        # Eval mode without autograd: the mask the trained model applies (cached; the training formula).
        values = _channel_mean(conv.mask())
        prior = _channel_mean(conv.modulation.prior()[None, None])
        if conv.modulation_mode == "lrbm":
            return BlockKernel(name, stage, block, "lrbm", kernel_size, "M = P + f(P)", values, prior,
                               "P (learned beta)", float(conv.modulation.prior.beta))
        return BlockKernel(name, stage, block, conv.modulation_mode, kernel_size, "M = P (fixed prior)", values,
                           prior, "P (beta = 1)", None)
    kernel = _channel_mean(conv.effective_weight().abs())
    return BlockKernel(name, stage, block, conv.modulation_mode, kernel_size,
                       f"|W_eff| (no mask in mode {conv.modulation_mode})", kernel, reference,
                       "P (beta = 1, reference)", None)


def block_kernels(network: nn.Module) -> list[BlockKernel]:
    """The large kernel of every Rep3D block, in module order, with its mask (or kernel) and prior.

    Stages are read from module paths (``...stages.<s>...``, as in ``Rep3DUNet``); blocks are numbered within their
    stage. Masks are computed in eval mode; the network's train/eval mode is restored afterwards.
    """
    was_training = network.training
    network.eval()
    kernels: list[BlockKernel] = []
    blocks_in_stage: dict[int, int] = {}
    try:
        with torch.no_grad():
            for name, module in network.named_modules():
                if isinstance(module, ModulatedDepthwiseConv):
                    found = _STAGE_PATTERN.search(name)
                    stage = int(found.group(1)) if found else 0
                    block = blocks_in_stage.get(stage, 0)
                    blocks_in_stage[stage] = block + 1
                    kernels.append(_block_kernel(name, stage, block, module))
    finally:
        network.train(was_training)
    return kernels


def plot_block_kernels(kernels: Sequence[BlockKernel], path: str | Path, title: str = "") -> Path:
    """One grid, one row per block (grouped by stage): central slices of ``values``, then of the prior.

    Args:
        kernels: from ``block_kernels``; all 2D or all 3D.
        path: PNG to write.
        title: first line of the figure title; notes on what is shown (mask, kernel, folded) are added.

    Returns:
        ``path``.
    """
    if not kernels:
        raise ValueError("No Rep3D blocks to draw.")
    per_group = len(central_slices(kernels[0].values))
    rows, columns = len(kernels), 2 * per_group
    figure = new_figure(1.9 * columns + 1.2, 1.75 * rows + 1.0)
    axes = figure.subplots(rows, columns, squeeze=False)
    for row, kernel in enumerate(kernels):
        top = max(float(kernel.values.max()), 1e-12)
        groups = ((kernel.values, kernel.shown, min(0.0, float(kernel.values.min())), top),
                  (kernel.prior, kernel.prior_label, 0.0, 1.0))
        for group, (volume, label, vmin, vmax) in enumerate(groups):
            group_axes = []
            for column, (where, picture) in enumerate(central_slices(volume)):
                ax = axes[row, group * per_group + column]
                image = ax.imshow(picture, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{label}\n{where}".strip(), fontsize=7)
                group_axes.append(ax)
            figure.colorbar(image, ax=group_axes, shrink=0.8, pad=0.01)
        size = "x".join(map(str, kernel.kernel_size))
        beta = f", beta {kernel.beta:.3f}" if kernel.beta is not None else ""
        axes[row, 0].set_ylabel(f"stage {kernel.stage} block {kernel.block}\nk {size}, {kernel.mode}{beta}",
                                fontsize=7)
    notes = sorted({_note(k) for k in kernels} - {""})
    set_title(figure, [title or "Rep3D modulation masks (channel mean)", *notes])
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def _note(kernel: BlockKernel) -> str:
    if kernel.mode == "csla (folded)":
        return "exported CSLA model: showing the merged kernel |W_deploy| (CSLA has no mask), beside P at beta = 1"
    if kernel.mode.endswith("(folded)"):
        return "M is folded into the kernel (exported model): showing |W_deploy| = |W * M|, beside P at beta = 1"
    if kernel.shown.startswith("|W_eff|"):
        return f"mode {kernel.mode} has no mask: showing the effective kernel |W_eff|, beside P at beta = 1"
    return ""


@dataclass
class MasksReport:
    """What ``write_masks`` wrote: the figure, the per-block numbers (CSV and JSON) and those numbers."""

    figure: Path
    csv: Path
    json: Path
    blocks: list[dict]
    folded: bool


def write_masks(model_folder: str | Path, output_folder: str | Path | None = None, fold: str | int | None = None,
                checkpoint_name: str = DEFAULT_CHECKPOINT) -> MasksReport:
    """Draws the modulation masks of a trained or exported Rep3D model folder and writes per-block numbers.

    Writes ``masks.png``, ``masks.csv`` and ``masks.json`` into ``output_folder`` (default
    ``./rep3d_masks_<model folder name>``).

    Raises:
        FileNotFoundError, ValueError: see ``load_rep3d_model``.
    """
    model = load_rep3d_model(model_folder, fold, checkpoint_name)
    output = Path(output_folder) if output_folder is not None else default_output_folder("masks", model_folder)
    output.mkdir(parents=True, exist_ok=True)
    kernels = block_kernels(model.network)
    source = f"{model.folder.path.resolve().name} / {model.checkpoint_path.relative_to(model.folder.path)}"
    figure = plot_block_kernels(kernels, output / "masks.png", f"Rep3D modulation masks (channel mean): {source}")
    rows = [k.summary() for k in kernels]
    csv_path = output / "masks.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "kernel_size": "x".join(map(str, row["kernel_size"]))})
    json_path = output / "masks.json"
    json_path.write_text(json.dumps({
        "model_folder": str(model.folder.path.resolve()),
        "checkpoint": str(model.checkpoint_path.relative_to(model.folder.path)),
        "folded": model.folded, "blocks": rows,
    }, indent=2))
    return MasksReport(figure, csv_path, json_path, rows, model.folded)


# ---- command-line glue (wired into rep3d-nnunet by cli.py) ----


def add_masks_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet masks MODEL_FOLDER [-o OUT] [--fold F] [--checkpoint NAME]``."""
    add_common_arguments(parser, "masks")


def run_masks(args: argparse.Namespace) -> int:
    """``rep3d-nnunet masks``: writes the mask figure and per-block numbers, prints where. Returns 0."""
    report = write_masks(args.model_folder, args.output, args.fold, args.checkpoint)
    for row in report.blocks:
        ratio = row["centre_edge_ratio"]
        beta = f", beta {row['beta']:.3f}" if row["beta"] is not None else ""
        print(f"stage {row['stage']} block {row['block']} ({'x'.join(map(str, row['kernel_size']))}, {row['mode']}"
              f"{beta}): {row['shown']} centre {row['centre']:.4g}, mean {row['mean']:.4g}, centre/edge "
              f"{'n/a' if ratio is None else f'{ratio:.3g}'}")
    print(f"Wrote {report.figure}, {report.csv.name} and {report.json.name}")
    return 0
