"""Deploy folding: turn a trained Rep3D network, or a whole nnU-Net model folder, into plain convolutions.

After folding no generator, prior, beta or CSLA small branch remains; the logits are unchanged.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


def fold(network: nn.Module) -> nn.Module:
    """Folds every module that has a training-only form, in place, and returns the network in eval mode.

    W_deploy = W * M for modulated kernels, CSLA branches merged, a BatchNorm right after a depthwise conv fused
    (exact with its running statistics, hence eval mode). Idempotent: folding a folded network changes nothing.
    """
    network.eval()
    # Materialise the list first: reparameterize() replaces submodules while we walk.
    for module in list(network.modules()):
        reparameterize = getattr(module, "reparameterize", None)
        if module is not network and callable(reparameterize):
            reparameterize()
    if callable(getattr(network, "reparameterize", None)):
        network.reparameterize()
    return network


def folded_copy(network: nn.Module) -> nn.Module:
    """A folded deep copy; the original network is left untouched (timm's ``reparameterize_model(inplace=False)``)."""
    return fold(copy.deepcopy(network))


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


# ---- model-folder export ----

CHECKPOINT_PATTERN = "checkpoint_*.pth"


@dataclass
class CheckpointReport:
    """What export did to one checkpoint."""

    path: str
    trainer_name: str
    parameters_before: int
    parameters_after: int
    max_relative_logit_difference: float


def _find_checkpoints(model_folder: Path) -> list[Path]:
    return sorted(p for fold in model_folder.glob("fold_*") if fold.is_dir() for p in fold.glob(CHECKPOINT_PATTERN))


def check_model_folder(model_folder: Path) -> list[Path]:
    """Returns the checkpoints of an nnU-Net model folder.

    Raises:
        FileNotFoundError: not a folder, dataset.json/plans.json missing, or no fold_*/checkpoint_*.pth inside.
    """
    if not model_folder.is_dir():
        raise FileNotFoundError(f"Model folder {model_folder} does not exist.")
    missing = [name for name in ("dataset.json", "plans.json") if not (model_folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{model_folder} is not an nnU-Net model folder: {', '.join(missing)} missing. Give the folder that "
            f"nnUNetv2_train wrote, e.g. $nnUNet_results/DatasetXXX_Name/nnUNetTrainerRep3D__nnUNetPlans__3d_fullres."
        )
    checkpoints = _find_checkpoints(model_folder)
    if not checkpoints:
        raise FileNotFoundError(
            f"{model_folder} has no checkpoints (fold_*/{CHECKPOINT_PATTERN}). Train at least one fold first "
            f"(nnUNetv2_train DATASET CONFIGURATION FOLD -tr nnUNetTrainerRep3D)."
        )
    return checkpoints


def build_network_for_checkpoint(model_folder: Path, checkpoint: dict) -> nn.Module:
    """The (unfolded) network nnU-Net's predictor would build for this checkpoint, weights loaded, eval mode."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(json.loads((model_folder / "plans.json").read_text()))
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    trainer_class = recursive_find_trainer_class_by_name(checkpoint["trainer_name"])
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    network.load_state_dict(checkpoint["network_weights"])
    return network.eval()


def _verification_input(network: nn.Module, num_input_channels: int, patch_size: list[int]) -> torch.Tensor:
    """A random input of the smallest spatial size every encoder stride divides (at most the patch size)."""
    strides = getattr(getattr(network, "encoder", None), "strides", None)
    if strides is None:
        size = list(patch_size)
    else:
        total = [int(np.prod([s[i] for s in strides])) for i in range(len(patch_size))]
        size = [min(p, 2 * t) for p, t in zip(patch_size, total)]
    return torch.randn(1, num_input_channels, *size, generator=torch.Generator().manual_seed(0))


def fold_checkpoint(model_folder: Path, checkpoint_path: Path, tolerance: float = 1e-4) -> tuple[dict, CheckpointReport]:
    """Loads a training checkpoint, folds its network and checks the logits did not change.

    Returns:
        The deployable checkpoint (folded weights, no optimizer state) and a report.

    Raises:
        RuntimeError: the folded network's logits differ by more than ``tolerance`` (relative).
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    network = build_network_for_checkpoint(model_folder, checkpoint)
    plans = json.loads((model_folder / "plans.json").read_text())
    patch_size = plans["configurations"][checkpoint["init_args"]["configuration"]]["patch_size"]
    first_conv = next(m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    x = _verification_input(network, first_conv.in_channels, patch_size)
    parameters_before = count_parameters(network)
    with torch.no_grad():
        reference = network(x)
        fold(network)
        folded = network(x)
    difference = ((folded - reference).norm() / reference.norm().clamp_min(1e-12)).item()
    if not difference <= tolerance:
        raise RuntimeError(
            f"Folding {checkpoint_path} changed the logits by {difference:.2e} (relative), above {tolerance:.0e}. "
            f"Nothing was written."
        )
    deployable = {k: v for k, v in checkpoint.items() if k not in ("optimizer_state", "grad_scaler_state")}
    deployable["optimizer_state"] = None
    deployable["grad_scaler_state"] = None
    deployable["network_weights"] = network.state_dict()
    deployable["rep3d_folded"] = True
    report = CheckpointReport(str(checkpoint_path.relative_to(model_folder)), checkpoint["trainer_name"],
                              parameters_before, count_parameters(network), difference)
    return deployable, report


def export_model_folder(model_folder: str | Path, output_folder: str | Path) -> list[CheckpointReport]:
    """Writes a copy of an nnU-Net model folder whose checkpoints hold folded weights.

    Everything else (plans, dataset.json, validation results, progress plots) is copied unchanged, so the output is
    a regular nnU-Net model folder: ``nnUNetv2_predict_from_modelfolder``, ``nnUNetv2_predict`` (when it sits in
    nnUNet_results) and ``nnUNetv2_export_model_to_zip`` work on it. The folder is written under a temporary name
    and renamed at the end, so a failure never leaves a half-written model folder.

    Raises:
        FileNotFoundError: the input is not a model folder or has no checkpoints.
        FileExistsError: the output folder already exists.
    """
    model_folder, output_folder = Path(model_folder).resolve(), Path(output_folder).resolve()
    checkpoints = check_model_folder(model_folder)
    if output_folder.exists():
        raise FileExistsError(
            f"Output folder {output_folder} already exists. Choose another --output or remove it first; "
            f"export never overwrites a model folder."
        )
    if output_folder == model_folder or model_folder in output_folder.parents:
        raise ValueError(f"The output folder {output_folder} must lie outside the model folder {model_folder}.")
    output_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_folder.name}.partial-", dir=output_folder.parent))
    try:
        shutil.copytree(model_folder, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CHECKPOINT_PATTERN))
        reports = []
        for checkpoint_path in checkpoints:
            deployable, report = fold_checkpoint(model_folder, checkpoint_path)
            torch.save(deployable, staging / checkpoint_path.relative_to(model_folder))
            reports.append(report)
        staging.rename(output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return reports


def default_export_folder(model_folder: str | Path) -> Path:
    """``Trainer__Plans__config`` -> ``Trainer__Plans_folded__config`` beside it, so nnU-Net commands address it
    with ``-p Plans_folded``."""
    model_folder = Path(model_folder).resolve()
    parts = model_folder.name.split("__")
    if len(parts) != 3:
        raise ValueError(f"Cannot derive an output name from {model_folder}; pass --output.")
    trainer, plans, configuration = parts
    return model_folder.with_name(f"{trainer}__{plans}_folded__{configuration}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet export MODEL_FOLDER [-o OUTPUT]``."""
    parser.add_argument("model_folder")
    parser.add_argument("-o", "--output", default=None,
                        help="new model folder (default: beside the input, plans part suffixed _folded)")


def run_from_args(args: argparse.Namespace) -> str:
    """Exports the model folder named by parsed :func:`add_arguments` flags; returns what was folded, per checkpoint."""
    check_model_folder(Path(args.model_folder).resolve())  # a missing folder is named before its output is derived
    output = Path(args.output) if args.output else default_export_folder(args.model_folder)
    reports = export_model_folder(args.model_folder, output)
    lines = [f"{r.path}: {r.parameters_before:,} parameters -> {r.parameters_after:,} after folding "
             f"(logits differ by {r.max_relative_logit_difference:.1e} relative)" for r in reports]
    return "\n".join(lines + [f"Exported {len(reports)} checkpoint(s) to {output}"])
