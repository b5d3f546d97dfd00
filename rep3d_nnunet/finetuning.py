"""Low-data fine-tuning in nnU-Net: a pretrained network, frozen, with dual-kernel adapters and a trained head.

``DKATrainer`` is an nnUNetTrainer started the way nnU-Net fine-tunes, ``nnUNetv2_train DATASET CONFIG FOLD
-tr nnUNetTrainerDKA -pretrained_weights SOURCE/fold_0/checkpoint_final.pth``, from any nnU-Net checkpoint of the
same plan: nnU-Net's PlainConvUNet, ResEnc, or a Rep3D network (the source trainer is read from the checkpoint, its
network rebuilt from the plans). Its life cycle fits nnU-Net's own:

1. ``initialize`` builds the source network only, so that nnU-Net's ``load_pretrained_weights`` (which asserts that
   every key of the network is in the checkpoint) loads it as it is;
2. the pretrained weights are checked first (same configuration, same architecture: one clear line otherwise) and
   the source trainer is recorded in the plans, which nnU-Net copies into the model folder;
3. ``on_train_start`` inserts the adapters (``adapters.insert_adapters``: the source keys stay unchanged), freezes
   everything but adapters and head, builds the optimizer with its two learning rates (the paper: 1e-3 adapters,
   1e-4 head), then compiles and wraps for DDP as nnUNetTrainer would have;
4. at inference ``build_network_architecture`` builds source + adapters from the model folder's plans alone, so
   ``nnUNetv2_predict`` works as for any trainer, and ``rep3d-nnunet export`` folds the adapters (and Rep3D
   sources) into a folder that needs no ``nnUNet_extTrainer``.

Step 2 needs the checkpoint's path, which nnU-Net hands to ``nnunetv2.run.run_training.load_pretrained_weights``
only: a DKA trainer wraps that function of nnU-Net's run module when it is constructed (for its own instance; other
trainers are passed through untouched).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from .adapters import (
    AdapterSettings,
    insert_adapters,
    is_adapter_parameter,
    is_head_parameter,
)
from .model_folder import ModelFolderError, load_checkpoint
from .nnunet_compat import (
    TrainerNotFoundError,
    build_network,
    find_trainer_class,
    network_build_inputs,
    own_build_inputs,
)
from .training import PolyLRPerGroup, ScheduledTrainer

DKA_PLANS_KEY = "dka"  # architecture entry of the fine-tuned model folder's plans: {"source_trainer": name}
DEPLOY_NETWORK = "rep3d_nnunet.finetuning.build_adapted_network"
SKIPPED_SOURCE_KEYS = (".seg_layers.",)  # nnU-Net's load_pretrained_weights does not transfer these


@dataclass(frozen=True)
class FinetuneOptimizer:
    """AdamW with one learning rate for the adapters and one for the head (and the backbone in full fine-tuning).

    Weight decay applies to kernels only (tensors with more than one axis), as for the Rep3D trainers.
    """

    adapter_lr: float = 1e-3
    head_lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def replace(self, **changes) -> "FinetuneOptimizer":
        return dataclasses.replace(self, **changes)


def source_trainer_name(configuration_manager: ConfigurationManager) -> str:
    """The trainer whose network the fine-tuned model adapts: recorded in the plans, nnU-Net's default before."""
    return configuration_manager.configuration.get("architecture", {}).get(DKA_PLANS_KEY, {}).get(
        "source_trainer", "nnUNetTrainer")


def trainable_parameter_groups(network: nn.Module, adapters: AdapterSettings, optim: FinetuneOptimizer
                               ) -> list[dict]:
    """Sets requires_grad (adapters and head train, the backbone only in full fine-tuning) and returns AdamW groups
    with ``initial_lr`` for the polynomial schedule."""
    groups = {"adapter": ([], []), "head": ([], [])}
    for name, parameter in network.named_parameters():
        if is_adapter_parameter(name):
            group = "adapter"
        elif is_head_parameter(name, adapters.head) or adapters.train_backbone:
            group = "head"
        else:
            parameter.requires_grad_(False)
            continue
        parameter.requires_grad_(True)
        groups[group][0 if parameter.ndim > 1 else 1].append(parameter)
    lrs = {"adapter": optim.adapter_lr, "head": optim.head_lr}
    result = []
    for group, (decay, no_decay) in groups.items():
        for params, weight_decay in ((decay, optim.weight_decay), (no_decay, 0.0)):
            if params:
                result.append({"params": params, "lr": lrs[group], "initial_lr": lrs[group],
                               "weight_decay": weight_decay, "name": group})
    return result


def _bare(network: nn.Module) -> nn.Module:
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class SourceCheckpointError(ModelFolderError):
    """A -pretrained_weights checkpoint that cannot be the source of this fine-tuning."""


