"""Pictures of what a Rep3D model learned: its modulation masks and its effective receptive field (ERF).

``masks`` (``write_masks``): per Rep3D block, central slices of the channel-mean mask M = P + f(P) beside the
distance prior P, plus per-block numbers (centre value, mean, centre/edge ratio, beta), as in the paper's
interpretability discussion. Modes without a mask show the effective kernel |W_eff| instead; in an exported (folded)
model folder M has been multiplied into the kernel, so the folded kernel |W_deploy| is shown beside P at beta = 1.

``erf`` (``write_erf``): the effective receptive field of the trained network and of its untrained initialisation,
side by side, as in the paper's Figure 3, plus the radius that holds 90% of the ERF's mass, so that documents can
compare numbers and not only pictures. ``effective_receptive_field`` works on any ``nn.Module``.

Both write into a folder of their own (default ``./rep3d_masks_<model folder name>`` / ``./rep3d_erf_<...>``), never
into the model folder. Figures are drawn on matplotlib's Agg canvas directly: no display, no global pyplot state.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from torch import nn

from .blocks import ModulatedDepthwiseConv
from .model_folder import DEFAULT_CHECKPOINT, ModelFolder, ModelFolderError
from .nnunet_compat import find_trainer_class
from .modulation import DistancePrior

ERF_MASS_FRACTION = 0.9
DEVICES = ("auto", "cpu", "cuda")
WHAT_A_REP3D_MODEL_FOLDER_IS = (
    "A Rep3D model folder is an nnU-Net model folder (dataset.json, plans.json, fold_*/checkpoint_*.pth) written by "
    "nnUNetv2_train with a Rep3D trainer (rep3d-nnunet trainers lists them), or its export (rep3d-nnunet export)."
)
_STAGE_PATTERN = re.compile(r"stages\.(\d+)\.")


# ---- loading a model folder ----


@dataclass
class Rep3DModel:
    """A Rep3D network loaded from a model folder, with what rebuilding it untrained needs.

    Attributes:
        folder: the opened model folder.
        checkpoint_path: the checkpoint the weights come from.
        checkpoint: its content.
        network: the network nnU-Net's predictor would build, weights loaded, eval mode, no deep supervision.
        convs: its modulated large depthwise convolutions, in module order.
        folded: whether the checkpoint holds folded (exported) weights.
        configuration: the nnU-Net configuration the checkpoint was trained on.
        patch_size: that configuration's patch size.
        num_input_channels: input channels of the network.
        output_channel: the logit channel of the first foreground class (1; 0 for region-based models).
        training_trainer: the trainer that trained it (for an exported folder the one recorded at export), which
            rebuilds the untrained training-form network from the plans.
    """

    folder: ModelFolder
    checkpoint_path: Path
    checkpoint: dict = field(repr=False)
    network: nn.Module = field(repr=False)
    convs: list[ModulatedDepthwiseConv] = field(repr=False)
    folded: bool
    configuration: str
    patch_size: list[int]
    num_input_channels: int
    output_channel: int
    training_trainer: type


def load_rep3d_model(model_folder: str | Path, fold: str | int | None = None,
                     checkpoint_name: str = DEFAULT_CHECKPOINT) -> Rep3DModel:
    """Builds the network of a trained or exported Rep3D model folder on the CPU, as nnU-Net's predictor would.

    Raises:
        FileNotFoundError: not an nnU-Net model folder, or the checkpoint does not exist.
        ModelFolderError: the checkpoint is unreadable or not nnU-Net's, its trainer cannot be found, its weights do
            not fit the network its trainer builds, or the network has no Rep3D (modulated depthwise) convolutions.
    """
    folder = ModelFolder.open(model_folder)
    path = folder.checkpoint_path(fold, checkpoint_name)
    checkpoint = folder.load_checkpoint(path)
    network = folder.load_network(checkpoint, path)
    convs = [m for m in network.modules() if isinstance(m, ModulatedDepthwiseConv)]
    if not convs:
        raise ModelFolderError(
            f"{folder.path} is not a Rep3D model folder: the network that {checkpoint['trainer_name']} builds "
            f"({type(network).__name__}) has no Rep3D large-kernel convolutions (ModulatedDepthwiseConv). "
            f"{WHAT_A_REP3D_MODEL_FOLDER_IS}"
        )
    # ``rep3d_folded`` is export's mark; mode-none kernels load as "folded" either way, so they cannot tell.
    folded = bool(checkpoint.get("rep3d_folded")) or any(c.is_folded and c.modulation_mode != "none" for c in convs)
    training_trainer = find_trainer_class(checkpoint.get("rep3d_trainer_name", checkpoint["trainer_name"]))
    # Region-based models have no background channel; otherwise channel 0 is the background.
    output_channel = 0 if folder.label_manager.has_regions else 1
    return Rep3DModel(folder, path, checkpoint, network, convs, folded, checkpoint["init_args"]["configuration"],
                      list(folder.configuration_manager(checkpoint).patch_size), folder.num_input_channels(checkpoint),
                      output_channel, training_trainer)


def build_untrained_network(model: Rep3DModel, seed: int = 0) -> nn.Module:
    """The training-form architecture, freshly initialised by the trainer that trained it with a fixed seed, in eval
    mode. The global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = model.folder.build_network(model.checkpoint, model.training_trainer)
    return network.eval()


