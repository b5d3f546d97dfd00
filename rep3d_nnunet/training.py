"""What every Rep3D trainer shares: building the network from the plan, the optimizer and its schedule.

``Rep3DTrainer`` overrides exactly the nnUNetTrainer hooks that differ (network, optimizer, schedule length); the
named trainers in ``nnUNet_trainers/`` only set its class attributes (see ``variants``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from . import eval_cache
from .blocks import ModulatedDepthwiseConv
from .config import REP3D_NETWORK_CLASS, Rep3DSettings, describe_translation, rep3d_architecture
from . import backend_choice
from .backend_measurement import measure_network
from .nnunet_compat import (
    adopt_conv_backends, network_build_inputs, record_build_inputs, recorded_conv_backends, without_build_inputs,
)

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class OptimizerSettings:
    """Optimizer of a trainer variant.

    The default is the paper's AdamW (betas (0.9, 0.999), eps 1e-8, weight decay 0.08) with nnU-Net's polynomial
    decay over its epoch schedule. The learning rate is 1e-3 rather than the paper's 1e-4: the paper trains 60,000
    iterations on 96^3 crops, while nnU-Net runs use its epoch schedule and short runs must still converge; lr 1e-4
    variants exist for paper-faithful runs. Weight decay applies to kernels only (tensors with more than one axis),
    not to norms, biases, beta or the generator's gains, which would otherwise be pulled towards a dead mask.

    Attributes:
        name: ``adamw`` or ``sgd`` (nnU-Net's SGD, Nesterov momentum 0.99).
        lr: initial learning rate (large kernels, everything but the CSLA small branch).
        weight_decay, betas, eps, momentum: optimizer terms.
        small_branch_lr: learning rate of the CSLA small branch (paper Table 8: 3e-4 with 2e-4 for the large one);
            None uses ``lr``.
        large_kernel_lr: learning rate of the large depthwise kernels (their weights only); None uses ``lr``.
        amsgrad: AdamW's amsgrad variant (nnU-Net's own AdamW trainers use it).
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.08
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.99
    small_branch_lr: float | None = None
    large_kernel_lr: float | None = None
    amsgrad: bool = False

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.name!r}; allowed values are {', '.join(OPTIMIZERS)}.")


def build_rep3d_network(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                        num_input_channels: int, num_output_channels: int, enable_deep_supervision: bool,
                        settings: Rep3DSettings) -> nn.Module:
    """Rep3DUNet for a plan's configuration (the plan gives the topology, ``settings`` the method)."""
    kwargs, req_import = rep3d_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.patch_size, configuration_manager.spacing, settings,
    )
    return get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, req_import, num_input_channels, num_output_channels,
                                  allow_init=True, deep_supervision=enable_deep_supervision)


def rep3d_deploy_architecture(configuration_manager: ConfigurationManager, settings: Rep3DSettings) -> dict:
    """The plans' ``architecture`` entry of the folded network: nnU-Net's default trainer builds it from this alone.

    The topology and Rep3D settings the trainer used, ``deploy=True`` (plain kernels, no generator, a BatchNorm after
    a depthwise conv fused); the Rep3D trainers read such an entry back as a topology source as well.
    """
    kwargs, req_import = rep3d_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.patch_size, configuration_manager.spacing, settings,
    )
    return {"network_class_name": REP3D_NETWORK_CLASS, "arch_kwargs": {**kwargs, "deploy": True},
            "_kw_requires_import": req_import}


def parameter_groups(network: nn.Module, optim: OptimizerSettings) -> list[dict]:
    """Splits parameters into decayed kernels, undecayed rest, the CSLA small branch and (where the settings give
    them their own rate) the large kernels.

    Every group carries ``initial_lr`` so a scheduler can decay each group relative to its own start.
    """
    convs = [m for m in network.modules() if isinstance(m, ModulatedDepthwiseConv)]
    small = {id(p) for m in convs for p in m.small_branch_parameters()}
    large = {id(m.weight) for m in convs} if optim.large_kernel_lr is not None else set()
    decay, no_decay, small_branch, large_kernels = [], [], [], []
    for p in network.parameters():
        if not p.requires_grad:
            continue
        if id(p) in small:
            small_branch.append(p)
        elif id(p) in large:
            large_kernels.append(p)
        elif p.ndim > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay, "initial_lr": optim.lr},
        {"params": no_decay, "weight_decay": 0.0, "initial_lr": optim.lr},
        {"params": small_branch, "weight_decay": optim.weight_decay, "initial_lr": optim.small_branch_lr or optim.lr},
        {"params": large_kernels, "weight_decay": optim.weight_decay, "initial_lr": optim.large_kernel_lr},
    ]
    return [g for g in groups if g["params"]]