def check_source(network: nn.Module, checkpoint: dict, path, configuration: str) -> None:
    """Raises SourceCheckpointError unless the checkpoint's weights fit ``network`` (segmentation layers aside).

    Raises:
        SourceCheckpointError: other configuration, another architecture (a different plan), or a fine-tuned model.
    """
    source_configuration = checkpoint["init_args"].get("configuration")
    if source_configuration != configuration:
        raise SourceCheckpointError(
            f"{path} was trained on configuration {source_configuration!r}, this fine-tuning runs on "
            f"{configuration!r}: fine-tune with the source's configuration (nnUNetv2_train DATASET "
            f"{source_configuration} FOLD -tr ... -pretrained_weights ...).")
    weights = checkpoint["network_weights"]
    if any(is_adapter_parameter(k) for k in weights):
        raise SourceCheckpointError(f"{path} is already fine-tuned (it has adapters); fine-tune from the checkpoint "
                                    f"it was fine-tuned from.")
    expected = {k: v.shape for k, v in network.state_dict().items() if not any(s in k for s in SKIPPED_SOURCE_KEYS)}
    missing = [k for k in expected if k not in weights]
    mismatched = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k])]
    if missing or mismatched:
        key = (missing or mismatched)[0]
        detail = (f"key {key} is missing" if missing else
                  f"{key} has shape {tuple(weights[key].shape)} there, {tuple(expected[key])} here")
        source_plans = checkpoint["init_args"].get("plans", {}).get("plans_name", "?")
        raise SourceCheckpointError(
            f"{path} comes from a different plan or network than this fine-tuning ({len(missing)} keys missing, "
            f"{len(mismatched)} of other shape; e.g. {detail}; source plans {source_plans!r}). Fine-tune on the "
            f"source's plans: nnUNetv2_move_plans_between_datasets -s SOURCE -t TARGET -sp PLANS -tp PLANS, "
            f"preprocess the target with them, and pass -p PLANS.")