# ---- masks ----


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
        # Eval mode without autograd: the mask the trained model actually applies (the cached float64 one).
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


def _central_slices(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(label, 2D map) per axis: the central slice across each axis of a 3D array, the array itself in 2D."""
    if volume.ndim == 2:
        return [("", volume)]
    if volume.ndim != 3:
        raise ValueError(f"Expected a 2D or 3D map, got shape {volume.shape}.")
    slices = []
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = volume.shape[axis] // 2
        slices.append((f"centre of axis {axis}", volume[tuple(index)]))
    return slices


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(max(width, 7.0), height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg explicitly: works headless, never touches pyplot's global backend
    return figure


def _set_title(figure: Figure, lines: Sequence[str]) -> None:
    # Long model folder names would otherwise run off a narrow (2D) figure; ~14 characters per inch at 9 points.
    width = int(figure.get_figwidth() * 14)
    figure.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=9)


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
    per_group = len(_central_slices(kernels[0].values))
    rows, columns = len(kernels), 2 * per_group
    figure = _new_figure(1.9 * columns + 1.2, 1.75 * rows + 1.0)
    axes = figure.subplots(rows, columns, squeeze=False)
    for row, kernel in enumerate(kernels):
        top = max(float(kernel.values.max()), 1e-12)
        groups = ((kernel.values, kernel.shown, min(0.0, float(kernel.values.min())), top),
                  (kernel.prior, kernel.prior_label, 0.0, 1.0))
        for group, (volume, label, vmin, vmax) in enumerate(groups):
            group_axes = []
            for column, (where, picture) in enumerate(_central_slices(volume)):
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
    _set_title(figure, [title or "Rep3D modulation masks (channel mean)", *notes])
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


def default_output_folder(kind: str, model_folder: str | Path) -> Path:
    """``./rep3d_<kind>_<model folder name>`` in the current directory."""
    return Path.cwd() / f"rep3d_{kind}_{Path(model_folder).resolve().name}"


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


# ---- effective receptive field ----


def effective_receptive_field(network: nn.Module, input_shape: Sequence[int], num_inputs: int = 8, seed: int = 0,
                              output_channel: int | None = None) -> np.ndarray:
    """Effective receptive field of the central output voxel, in eval mode.

    For each of ``num_inputs`` inputs x ~ N(0, 1): g = d y[c] / d x, where y[c] is the output at the central voxel
    (summed over output channels, or channel ``output_channel``); |g| is summed over input channels and averaged over
    the inputs, then divided by its maximum. Inputs are drawn on the CPU from ``seed`` and run one at a time on the
    network's device, so results do not depend on the device's RNG and memory stays that of one sample.

    Args:
        network: any module mapping [N, C, *spatial] to [N, K, *spatial_out] (or a list of such, highest resolution
            first, as with deep supervision: the first is used). Its train/eval mode is restored afterwards.
        input_shape: one sample's shape [C, *spatial].
        num_inputs: random inputs to average over.
        seed: seed of the random inputs.
        output_channel: the output channel to differentiate; None sums over all channels.

    Returns:
        float64 array [*spatial], maximum 1 (all zeros if the output does not depend on the input).

    Raises:
        ValueError: ``input_shape`` without a spatial axis, ``num_inputs`` < 1, or ``output_channel`` out of range.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) < 2:
        raise ValueError(f"input_shape must be [C, *spatial] (one sample), got {input_shape}.")
    if num_inputs < 1:
        raise ValueError(f"num_inputs must be at least 1, got {num_inputs}.")
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(input_shape[1:], dtype=torch.float64)
    was_training = network.training
    network.eval()
    try:
        with torch.enable_grad():
            for _ in range(num_inputs):
                x = torch.randn(1, *input_shape, generator=generator).to(device).requires_grad_(True)
                output = network(x)
                if isinstance(output, (list, tuple)):
                    output = output[0]
                centre = tuple(s // 2 for s in output.shape[2:])
                if output_channel is None:
                    target = output[(0, slice(None), *centre)].sum()
                elif not 0 <= output_channel < output.shape[1]:
                    raise ValueError(f"output_channel {output_channel} is out of range: the network has "
                                     f"{output.shape[1]} output channels.")
                else:
                    target = output[(0, output_channel, *centre)]
                # autograd.grad asks for the input's gradient only: no weight gradients are computed or accumulated.
                (gradient,) = torch.autograd.grad(target, x)
                total += gradient[0].detach().abs().sum(dim=0).double().cpu()
    finally:
        network.train(was_training)
    erf = (total / num_inputs).numpy()
    peak = erf.max()
    return erf / peak if peak > 0 else erf


def erf_radius(erf: np.ndarray, fraction: float = ERF_MASS_FRACTION) -> float:
    """Smallest Euclidean distance r (voxels) from the central voxel such that voxels within r hold ``fraction`` of
    the ERF's total mass.

    The centre is ``size // 2`` per axis, where ``effective_receptive_field`` puts the differentiated output voxel
    for networks whose output has the input's size (segmentation networks).

    Raises:
        ValueError: ``fraction`` not in (0, 1], or an ERF that is zero everywhere.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    values = np.asarray(erf, dtype=np.float64)
    mass = values.sum()
    if not mass > 0:
        raise ValueError("The ERF is zero everywhere: the output does not depend on the input.")
    grids = np.meshgrid(*[np.arange(s) - s // 2 for s in values.shape], indexing="ij")
    distance = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids)).ravel()
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(values.ravel()[order])
    # A relative tolerance, so that fraction = 1 is reached despite rounding in the cumulative sum.
    index = int(np.searchsorted(cumulative, fraction * mass * (1 - 1e-12)))
    return float(distance[order][min(index, distance.size - 1)])


def plot_erfs(erfs: dict[str, np.ndarray], radii: dict[str, float], path: str | Path, title: str = "",
              fraction: float = ERF_MASS_FRACTION) -> Path:
    """One row per ERF (e.g. trained, untrained): its central slices, with the circle holding ``fraction`` of it.

    Args:
        erfs: label -> ERF [*spatial], 2D or 3D, normalised to max 1.
        radii: label -> radius (voxels) from ``erf_radius``, drawn as a circle.
        path: PNG to write.
        title: figure title.
        fraction: the mass fraction the radii hold (for the labels).

    Returns:
        ``path``.
    """
    labels = list(erfs)
    columns = len(_central_slices(erfs[labels[0]]))
    figure = _new_figure(3.0 * columns + 1.0, 2.9 * len(labels) + 0.8)
    axes = figure.subplots(len(labels), columns, squeeze=False)
    image = None
    for row, label in enumerate(labels):
        for column, (where, picture) in enumerate(_central_slices(erfs[label])):
            ax = axes[row, column]
            image = ax.imshow(picture, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            centre = (picture.shape[1] // 2, picture.shape[0] // 2)
            ax.add_patch(Circle(centre, radii[label], fill=False, color="cyan", linewidth=0.8, linestyle="--"))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}: {where}".rstrip(": "), fontsize=8)
        axes[row, 0].set_ylabel(f"{label}\n{fraction:.0%} of the mass within r = {radii[label]:.1f} voxels", fontsize=8)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="|d y_centre / d x|, max 1")
    _set_title(figure, (title or "Effective receptive field").split("\n"))
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


@dataclass
class ErfReport:
    """What ``write_erf`` wrote and measured.

    Attributes:
        figure, json: the files written.
        radius: {"trained": r, "untrained": r}, voxels holding ``fraction`` of the ERF mass.
        fraction: the mass fraction.
        erfs: {"trained": ERF, "untrained": ERF}, each [*spatial], max 1.
    """

    figure: Path
    json: Path
    radius: dict[str, float]
    fraction: float
    erfs: dict[str, np.ndarray] = field(repr=False)


def _resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"Unknown device {device!r}; allowed values are {', '.join(DEVICES)}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU.")
    return torch.device(device)


def _check_size(network: nn.Module, size: Sequence[int], patch_size: Sequence[int]) -> list[int]:
    size = [int(s) for s in size]
    if len(size) != len(patch_size) or any(s < 1 for s in size):
        raise ValueError(f"--size {size} must give {len(patch_size)} positive sizes, one per axis of the model's "
                         f"patch {list(patch_size)}.")
    strides = getattr(getattr(network, "encoder", None), "strides", None)
    if strides is not None:
        total = [int(np.prod([s[i] for s in strides])) for i in range(len(size))]
        if any(s % t for s, t in zip(size, total)):
            raise ValueError(f"--size {size} is not divisible by the network's total stride {total} on every axis; "
                             f"use multiples of it (the patch size {list(patch_size)} always works).")
    return size


def write_erf(model_folder: str | Path, output_folder: str | Path | None = None, fold: str | int | None = None,
              checkpoint_name: str = DEFAULT_CHECKPOINT, num_inputs: int = 8, size: Sequence[int] | None = None,
              seed: int = 0, device: str = "auto", fraction: float = ERF_MASS_FRACTION,
              compare: Sequence[str | Path] = ()) -> ErfReport:
    """ERF of a trained or exported Rep3D model folder and of its untrained initialisation, side by side.

    ``compare`` adds the ERF of other model folders of the same configuration, of any trainer (e.g. the linear-probing
    baseline beside a DKA fine-tuning, or nnU-Net's default beside Rep3D), labelled by their trainer.

    The differentiated quantity is the logit of the first foreground class (channel 1; channel 0 for region-based
    models) at the central voxel. Not the sum over classes: softmax ignores a shift shared by all logits, so that
    sum carries no segmentation information and a trained network is free to make its gradients cancel.

    Writes ``erf.png`` and ``erf.json`` (radii, input size, settings) into ``output_folder`` (default
    ``./rep3d_erf_<model folder name>``).

    Args:
        model_folder: the model folder.
        output_folder: where to write.
        fold, checkpoint_name: which checkpoint (see ``find_checkpoint``).
        num_inputs: random N(0, 1) inputs to average over.
        size: spatial input size; default the configuration's patch size.
        seed: seed of the inputs and of the untrained network's initialisation.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        fraction: ERF mass fraction for the reported radius.
        compare: further model folders (same fold and checkpoint name).

    Raises:
        FileNotFoundError, ValueError: see ``load_rep3d_model``; a ``size`` the network cannot take; a compared
            folder of another configuration.
    """
    model = load_rep3d_model(model_folder, fold, checkpoint_name)
    run_on = _resolve_device(device)
    size = _check_size(model.network, size if size is not None else model.patch_size, model.patch_size)
    networks = {"trained": model.network}
    for other in compare:
        folder = ModelFolder.open(other)
        path = folder.checkpoint_path(fold, checkpoint_name)
        checkpoint = folder.load_checkpoint(path)
        if checkpoint["init_args"]["configuration"] != model.configuration:
            raise ModelFolderError(f"--compare {other} was trained on configuration "
                                   f"{checkpoint['init_args']['configuration']!r}, {model_folder} on "
                                   f"{model.configuration!r}: compare models of one configuration.")
        label = checkpoint.get("rep3d_trainer_name", checkpoint["trainer_name"])
        networks[label if label not in networks else f"{label} ({folder.path.name})"] = folder.load_network(
            checkpoint, path)
    networks["untrained"] = build_untrained_network(model, seed)
    output = Path(output_folder) if output_folder is not None else default_output_folder("erf", model_folder)
    output.mkdir(parents=True, exist_ok=True)
    input_shape = (model.num_input_channels, *size)
    erfs, radius = {}, {}
    for label, network in networks.items():
        erfs[label] = effective_receptive_field(network.to(run_on), input_shape, num_inputs, seed, model.output_channel)
        network.cpu()
        radius[label] = erf_radius(erfs[label], fraction)
    source = f"{model.folder.path.resolve().name} / {model.checkpoint_path.relative_to(model.folder.path)}"
    if model.folded:
        source += " (exported, folded)"
    title = (f"Effective receptive field, logit of output channel {model.output_channel} at the central voxel, "
             f"{num_inputs} N(0,1) inputs of size {'x'.join(map(str, size))}\n{source}; untrained: same architecture, "
             f"fresh initialisation (seed {seed})")
    figure = plot_erfs(erfs, radius, output / "erf.png", title, fraction)
    json_path = output / "erf.json"
    json_path.write_text(json.dumps({
        "model_folder": str(model.folder.path.resolve()),
        "checkpoint": str(model.checkpoint_path.relative_to(model.folder.path)),
        "folded": model.folded, "configuration": model.configuration, "input_size": size,
        "num_input_channels": model.num_input_channels, "num_inputs": num_inputs, "seed": seed,
        "output_channel": model.output_channel,
        "target": "logit of the first foreground class at the central voxel",
        "mass_fraction": fraction, "radius_voxels": radius,
    }, indent=2))
    return ErfReport(figure, json_path, radius, fraction, erfs)


# ---- command-line glue (wired into rep3d-nnunet by cli.py) ----


def _add_common_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("model_folder", help="trained or exported Rep3D nnU-Net model folder "
                                             "(Trainer__Plans__configuration with fold_*/ inside)")
    parser.add_argument("-o", "--output", default=None,
                        help=f"folder for the pictures and numbers (default: ./rep3d_{kind}_<model folder name>)")
    parser.add_argument("--fold", default=None,
                        help="fold whose checkpoint to use (default: the lowest fold that has it)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint file name inside the fold (default: {DEFAULT_CHECKPOINT})")


def add_masks_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet masks MODEL_FOLDER [-o OUT] [--fold F] [--checkpoint NAME]``."""
    _add_common_arguments(parser, "masks")


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


def add_erf_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet erf MODEL_FOLDER [-o OUT] [--fold F] [--checkpoint NAME] [--num-inputs N]
    [--size Z Y X] [--seed S] [--device D]``."""
    _add_common_arguments(parser, "erf")
    parser.add_argument("--num-inputs", type=int, default=8, help="random N(0,1) inputs to average over (default 8)")
    parser.add_argument("--size", type=int, nargs="+", default=None, metavar="N",
                        help="spatial input size, Z Y X (Y X for 2D); default the configuration's patch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and the untrained initialisation")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: CUDA when available")
    parser.add_argument("--compare", nargs="+", default=[], metavar="MODEL_FOLDER",
                        help="more model folders of the same configuration, any trainer, drawn beside it (e.g. the "
                             "linear-probing baseline of a DKA fine-tuning)")


def run_erf(args: argparse.Namespace) -> int:
    """``rep3d-nnunet erf``: writes the ERF figure and radii, prints the radii. Returns 0."""
    report = write_erf(args.model_folder, args.output, args.fold, args.checkpoint, args.num_inputs, args.size,
                       args.seed, args.device, compare=args.compare)
    radii = ", ".join(f"{label} {r:.2f}" for label, r in report.radius.items() if label != "untrained")
    print(f"ERF radius holding {report.fraction:.0%} of the gradient mass (voxels): {radii}, untrained "
          f"initialisation {report.radius['untrained']:.2f}")
    print(f"Wrote {report.figure} and {report.json.name}")
    return 0
