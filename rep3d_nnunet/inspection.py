"""Pictures of what a Rep3D model learned, the part they share: loading a model folder, figure and CLI helpers.

The pictures themselves live in ``masks`` (the modulation masks, ``rep3d-nnunet masks``) and ``erf`` (the effective
receptive field, ``rep3d-nnunet erf``); both import from here, never the other way round.

Both write into a folder of their own (default ``./rep3d_masks_<model folder name>`` / ``./rep3d_erf_<...>``), never
into the model folder. Figures are drawn on matplotlib's Agg canvas directly: no display, no global pyplot state.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from .blocks import ModulatedDepthwiseConv
from .model_folder import DEFAULT_CHECKPOINT, ModelFolder, ModelFolderError
from .nnunet_compat import find_trainer_class

WHAT_A_REP3D_MODEL_FOLDER_IS = (
    "A Rep3D model folder is an nnU-Net model folder (dataset.json, plans.json, fold_*/checkpoint_*.pth) written by "
    "nnUNetv2_train with a Rep3D trainer (rep3d-nnunet trainers lists them), or its export (rep3d-nnunet export)."
)


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


# ---- shared by the pictures (masks.py, erf.py) ----


def central_slices(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
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


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas, at least 7 inches wide so that the title fits."""
    figure = Figure(figsize=(max(width, 7.0), height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg explicitly: works headless, never touches pyplot's global backend
    return figure


def set_title(figure: Figure, lines: Sequence[str]) -> None:
    """Sets ``lines`` as the figure title, each wrapped to the figure's width."""
    # Long model folder names would otherwise run off a narrow (2D) figure; ~14 characters per inch at 9 points.
    width = int(figure.get_figwidth() * 14)
    figure.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=9)


def default_output_folder(kind: str, model_folder: str | Path) -> Path:
    """``./rep3d_<kind>_<model folder name>`` in the current directory."""
    return Path.cwd() / f"rep3d_{kind}_{Path(model_folder).resolve().name}"


# ---- command-line glue shared by masks and erf (wired into rep3d-nnunet by cli.py) ----


def add_common_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """The arguments every picture subcommand takes: the model folder, -o, --fold, --checkpoint."""
    parser.add_argument("model_folder", help="trained or exported Rep3D nnU-Net model folder "
                                             "(Trainer__Plans__configuration with fold_*/ inside)")
    parser.add_argument("-o", "--output", default=None,
                        help=f"folder for the pictures and numbers (default: ./rep3d_{kind}_<model folder name>)")
    parser.add_argument("--fold", default=None,
                        help="fold whose checkpoint to use (default: the lowest fold that has it)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint file name inside the fold (default: {DEFAULT_CHECKPOINT})")