class PolyLRPerGroup:
    """nnU-Net's polynomial decay, lr = initial_lr * (1 - epoch / max_epochs) ** 0.9, per parameter group.

    nnU-Net's ``PolyLRScheduler`` sets one lr for every group, which would erase the CSLA branches' separate rates.
    ``step(epoch)`` matches the call nnUNetTrainer makes at each epoch start.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_epochs: int, exponent: float = 0.9):
        self.optimizer = optimizer
        self.max_epochs = max_epochs
        self.exponent = exponent
        self.step(0)

    def step(self, epoch: int) -> None:
        factor = (1 - min(epoch, self.max_epochs - 1) / self.max_epochs) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"max_epochs": self.max_epochs, "exponent": self.exponent}

    def load_state_dict(self, state: dict) -> None:
        self.max_epochs, self.exponent = state["max_epochs"], state["exponent"]


def build_optimizer(network: nn.Module, optim: OptimizerSettings, num_epochs: int):
    """Returns (optimizer, scheduler) for ``network``."""
    groups = parameter_groups(network, optim)
    if optim.name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, amsgrad=optim.amsgrad)
    else:
        optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=True)
    return optimizer, PolyLRPerGroup(optimizer, num_epochs)


def unwrapped_network(network: nn.Module) -> nn.Module:
    """The module inside nnU-Net's wrappers (DistributedDataParallel, then torch.compile's OptimizedModule)."""
    network = getattr(network, "module", network) if isinstance(network, nn.parallel.DistributedDataParallel) \
        else network
    return getattr(network, "_orig_mod", network)


# The Rep3D network may need this much more memory than the network a plan was sized for before start-up says so.
MEMORY_WARNING_RATIO = 1.05


class ScheduledTrainer(nnUNetTrainer):
    """nnUNetTrainer whose schedule length comes from class attributes (the variant table's schedule suffixes).

    Attributes:
        num_epochs_override, iterations_per_epoch_override, val_iterations_per_epoch_override: None keeps nnU-Net's
            1000 epochs x 250 iterations (and 50 validation iterations).
    """

    num_epochs_override: ClassVar[int | None] = None
    iterations_per_epoch_override: ClassVar[int | None] = None
    val_iterations_per_epoch_override: ClassVar[int | None] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.num_epochs_override is not None:
            self.num_epochs = self.num_epochs_override
        if self.iterations_per_epoch_override is not None:
            self.num_iterations_per_epoch = self.iterations_per_epoch_override
        if self.val_iterations_per_epoch_override is not None:
            self.num_val_iterations_per_epoch = self.val_iterations_per_epoch_override

    def on_train_start(self):
        # Every large-kernel backend decision of the run is taken first, so that nnU-Net saves them with these plans
        # as the model folder's plans.json (the checkpoints keep the same plans in their init_args): validation,
        # --val, nnUNetv2_predict and the export read them back. nnU-Net 2.6's predictor rebuilds the network from
        # the architecture entry alone, so the entry also carries what else the build needs.
        self.measure_conv_backends()
        plans = self.plans_manager.plans
        previous = recorded_conv_backends(plans["configurations"][self.configuration_name]["architecture"].get(
            "arch_kwargs", {}))
        record_build_inputs(plans, self.configuration_name, backend_choice.record(previous) or None)
        super().on_train_start()
        self.check_plan()

    def check_plan(self) -> None:
        """Says before the first iteration what a plan made for another network means for ours (nothing here)."""

    def measure_conv_backends(self) -> None:
        """Takes every large-kernel backend decision of this run before its first step (``backend_measurement``:
        measured on CUDA): the training step under the autocast dtype nnU-Net's train_step uses, validation and
        batch-1 prediction tiles; under DDP the ranks agree here, and nowhere inside a forward. A compiled network
        then finds them decided, and validation computes what training does. Once per trainer; validation without
        training (``--val``) does it too, after ``load_checkpoint`` adopted what the checkpoint recorded."""
        if getattr(self, "_conv_backends_measured", False):
            return
        self._conv_backends_measured = True
        if not self.was_initialized:
            self.initialize()
        # nnU-Net's train_step autocasts on CUDA only, to torch's autocast dtype for the device (float16 by default)
        autocast_dtype = torch.get_autocast_dtype(self.device.type) if self.device.type == "cuda" else None
        measure_network(unwrapped_network(self.network),
                        (self.batch_size, self.num_input_channels, *self.configuration_manager.patch_size),
                        self.device, autocast_dtype)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's load (``--c``, ``--val``), then the backend decisions recorded in the checkpoint's plans."""
        super().load_checkpoint(filename_or_checkpoint)
        plans = self.my_init_kwargs.get("plans") or {}  # nnU-Net sets these to the checkpoint's init_args
        configuration = plans.get("configurations", {}).get(self.configuration_name, {})
        adopt_conv_backends(configuration.get("architecture", {}).get("arch_kwargs", {}))

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.measure_conv_backends()
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            eval_cache.release(self.network)  # masks and kernel spectra of the eval forwards: done with


class Rep3DTrainer(ScheduledTrainer):
    """nnUNetTrainer with a Rep3D network. Variants set the class attributes below and nothing else.

    Attributes:
        rep3d: the network's Rep3D settings.
        optim: optimizer settings.
        (schedule: see ``ScheduledTrainer``)
    """

    rep3d: ClassVar[Rep3DSettings] = Rep3DSettings()
    optim: ClassVar[OptimizerSettings] = OptimizerSettings()

    # nnUNetTrainer records its constructor's arguments by name (for checkpoints): the signature is spelled out
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # A plan this network cannot be built on stops here, in one line, before nnU-Net starts anything
        # (nnUNetv2_train has no error handling of its own: a traceback ending in the line, nothing before it).
        self.rep3d_architecture_of(PlansManager(plans).get_configuration(configuration))
        # nnUNetTrainer.initialize calls this class's build_network_architecture; nnU-Net 2.6 passes it the
        # configuration's architecture entry only, so the entry carries the patch size and spacing from the start
        # (nnunet_compat.record_build_inputs; the plans are the ones the checkpoints and the model folder keep)
        record_build_inputs(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.optim.lr
        self.weight_decay = self.optim.weight_decay

    @classmethod
    def rep3d_architecture_of(cls, configuration_manager: ConfigurationManager) -> dict:
        """Rep3DUNet keyword arguments of this variant on a configuration (``config.rep3d_architecture``).

        Raises:
            ValueError: the plan's network has no topology to build on, or its patch does not fit the variant's (the
                paper's encoder needs a 3D patch divisible by 32: the message names the preset planner).
        """
        configuration = without_build_inputs(configuration_manager)
        kwargs, _ = rep3d_architecture(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                       configuration.patch_size, configuration.spacing, cls.rep3d)
        return kwargs

    def _get_deep_supervision_scales(self):
        """One scale per deep-supervision output of the network built, not of the plan's: the paper's encoder
        (``topology="paper"``) strides 2 on every axis where nnU-Net's anisotropic plans do not, and nnU-Net's
        targets and loss weights follow these scales."""
        if not self.enable_deep_supervision:
            return None
        strides = self.rep3d_architecture_of(self.configuration_manager)["strides"]
        return [list(scale) for scale in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, *args, **kwargs) -> nn.Module:
        """``(plans_manager, configuration_manager, num_input_channels, num_output_channels,
        enable_deep_supervision=True)``, or nnU-Net 2.6's form (see ``nnunet_compat.network_build_inputs``).

        A classmethod, not nnU-Net's staticmethod: the predictor calls it on the class and needs the variant's settings.
        """
        inputs = network_build_inputs(plans_manager, *args, **kwargs)
        return build_rep3d_network(*inputs, cls.rep3d)

    @classmethod
    def deploy_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager) -> dict:
        """What ``rep3d-nnunet export`` writes into the plans: see ``rep3d_deploy_architecture``."""
        return rep3d_deploy_architecture(configuration_manager, cls.rep3d)

    def configure_optimizers(self):
        return build_optimizer(self.network, self.optim, self.num_epochs)

    def check_plan(self) -> None:
        """Before the first iteration: one line saying what of the plan's network the Rep3D network keeps and what it
        replaces, and one more where the plan's patch and batch were sized for another network and the Rep3D network
        needs more memory than that (``planning.memory_check``)."""
        from .planning import memory_check

        configuration = without_build_inputs(self.configuration_manager)
        architecture = configuration.configuration["architecture"]
        self.print_to_log_file(describe_translation(architecture["network_class_name"], architecture["arch_kwargs"],
                                                    self.rep3d))
        check = memory_check(self.plans_manager, configuration, self.rep3d,
                             self.num_input_channels, self.label_manager.num_segmentation_heads)
        if check is not None and check.ratio > MEMORY_WARNING_RATIO:
            dataset = self.plans_manager.dataset_name
            dataset_id = dataset[len("Dataset"):len("Dataset") + 3] if dataset.startswith("Dataset") else dataset
            self.print_to_log_file(check.line(dataset_id))
