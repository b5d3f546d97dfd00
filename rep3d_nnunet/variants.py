"""One table of named trainer variants, in nnU-Net's naming (``nnUNetTrainerRep3D_250epochs``).

A trainer name is a method (``METHODS``) optionally followed by a schedule suffix (``SCHEDULES``). The classes are
generated here and published by ``nnUNet_trainers/nnUNetTrainerRep3D.py``, where nnU-Net's trainer lookup finds
them through the ``nnUNet_extTrainer`` environment variable.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Rep3DSettings
from .training import OptimizerSettings, Rep3DTrainer


@dataclass(frozen=True)
class Method:
    """A trainer's method: network settings, optimizer, and what it reproduces."""

    rep3d: Rep3DSettings
    optim: OptimizerSettings
    description: str


@dataclass(frozen=True)
class Schedule:
    """Training length: epochs, iterations per epoch (None: nnU-Net's 250) and validation iterations."""

    epochs: int
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None


_ADAMW = OptimizerSettings()

METHODS: dict[str, Method] = {
    "nnUNetTrainerRep3D": Method(Rep3DSettings(), _ADAMW, "Rep3D: LRBM-modulated 21^3 depthwise kernels (the method)"),
    "nnUNetTrainerRep3DFixedPrior": Method(
        Rep3DSettings(modulation="fixed"), _ADAMW, "Rep3D (Fixed Prior): M = P, no generator"),
    "nnUNetTrainerRep3DVanilla": Method(
        Rep3DSettings(modulation="none"), _ADAMW, "Vanilla Rep: plain 21^3 depthwise kernels, no modulation"),
    "nnUNetTrainerRep3DCSLA": Method(
        Rep3DSettings(modulation="csla"), OptimizerSettings(lr=2e-4, small_branch_lr=3e-4),
        "CSLA: 21^3 + 3^3 parallel branches with per-branch AdamW rates (paper Table 8: 2e-4 / 3e-4)"),
    "nnUNetTrainerUXNet": Method(
        Rep3DSettings(block="uxnet", modulation="none", kernel_size=7), _ADAMW, "3D UX-Net blocks, 7^3 kernels"),
    "nnUNetTrainerUXNetLRBM": Method(
        Rep3DSettings(block="uxnet", modulation="lrbm", kernel_size=7), _ADAMW, "3D UX-Net + LRBM, 7^3 kernels"),
}

SCHEDULES: dict[str, Schedule] = {
    "": Schedule(1000),
    **{f"_{n}epoch" + ("s" if n > 1 else ""): Schedule(n) for n in (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000)},
    # CPU-sized: demos and smoke runs on a laptop; 20 epochs x 25 iterations.
    "_quick": Schedule(20, iterations_per_epoch=25, val_iterations_per_epoch=5),
}


def trainer_names() -> list[str]:
    return [method + suffix for method in METHODS for suffix in SCHEDULES]


def make_trainer_class(name: str) -> type[Rep3DTrainer]:
    """The trainer class for a variant name.

    Raises:
        ValueError: the name is not in the table; the message lists the methods and schedule suffixes.
    """
    for method_name in sorted(METHODS, key=len, reverse=True):
        suffix = name[len(method_name):]
        if name.startswith(method_name) and suffix in SCHEDULES:
            method, schedule = METHODS[method_name], SCHEDULES[suffix]
            attributes = {
                "rep3d": method.rep3d,
                "optim": method.optim,
                "num_epochs_override": schedule.epochs,
                "iterations_per_epoch_override": schedule.iterations_per_epoch,
                "val_iterations_per_epoch_override": schedule.val_iterations_per_epoch,
                "__doc__": f"{method.description}; {schedule.epochs} epochs.",
            }
            return type(name, (Rep3DTrainer,), attributes)
    raise ValueError(
        f"Unknown Rep3D trainer variant {name!r}. Methods: {', '.join(METHODS)}; optional schedule suffixes: "
        f"{', '.join(s for s in SCHEDULES if s)}. Example: nnUNetTrainerRep3D_250epochs."
    )


def all_trainer_classes() -> dict[str, type[Rep3DTrainer]]:
    return {name: make_trainer_class(name) for name in trainer_names()}
