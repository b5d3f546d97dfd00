"""Deploy folding: turn a trained Rep3D network, or a whole nnU-Net model folder, into plain convolutions.

After folding no generator, prior, beta or CSLA small branch remains; the logits are unchanged. An exported model
folder needs nothing but this package: its plans describe the folded network (``architecture.network_class_name``
is our network's dotted path, its ``arch_kwargs`` the deploy form) and its checkpoints name nnU-Net's default
trainer, whose ``build_network_architecture`` builds that network through ``pydoc.locate``. So ``nnUNetv2_predict``,
``nnUNetv2_export_model_to_zip`` and ``nnUNetv2_install_pretrained_model_from_zip`` work on it without
``nnUNet_extTrainer``.
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

from .blocks import ModulatedDepthwiseConv, batchnorm_folded
from .model_folder import CHECKPOINT_PATTERN, ModelFolder, ModelFolderError
from .config import REP3D_NETWORK_CLASS
from .nnunet_compat import build_network, find_trainer_class, recorded_conv_backends

# The trainer an exported checkpoint names: nnU-Net's own, found without nnUNet_extTrainer.
DEPLOY_TRAINER = "nnUNetTrainer"
# The Rep3DUNet argument that carries the training's backend decisions into an export (``architecture.Rep3DUNet``).
DEPLOY_CONV_BACKENDS_KEY = "conv_backend_decisions"


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


@dataclass
class CheckpointReport:
    """What export did to one checkpoint."""

    path: str
    trainer_name: str
    parameters_before: int
    parameters_after: int
    kernels_checked: int
    max_relative_kernel_difference: float  # the worst folded kernel (or bias) against W * M, relative L2
    relative_logit_difference: float  # ||deployed - trained|| / ||trained|| over all logits (L2)


def _verification_input(num_input_channels: int, patch_size: list[int]) -> torch.Tensor:
    """A random input of the full patch size: the size prediction runs, where every kernel tap touches the input (on a
    smaller input the deep stages' kernels are cropped to their central taps and their outer taps go unchecked)."""
    return torch.randn(1, num_input_channels, *patch_size, generator=torch.Generator().manual_seed(0))


def expected_folded_kernels(network: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """What folding must write into each large kernel of an unfolded network, by module name: W * M (CSLA: the merged
    branches) and the bias, a following BatchNorm fused where the block fuses it.

    Computed by the eval formula with autograd on (the eval cache, which folding itself reads, is not consulted),
    one kernel at a time, so no activation memory is held.
    """
    expected = {}
    with torch.enable_grad():
        for name, module in network.named_modules():
            if isinstance(module, ModulatedDepthwiseConv) and not module.is_folded:
                bias = module.effective_bias()
                # copies: for a plain kernel these are the parameters themselves, which folding writes into
                expected[name] = (module.effective_weight().detach().clone(),
                                  None if bias is None else bias.detach().clone())
    with torch.no_grad():
        for name, module in network.named_modules():
            conv_name = f"{name}.conv" if name else "conv"  # blocks whose fold fuses their norm into their conv
            if conv_name in expected and callable(getattr(module, "can_fuse_norm", None)) and module.can_fuse_norm():
                expected[conv_name] = batchnorm_folded(*expected[conv_name], module.norm)
    return expected


def _relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-12)).item()


def kernel_differences(deployed: nn.Module, expected: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
                       ) -> dict[str, float]:
    """Relative L2 difference of each folded kernel (and its bias) of ``deployed`` from ``expected``, by module name.

    Raises:
        ModelFolderError: a kernel of ``expected`` is missing from ``deployed``, or is not folded there.
    """
    modules = dict(deployed.named_modules())
    differences = {}
    for name, (weight, bias) in expected.items():
        conv = modules.get(name)
        if not isinstance(conv, ModulatedDepthwiseConv) or not conv.is_folded:
            raise ModelFolderError(f"The deployed network has no folded kernel at {name}; its plans do not describe "
                                   f"the folded form of the trained network.")
        if conv.weight.shape != weight.shape or (bias is None) != (conv.bias is None):
            differences[name] = float("inf")
            continue
        difference = _relative_l2(conv.weight, weight)
        if bias is not None:
            difference = max(difference, _relative_l2(conv.bias, bias))
        differences[name] = difference
    return differences