def _fail(trainer_name: str, message: str) -> None:
    """nnUNetv2_train has no error handling of its own: one line and exit code 2, as rep3d-nnunet does."""
    print(f"{trainer_name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class DKATrainer(ScheduledTrainer):
    """Fine-tunes a pretrained nnU-Net network with adapters; variants set the class attributes only.

    Attributes:
        adapters: what is inserted and what trains (``adapters.AdapterSettings``).
        optim: the two learning rates.
        (schedule: see ``training.ScheduledTrainer``)
    """

    adapters: ClassVar[AdapterSettings] = AdapterSettings()
    optim: ClassVar[FinetuneOptimizer] = FinetuneOptimizer()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.optim.head_lr
        self.weight_decay = self.optim.weight_decay
        self.source_checkpoint: str | None = None
        self._adapted = False  # adapters inserted (and frozen, optimizer built) on this network
        self._wrap = {"compile": False, "ddp": False}
        # nnUNetTrainer.initialize builds self.build_network_architecture(...): the source network only, while
        # nnU-Net's predictor calls the classmethod (source + adapters) on the class.
        self.build_network_architecture = self._build_source_network
        _route_pretrained_weights_through(self)

    # ---- networks ----
    def _build_source_network(self, plans_manager, *args, **kwargs) -> nn.Module:
        """The source network from this trainer's plans and configuration, whichever form nnU-Net calls in."""
        inputs = own_build_inputs(self, plans_manager, *args, **kwargs)
        return build_network(find_trainer_class(source_trainer_name(inputs.configuration_manager)), *inputs)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, *args, **kwargs) -> nn.Module:
        """Source network (the trainer recorded in the plans) with this variant's adapters: what was trained.

        ``(plans_manager, configuration_manager, num_input_channels, num_output_channels,
        enable_deep_supervision=True)``, or nnU-Net 2.6's form (see ``nnunet_compat.network_build_inputs``).
        """
        inputs = network_build_inputs(plans_manager, *args, **kwargs)
        source = build_network(find_trainer_class(source_trainer_name(inputs.configuration_manager)), *inputs)
        return insert_adapters(source, cls.adapters, inputs.configuration_manager.patch_size)

    @classmethod
    def deploy_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager) -> dict:
        """The plans' ``architecture`` entry of the folded model (see ``build_adapted_network``)."""
        source_trainer = find_trainer_class(source_trainer_name(configuration_manager))
        deploy = getattr(source_trainer, "deploy_architecture", None)
        source = dict(configuration_manager.configuration["architecture"]) if deploy is None else \
            deploy(plans_manager, configuration_manager)
        source.pop(DKA_PLANS_KEY, None)
        return {"network_class_name": DEPLOY_NETWORK,
                "arch_kwargs": {"source": source, "adapters": dataclasses.asdict(cls.adapters),
                                "patch_size": list(configuration_manager.patch_size)},
                "_kw_requires_import": []}

    # ---- nnU-Net's life cycle ----
    def initialize(self):
        super().initialize()
        # compiled and DDP-wrapped after the adapters are in (on_train_start), from the bare source network now
        self._wrap = {"compile": isinstance(_bare_compiled(self.network), OptimizedModule), "ddp": self.is_ddp}
        self.network = _bare(self.network)

    def attach_source(self, path: str) -> None:
        """Checks the -pretrained_weights checkpoint, rebuilds the source network with the trainer that trained it
        (when it is not nnU-Net's default) and records that trainer in the plans the model folder keeps."""
        checkpoint = load_checkpoint(path)
        source = checkpoint["trainer_name"]
        architecture = self.plans_manager.plans["configurations"][self.configuration_name].setdefault(
            "architecture", {})
        if source != source_trainer_name(self.configuration_manager):
            architecture[DKA_PLANS_KEY] = {"source_trainer": source}
            self.configuration_manager = self.plans_manager.get_configuration(self.configuration_name)
            self.network = self._build_source_network(
                self.plans_manager, self.configuration_manager, self.num_input_channels,
                self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        check_source(self.network, checkpoint, path, self.configuration_name)
        architecture[DKA_PLANS_KEY] = {"source_trainer": source}
        self.source_checkpoint = str(path)

    def _adapt(self) -> None:
        """Inserts the adapters, freezes the rest, builds the optimizer; once."""
        if not self._adapted:
            insert_adapters(self.network, self.adapters, self.configuration_manager.patch_size)
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
            self._adapted = True

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if not self._adapted:
            if self.source_checkpoint is None:
                _fail(type(self).__name__, "fine-tuning needs a pretrained network: add -pretrained_weights "
                                           "PATH/TO/fold_X/checkpoint_final.pth (any nnU-Net checkpoint of the same "
                                           "plans and configuration).")
            self._adapt()
        if self._wrap["compile"]:
            self.print_to_log_file("Using torch.compile...")
            self.network = torch.compile(self.network)
        if self._wrap["ddp"]:
            self.network = DistributedDataParallel(torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network),
                                                   device_ids=[self.local_rank])
        super().on_train_start()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """A fine-tuned checkpoint (``--c``, ``--val``): its source network and adapters first, then nnU-Net's load
        (weights, optimizer state of the adapted optimizer, logging)."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            load_checkpoint(filename_or_checkpoint)
        trained_plans = checkpoint["init_args"].get("plans", {})
        recorded = trained_plans.get("configurations", {}).get(self.configuration_name, {}).get(
            "architecture", {}).get(DKA_PLANS_KEY)
        if recorded and recorded.get("source_trainer") != source_trainer_name(self.configuration_manager):
            self.plans_manager.plans["configurations"][self.configuration_name].setdefault(
                "architecture", {})[DKA_PLANS_KEY] = dict(recorded)
            self.configuration_manager = self.plans_manager.get_configuration(self.configuration_name)
            self.network = self._build_source_network(
                self.plans_manager, self.configuration_manager, self.num_input_channels,
                self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        if any(is_adapter_parameter(k) for k in checkpoint["network_weights"]) or self.adapters.kind == "none":
            self._adapt()
        # nnU-Net 2.8.1 only handles a file name here (a dict leaves its local ``checkpoint`` unbound), and a file
        # name is all nnU-Net itself ever passes
        super().load_checkpoint(filename_or_checkpoint)

    def configure_optimizers(self):
        groups = trainable_parameter_groups(_bare(self.network), self.adapters, self.optim)
        optimizer = torch.optim.AdamW(groups, lr=self.optim.head_lr, betas=self.optim.betas, eps=self.optim.eps)
        return optimizer, PolyLRPerGroup(optimizer, self.num_epochs)


def _bare_compiled(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, DistributedDataParallel) else network


def _route_pretrained_weights_through(trainer: DKATrainer) -> None:
    """Makes nnU-Net's ``-pretrained_weights`` path go through ``trainer.attach_source`` first (see module doc)."""
    from nnunetv2.run import run_training

    original = getattr(run_training.load_pretrained_weights, "nnunet_original", run_training.load_pretrained_weights)

    def load_pretrained_weights(network, fname, verbose=False):
        owner = getattr(load_pretrained_weights, "trainer", None)
        if owner is None or _bare(network) is not owner.network:
            return original(network, fname, verbose)
        try:
            owner.attach_source(fname)
        except (ModelFolderError, TrainerNotFoundError, FileNotFoundError) as error:
            _fail(type(owner).__name__, str(error))
        return original(owner.network, fname, verbose)

    load_pretrained_weights.nnunet_original = original
    load_pretrained_weights.trainer = trainer
    run_training.load_pretrained_weights = load_pretrained_weights


def build_adapted_network(input_channels: int, num_classes: int, source: dict, adapters: dict, patch_size: list,
                          deep_supervision: bool = False) -> nn.Module:
    """The folded fine-tuned network of an exported model folder, built by nnU-Net's default trainer through
    ``pydoc.locate`` from the plans: ``source`` is the source network's plans ``architecture`` entry (deploy form
    for a Rep3D source), ``adapters`` the ``AdapterSettings`` as a dict; adapters in deploy form (one merged kernel).
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    network = get_network_from_plans(source["network_class_name"], source["arch_kwargs"],
                                     source.get("_kw_requires_import", []), input_channels, num_classes,
                                     allow_init=False, deep_supervision=deep_supervision)
    return insert_adapters(network, AdapterSettings(**adapters), patch_size, deploy=True)
