"""One table of named trainer variants, in nnU-Net's naming (``nnUNetTrainerRep3D_250epochs``).

A trainer name is a method (``METHODS``) optionally followed by a schedule suffix (``SCHEDULES``), nnU-Net's benchmark
suffixes included (``nnUNetTrainerRep3DBenchmark_5epochs``). The classes are made here, on demand, and published by
``nnUNet_trainers/nnUNetTrainerRep3D.py``, where nnU-Net's trainer lookup finds them through the
``nnUNet_extTrainer`` environment variable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nnunetv2.training.nnUNetTrainer.variants.benchmarking.nnUNetTrainerBenchmark_5epochs import (
    nnUNetTrainerBenchmark_5epochs,
)
from nnunetv2.training.nnUNetTrainer.variants.benchmarking.nnUNetTrainerBenchmark_5epochs_noDataLoading import (
    nnUNetTrainerBenchmark_5epochs_noDataLoading,
)

from .adapters import AdapterSettings
from .config import PAPER_SETTINGS, Rep3DSettings
from .finetuning import DKATrainer, FinetuneOptimizer
from .training import OptimizerSettings, Rep3DTrainer


@dataclass(frozen=True)
class Schedule:
    """Training length: epochs, iterations per epoch (None: nnU-Net's 250) and validation iterations.

    ``loop`` is an nnU-Net trainer whose training loop the variant runs instead of nnUNetTrainer's (nnU-Net's
    benchmark trainers: no validation or checkpoints, the fastest epoch written to ``benchmark_result.json``); the
    Rep3D network and optimizer come first in the method resolution order, the loop's overrides after them.
    """

    epochs: int
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    loop: type | None = None


@dataclass(frozen=True)
class Method:
    """A trainer's method: network settings, optimizer, what it reproduces, and its schedule without a suffix.

    A method with ``adapters`` fine-tunes a pretrained network (``finetuning.DKATrainer``, ``rep3d`` None);
    every other trains a Rep3D network (``training.Rep3DTrainer``).
    """

    rep3d: Rep3DSettings | None
    optim: OptimizerSettings | FinetuneOptimizer
    description: str
    schedule: Schedule = Schedule(1000)
    adapters: AdapterSettings | None = None

    @property
    def base(self) -> type:
        return Rep3DTrainer if self.adapters is None else DKATrainer

    def class_attributes(self) -> dict:
        if self.adapters is None:
            return {"rep3d": self.rep3d, "optim": self.optim}
        return {"adapters": self.adapters, "optim": self.optim}


_ADAMW = OptimizerSettings()
# 3D UX-Net (Lee et al., ICLR 2023) has two blocks at every stage: its variants keep that, whatever the Rep3D default
_UXNET_STAGES = {"blocks_per_stage": 2, "first_block_stage": 0}

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
        Rep3DSettings(block="uxnet", modulation="none", kernel_size=7, **_UXNET_STAGES), _ADAMW,
        "3D UX-Net blocks, 7^3 kernels"),
    "nnUNetTrainerUXNetLRBM": Method(
        Rep3DSettings(block="uxnet", modulation="lrbm", kernel_size=7, **_UXNET_STAGES), _ADAMW,
        "3D UX-Net + LRBM, 7^3 kernels"),
}

# ---- the paper's preset and its ablations (Tables 1-4, 7, 8, 9), generated from one table ----
# Paper: AdamW lr 1e-4, weight decay 0.08, 60,000 iterations at batch 2 = 240 nnU-Net epochs of 250 iterations.
PAPER_SCHEDULE = Schedule(240)
_PAPER_NETWORK = PAPER_SETTINGS  # plain Rep3D blocks, whatever the plan-topology default
_PAPER_OPTIM = OptimizerSettings(lr=1e-4)



def _sgd_decay(optimizer: str) -> dict:
    # The paper gives weight decay 0.08 for AdamW (decoupled); as SGD's coupled L2 term that would dominate the
    # gradient, so SGD rows use nnU-Net's 3e-5.
    return {"weight_decay": 3e-5} if optimizer == "sgd" else {}


# suffix -> (changes to the paper's network, changes to its optimizer, what the row is)
PAPER_ABLATIONS: dict[str, tuple[dict, dict, str]] = {
    "": ({}, {}, "the paper's Rep3D (LRBM, k=21, generator 2 x 7^3; Tables 1, 2)"),
    "_FixedPrior": ({"modulation": "fixed"}, {}, "Rep3D (Fixed Prior) (Tables 1, 2, 7)"),
    "_Vanilla": ({"modulation": "none"}, {}, "Vanilla Rep, no modulation (Table 7)"),
    **{f"_gk{g}": ({"generator_kernel": g}, {}, f"generator kernel {g}^3 (Table 3)") for g in (1, 3, 5, 7)},
    **{f"_depth{d}": ({"generator_depth": d}, {}, f"generator depth {d} (Table 9)") for d in (1, 2, 3)},
    **{f"_UXNet_k{k}": ({"block": "uxnet", "modulation": "none", "kernel_size": k}, {},
                        f"3D UX-Net blocks, kernel {k}^3 (Table 4{'; Table 3' if k == 7 else ''})")
       for k in range(3, 22, 2)},
    "_UXNetLRBM": ({"block": "uxnet", "modulation": "lrbm", "kernel_size": 7}, {}, "3D UX-Net + LRBM, 7^3 (Table 3)"),
    # Table 8: single 21^3 branch at five learning rates, and CSLA 21^3 + 3^3 with the large branch at 2e-4 and the
    # small one at five rates, each with SGD and AdamW.
    **{f"_Single_{opt}_lr{lr:.0e}".replace("-0", ""): (
        {"modulation": "none"}, {"name": opt, "lr": lr, **_sgd_decay(opt)}, f"single 21^3 branch, {opt} lr {lr:g} (Table 8)")
       for opt in ("sgd", "adamw") for lr in (5e-4, 4e-4, 3e-4, 2e-4, 1e-4)},
    **{f"_CSLA_{opt}_lrS{lr_small:.0e}".replace("-0", ""): (
        {"modulation": "csla"}, {"name": opt, "lr": 2e-4, "small_branch_lr": lr_small, **_sgd_decay(opt)},
        f"CSLA 21^3 + 3^3, {opt} lr 2e-4 large / {lr_small:g} small (Table 8)")
       for opt in ("sgd", "adamw") for lr_small in (6e-4, 5e-4, 4e-4, 3e-4, 1e-4)},
}

METHODS.update({
    f"nnUNetTrainerRep3DPaper{suffix}": Method(
        _PAPER_NETWORK.replace(**network), dataclasses.replace(_PAPER_OPTIM, **optim),
        f"Paper preset: {description}", PAPER_SCHEDULE)
    for suffix, (network, optim, description) in PAPER_ABLATIONS.items()
})

# ---- low-data fine-tuning (DKA paper): the dual-kernel adapter and the baselines it is compared with ----
# The paper fine-tunes segmentation for 300 epochs; adapters at lr 1e-3, the head at 1e-4. Every method also exists
# with the other head (``_DecoderHead``: the whole decoder trains, not only its segmentation layers).
FINETUNE_SCHEDULE = Schedule(300)
_FINETUNE_KINDS: dict[str, tuple[dict, str]] = {
    "nnUNetTrainerDKA": ({"kind": "dual"}, "dual-kernel adapter after every encoder stage (large + small depthwise)"),
    "nnUNetTrainerDKA_Large": ({"kind": "large"}, "adapter with the large depthwise kernel only"),
    "nnUNetTrainerDKA_Small": ({"kind": "small"}, "adapter with the small depthwise kernel only"),
    "nnUNetTrainerDKA_Adapter": ({"kind": "bottleneck"}, "standard bottleneck adapter (no spatial kernel)"),
    "nnUNetTrainerDKA_LinearProbe": ({"kind": "none"}, "linear probing: frozen network, head only"),
    "nnUNetTrainerDKA_FullFinetune": ({"kind": "none", "train_backbone": True},
                                      "full fine-tuning at the same schedule (everything at the head's rate)"),
}
_OTHER_HEAD = {"seg_layers": ("decoder", "_DecoderHead"), "decoder": ("seg_layers", "_SegLayersHead")}


def _finetuning_methods() -> dict[str, Method]:
    default = AdapterSettings()
    other_head, suffix = _OTHER_HEAD[default.head]
    methods = {}
    for name, (changes, description) in _FINETUNE_KINDS.items():
        for variant, head in ((name, default.head), (name + suffix, other_head)):
            methods[variant] = Method(None, FinetuneOptimizer(), f"Fine-tuning: {description}; head {head}; needs "
                                      f"-pretrained_weights", FINETUNE_SCHEDULE,
                                      default.replace(**changes, head=head))
    return methods


METHODS.update(_finetuning_methods())


def finetuning_trainer(method: str, head: str) -> str:
    """The fine-tuning variant of ``method`` (a name of ``_FINETUNE_KINDS``) that trains ``head``."""
    if method not in _FINETUNE_KINDS:
        raise ValueError(f"{method!r} is not a fine-tuning method; they are {', '.join(_FINETUNE_KINDS)}.")
    return method if METHODS[method].adapters.head == head else method + _OTHER_HEAD[METHODS[method].adapters.head][1]

SCHEDULES: dict[str, Schedule | None] = {
    "": None,  # the method's own schedule
    **{f"_{n}epoch" + ("s" if n > 1 else ""): Schedule(n) for n in (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000)},
    # CPU-sized: demos and smoke runs on a laptop; 20 epochs x 25 iterations.
    "_quick": Schedule(20, iterations_per_epoch=25, val_iterations_per_epoch=5),
    # smoke runs of whole protocols on a CPU (benchmarks/integration.sh: 4 configurations x 5 folds): 1 x 5 iterations
    "_1epoch_5iterations": Schedule(1, iterations_per_epoch=5, val_iterations_per_epoch=1),
    # nnU-Net's speed benchmarks under nnU-Net's names (nnUNetTrainerBenchmark_5epochs, ..._noDataLoading), so that
    # nnUNetTrainerRep3DBenchmark_5epochs writes the same json as nnU-Net's own and epoch times compare directly.
    "Benchmark_5epochs": Schedule(5, loop=nnUNetTrainerBenchmark_5epochs),
    "Benchmark_5epochs_noDataLoading": Schedule(5, loop=nnUNetTrainerBenchmark_5epochs_noDataLoading),
}


def _applies(method: Method, schedule: Schedule | None) -> bool:
    # nnU-Net's benchmark loops time training from scratch; a fine-tuning run starts from -pretrained_weights
    return schedule is None or schedule.loop is None or method.adapters is None


def trainer_names() -> list[str]:
    return [name + suffix for name, method in METHODS.items() for suffix, schedule in SCHEDULES.items()
            if _applies(method, schedule)]


def make_trainer_class(name: str) -> type:
    """The trainer class for a variant name.

    Raises:
        ValueError: the name is not in the table; the message lists the methods and schedule suffixes.
    """
    for method_name in sorted(METHODS, key=len, reverse=True):
        suffix = name[len(method_name):]
        if name.startswith(method_name) and suffix in SCHEDULES and _applies(METHODS[method_name], SCHEDULES[suffix]):
            method = METHODS[method_name]
            schedule = SCHEDULES[suffix] or method.schedule
            attributes = {
                **method.class_attributes(),
                "num_epochs_override": schedule.epochs,
                "iterations_per_epoch_override": schedule.iterations_per_epoch,
                "val_iterations_per_epoch_override": schedule.val_iterations_per_epoch,
                "__doc__": f"{method.description}; {schedule.epochs} epochs.",
            }
            bases = (method.base,) if schedule.loop is None else (method.base, schedule.loop)
            return type(name, bases, attributes)
    raise ValueError(
        f"Unknown Rep3D trainer variant {name!r}. Methods: {', '.join(METHODS)}; optional schedule suffixes: "
        f"{', '.join(s for s in SCHEDULES if s)}. Example: nnUNetTrainerRep3D_250epochs."
    )