def _plain(value):
    """Numpy scalars and arrays as Python numbers and lists: what a weights-only load accepts."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def deploy_plans(folder: ModelFolder, checkpoint: dict, trainer_class: type, plans_name: str | None) -> dict:
    """The folder's plans with the checkpoint's configuration describing the folded network, and the backend
    decisions the training recorded (``backend_choice``) in its ``arch_kwargs`` (``DEPLOY_CONV_BACKENDS_KEY``).

    Raises:
        ModelFolderError: the trainer has no deploy form (it is not a Rep3D trainer: nothing to fold).
    """
    if not callable(getattr(trainer_class, "deploy_architecture", None)):
        raise ModelFolderError(
            f"{folder.path} is not a Rep3D model folder: its trainer {checkpoint['trainer_name']} builds a network "
            f"without a training-only form, so there is nothing to fold. Export folders trained with a Rep3D "
            f"trainer (rep3d-nnunet trainers lists them); nnU-Net's own models deploy as they are."
        )
    plans = copy.deepcopy(folder.plans)
    configuration = checkpoint["init_args"]["configuration"]
    architecture = trainer_class.deploy_architecture(folder.plans_manager, folder.configuration_manager(checkpoint))
    # The training's backend decisions hold for the folded network too (its large convolutions have the same shapes):
    # nnU-Net's default trainer builds it from these arch_kwargs alone, and the network adopts them when built.
    recorded = recorded_conv_backends(folder.plans_manager.get_configuration(configuration).network_arch_init_kwargs)
    if recorded and architecture.get("network_class_name") == REP3D_NETWORK_CLASS:
        architecture["arch_kwargs"][DEPLOY_CONV_BACKENDS_KEY] = copy.deepcopy(recorded)
    plans["configurations"][configuration]["architecture"] = architecture
    if plans_name:
        plans["plans_name"] = plans_name
    return plans


def fold_checkpoint(folder: ModelFolder, checkpoint_path: Path, plans: dict, tolerance: float = 1e-4,
                    kernel_tolerance: float = 1e-5) -> tuple[dict, CheckpointReport]:
    """Folds one training checkpoint and checks the network nnU-Net will build from ``plans`` with its weights.

    Two checks: every folded kernel (and bias) equals W * M (CSLA: the merged branches; a fused BatchNorm applied)
    computed from the checkpoint by the eval formula (uncached), within ``kernel_tolerance`` (relative L2, per kernel); and
    the logits at the full patch size equal the trained network's eval forward within ``tolerance`` (relative L2 over
    all logits). The first is what sees every kernel: a residual block whose layer scale is still 0 (where the default
    network's blocks start) passes its input through whatever its kernel is, so the logits cannot see that kernel.

    Returns:
        The deployable checkpoint (folded weights, nnU-Net's default trainer name, no optimizer state, plain types
        only) and a report.

    Raises:
        ModelFolderError: the checkpoint is unreadable, already exported, does not fit the plans, a folded kernel
            differs from W * M by more than ``kernel_tolerance``, or the logits by more than ``tolerance``.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoint = folder.load_checkpoint(checkpoint_path)
    if checkpoint.get("rep3d_folded"):
        raise ModelFolderError(f"{checkpoint_path} is already exported (folded); {folder.path} needs no export. "
                               f"Export the training folder it came from instead.")
    network = folder.load_network(checkpoint, checkpoint_path).eval()
    configuration_name = checkpoint["init_args"]["configuration"]
    deploy_manager = PlansManager(plans)
    deployed = build_network(nnUNetTrainer, deploy_manager, deploy_manager.get_configuration(configuration_name),
                             folder.num_input_channels(checkpoint), folder.label_manager.num_segmentation_heads, False)
    patch_size = folder.configuration_manager(checkpoint).patch_size
    x = _verification_input(folder.num_input_channels(checkpoint), list(patch_size))
    parameters_before = count_parameters(network)
    expected = expected_folded_kernels(network)
    with torch.no_grad():
        reference = network(x)
        fold(network)
        deployed.load_state_dict(network.state_dict())  # strict: the deploy form has exactly the folded parameters
        output = deployed.eval()(x)
    differences = kernel_differences(deployed, expected)
    worst = max(differences, key=differences.get, default=None)
    if worst is not None and not differences[worst] <= kernel_tolerance:
        raise ModelFolderError(f"Folding {checkpoint_path} changed the kernel of {worst} by {differences[worst]:.2e} "
                               f"(relative L2 against W * M from the checkpoint), above {kernel_tolerance:.0e}. "
                               f"Nothing was written.")
    difference = _relative_l2(output, reference)
    if not difference <= tolerance:
        raise ModelFolderError(f"Folding {checkpoint_path} changed the logits by {difference:.2e} (relative L2), above "
                               f"{tolerance:.0e}. Nothing was written.")
    deployable = {
        "network_weights": deployed.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": _plain(checkpoint.get("logging")),
        "_best_ema": _plain(checkpoint.get("_best_ema")),
        "current_epoch": _plain(checkpoint.get("current_epoch")),
        "init_args": {**_plain(checkpoint["init_args"]), "plans": plans},
        "trainer_name": DEPLOY_TRAINER,
        "inference_allowed_mirroring_axes": _plain(checkpoint.get("inference_allowed_mirroring_axes")),
        "rep3d_folded": True,
        "rep3d_trainer_name": checkpoint["trainer_name"],
    }
    report = CheckpointReport(str(checkpoint_path.relative_to(folder.path)), checkpoint["trainer_name"],
                              parameters_before, count_parameters(deployed), len(differences),
                              differences[worst] if worst is not None else 0.0, difference)
    return deployable, report


def _plans_name_of(output_folder: Path) -> str | None:
    parts = output_folder.name.split("__")
    return parts[1] if len(parts) == 3 else None


def export_model_folder(model_folder: str | Path, output_folder: str | Path) -> list[CheckpointReport]:
    """Writes a copy of an nnU-Net model folder that holds the folded network: plans and checkpoints.

    Everything else (dataset.json, validation results, progress plots) is copied unchanged, so the output is a
    regular nnU-Net model folder that predicts without ``nnUNet_extTrainer`` (see the module docstring). The folder is
    written under a temporary name and renamed at the end, so a failure never leaves a half-written model folder.

    Raises:
        FileNotFoundError: the input is not a model folder or has no checkpoints.
        FileExistsError: the output folder already exists.
        ModelFolderError: see ``fold_checkpoint`` and ``deploy_plans``; checkpoints of different configurations.
    """
    model_folder, output_folder = Path(model_folder).resolve(), Path(output_folder).resolve()
    folder = ModelFolder.open(model_folder)
    if output_folder.exists():
        raise FileExistsError(f"Output folder {output_folder} already exists. Choose another --output or remove it "
                              f"first; export never overwrites a model folder.")
    if output_folder == model_folder or model_folder in output_folder.parents:
        raise ModelFolderError(f"The output folder {output_folder} must lie outside the model folder {model_folder}.")
    first = folder.load_checkpoint(folder.checkpoints[0])
    if first.get("rep3d_folded"):
        raise ModelFolderError(f"{folder.checkpoints[0]} is already exported (folded); {folder.path} needs no "
                               f"export. Export the training folder it came from instead.")
    plans = deploy_plans(folder, first, find_trainer_class(first["trainer_name"]), _plans_name_of(output_folder))
    output_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_folder.name}.partial-", dir=output_folder.parent))
    try:
        shutil.copytree(model_folder, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CHECKPOINT_PATTERN))
        (staging / "plans.json").write_text(json.dumps(plans, indent=4))
        reports = []
        for checkpoint_path in folder.checkpoints:
            deployable, report = fold_checkpoint(folder, checkpoint_path, plans)
            if deployable["init_args"]["configuration"] != first["init_args"]["configuration"]:
                raise ModelFolderError(f"{checkpoint_path} was trained on another configuration than "
                                       f"{folder.checkpoints[0]}; a model folder holds one configuration.")
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
        raise ModelFolderError(f"Cannot derive an output name from {model_folder.name} (nnU-Net names model folders "
                               f"Trainer__Plans__configuration); pass --output.")
    trainer, plans, configuration = parts
    return model_folder.with_name(f"{trainer}__{plans}_folded__{configuration}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet export MODEL_FOLDER [-o OUTPUT]``."""
    parser.add_argument("model_folder", help="trained model folder (Trainer__Plans__configuration with fold_*/ "
                                             "inside), as nnUNetv2_train wrote it")
    parser.add_argument("-o", "--output", default=None,
                        help="new model folder (default: beside the input, plans part suffixed _folded)")


def run_from_args(args: argparse.Namespace) -> str:
    """Exports the model folder named by parsed :func:`add_arguments` flags; returns what was folded, per checkpoint."""
    ModelFolder.open(Path(args.model_folder).resolve())  # a missing folder is named before its output is derived
    output = Path(args.output) if args.output else default_export_folder(args.model_folder)
    reports = export_model_folder(args.model_folder, output)
    lines = [f"{r.path}: {r.parameters_before:,} parameters -> {r.parameters_after:,} after folding; "
             f"{r.kernels_checked} folded kernels equal W * M within {r.max_relative_kernel_difference:.1e}, logits "
             f"within {r.relative_logit_difference:.1e} (relative L2)" for r in reports]
    return "\n".join(lines + [f"Exported {len(reports)} checkpoint(s) to {output}; it predicts with nnU-Net's own "
                              f"commands, without nnUNet_extTrainer."])
