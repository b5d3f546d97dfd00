"""Effective receptive field (ERF) of a Rep3D model (``rep3d-nnunet erf``).

``write_erf``: the effective receptive field of the trained network and of its untrained initialisation, side by
side, as in the paper's Figure 3, plus the radius that holds 90% of the ERF's mass, so that documents can compare
numbers and not only pictures. ``effective_receptive_field`` works on any ``nn.Module``.

Writes into a folder of its own (default ``./rep3d_erf_<model folder name>``), never into the model folder. Loading
the model folder and the figure helpers come from ``inspection``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.patches import Circle
from torch import nn

from .inspection import (
    add_common_arguments,
    build_untrained_network,
    central_slices,
    default_output_folder,
    load_rep3d_model,
    new_figure,
    set_title,
)
from .model_folder import DEFAULT_CHECKPOINT, ModelFolder, ModelFolderError

ERF_MASS_FRACTION = 0.9
DEVICES = ("auto", "cpu", "cuda")


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
    columns = len(central_slices(erfs[labels[0]]))
    figure = new_figure(3.0 * columns + 1.0, 2.9 * len(labels) + 0.8)
    axes = figure.subplots(len(labels), columns, squeeze=False)
    image = None
    for row, label in enumerate(labels):
        for column, (where, picture) in enumerate(central_slices(erfs[label])):
            ax = axes[row, column]
            image = ax.imshow(picture, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            centre = (picture.shape[1] // 2, picture.shape[0] // 2)
            ax.add_patch(Circle(centre, radii[label], fill=False, color="cyan", linewidth=0.8, linestyle="--"))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}: {where}".rstrip(": "), fontsize=8)
        axes[row, 0].set_ylabel(f"{label}\n{fraction:.0%} of the mass within r = {radii[label]:.1f} voxels", fontsize=8)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="|d y_centre / d x|, max 1")
    set_title(figure, (title or "Effective receptive field").split("\n"))
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


def add_erf_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet erf MODEL_FOLDER [-o OUT] [--fold F] [--checkpoint NAME] [--num-inputs N]
    [--size Z Y X] [--seed S] [--device D]``."""
    add_common_arguments(parser, "erf")
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
