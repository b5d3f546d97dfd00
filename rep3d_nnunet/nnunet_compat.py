"""What differs between the nnU-Net versions we support (2.6.2 - 2.8.x), in one place; and the one room that finds
trainer classes by name.

- Trainer lookup. From 2.8.0 nnU-Net searches its own trainer package, then the folders in ``nnUNet_extTrainer``;
  before, its own package only. ``rep3d-nnunet env`` then places a small module inside that package
  (``environment.EXTERNAL_TRAINER_MODULE``) that answers nnU-Net's lookup from the ``nnUNet_extTrainer`` folders,
  through ``find_in_external_folders`` here. ``find_trainer_class`` is our own lookup: nnU-Net's default trainer,
  our installed ``nnUNet_trainers`` folder (searched the way nnU-Net searches a folder: by importing its modules, no
  table of names here), then nnU-Net's lookup as this version has it.
- ``build_network_architecture``. 2.6.x calls it ``(architecture_class_name, arch_init_kwargs,
  arch_init_kwargs_req_import, num_input_channels, num_output_channels, enable_deep_supervision)``; 2.7.0 and later
  ``(plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)`` when
  the method's signature names ``plans_manager``, the old way otherwise. Our trainers accept both
  (``network_build_inputs``); ``build_network`` calls any trainer class the way nnU-Net would.
- The old form passes the plans' architecture entry alone, but a Rep3D network also needs the configuration's patch
  size (large kernels are capped per stage by the feature map) and spacing, and a fine-tuned network the source
  trainer recorded beside the entry. Our trainers record these in the model folder's plans, inside ``arch_kwargs``
  under ``BUILD_INPUTS_KEY`` (``record_build_inputs``); ``network_build_inputs`` rebuilds the configuration from them
  and removes the key in either form before anything else reads the ``arch_kwargs``. The same entry carries the
  large-kernel backend decisions the training took (``CONV_BACKENDS_KEY``, ``backend_choice.record``): building a
  network from such plans (nnU-Net's predictor, ``--val``, the export) adopts them (``backend_choice.adopt``).
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

SUPPORTED_RANGE = ">=2.6.2,<2.9"
BUILD_INPUTS_KEY = "rep3d_build_inputs"
CONV_BACKENDS_KEY = "conv_backends"  # inside the build inputs: {device identity: [decision, ...]}
_ARCHITECTURE_ENTRY_KEYS = ("network_class_name", "arch_kwargs", "_kw_requires_import")


@functools.cache
def nnunet_version() -> tuple[int, int, int]:
    """The installed nnunetv2 release as (major, minor, patch), read from its metadata (nnunetv2 is not imported)."""
    numbers = [int(n) for n in re.findall(r"\d+", version("nnunetv2"))[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


def trainer_folder() -> Path:
    """The installed ``nnUNet_trainers`` folder, where our trainers live: what ``nnUNet_extTrainer`` must list.

    Found without importing it: the folder publishes the variant table, which sits above this module in the data flow.
    """
    spec = importlib.util.find_spec("nnUNet_trainers")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The nnUNet_trainers folder is not installed beside rep3d_nnunet. Fix: pip install -e "
                                  ". in the rep3d-nnunet repository (it installs both).")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def has_external_trainer_folders() -> bool:
    """Whether nnU-Net itself searches the folders in ``nnUNet_extTrainer`` (2.8.0 and later)."""
    return nnunet_version() >= (2, 8, 0)


def external_trainer_folders(environ: dict | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    return [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]


# ---- finding trainer classes ----


class TrainerNotFoundError(ValueError):
    """No trainer of that name in nnU-Net, our trainer folder or the ``nnUNet_extTrainer`` folders."""


def find_in_external_folders(class_name: str, folders: list[str] | None = None) -> type | None:
    """The class ``class_name`` from the first folder in ``nnUNet_extTrainer`` that has it, searched as nnU-Net 2.8
    does: the folder's modules first, then its packages, with the folder on ``sys.path`` while importing."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    for folder in external_trainer_folders() if folders is None else folders:
        folder = os.path.abspath(folder)
        if not os.path.isdir(folder):
            continue
        added = folder not in sys.path
        if added:
            sys.path.insert(0, folder)
        try:
            modules = list(pkgutil.iter_modules([folder]))
            for _, name, is_package in modules:
                if not is_package and hasattr(module := importlib.import_module(name), class_name):
                    return getattr(module, class_name)
            for _, name, is_package in modules:
                if is_package and (found := recursive_find_python_class(os.path.join(folder, name), class_name, name)):
                    return found
        finally:
            if added:
                sys.path.remove(folder)
    return None


def _nnunet_lookup(trainer_name: str) -> type | None:
    """nnU-Net's own lookup on this version: its trainer package, then (2.8) the ``nnUNet_extTrainer`` folders."""
    import nnunetv2

    if has_external_trainer_folders():
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        try:
            return recursive_find_trainer_class_by_name(trainer_name)
        except RuntimeError:
            return None
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), trainer_name,
                                        "nnunetv2.training.nnUNetTrainer")
    return found or find_in_external_folders(trainer_name)


def find_trainer_class(trainer_name: str) -> type:
    """The trainer class of that name: nnU-Net's default, ours (the installed ``nnUNet_trainers`` folder), or any
    other nnU-Net finds (its own trainers, then the folders in ``nnUNet_extTrainer``, on every supported version).

    Raises:
        TrainerNotFoundError: nobody has it; the message says how to register a trainer folder.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    if trainer_name == nnUNetTrainer.__name__:  # the default: no need to import every trainer module to find it
        return nnUNetTrainer
    found = recursive_find_python_class(str(trainer_folder()), trainer_name, "nnUNet_trainers") or \
        _nnunet_lookup(trainer_name)
    if found is None:
        raise TrainerNotFoundError(
            f"nnU-Net cannot find the trainer {trainer_name!r}. If it is a custom trainer, list its folder in "
            f"nnUNet_extTrainer (export nnUNet_extTrainer=/path/to/trainers); rep3d-nnunet trainers lists ours.")
    return found


# ---- building a trainer's network in either call form ----


class BuildInputs(NamedTuple):
    """What ``build_network_architecture`` receives, in the new form. ``plans_manager`` is None when the call came in
    the old form (nnU-Net 2.6), which passes no plans."""

    plans_manager: object
    configuration_manager: object
    num_input_channels: int
    num_output_channels: int
    enable_deep_supervision: bool


_NEW_FORM = ("plans_manager", "configuration_manager", "num_input_channels", "num_output_channels",
             "enable_deep_supervision")
_OLD_FORM = ("architecture_class_name", "arch_init_kwargs", "arch_init_kwargs_req_import", "num_input_channels",
             "num_output_channels", "enable_deep_supervision")


def without_build_inputs(configuration_manager):
    """The configuration as the plans gave it, without our recorded build inputs (the same object if it has none)."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    if BUILD_INPUTS_KEY not in configuration_manager.network_arch_init_kwargs:
        return configuration_manager
    configuration = copy.deepcopy(configuration_manager.configuration)
    configuration["architecture"]["arch_kwargs"].pop(BUILD_INPUTS_KEY)
    return ConfigurationManager(configuration)


def _bind(args: tuple, kwargs: dict) -> tuple[bool, dict]:
    """(old form?, the call's arguments by name) of a ``build_network_architecture`` call."""
    first = args[0] if args else kwargs.get("plans_manager", kwargs.get("architecture_class_name"))
    old_form = isinstance(first, str)
    return old_form, {**dict(zip(_OLD_FORM if old_form else _NEW_FORM, args)), **kwargs}


def own_build_inputs(trainer, *args, **kwargs) -> BuildInputs:
    """A trainer's call of its own ``build_network_architecture`` (``nnUNetTrainer.initialize``) in either form, as
    the new form: the trainer's plans and configuration, the channels and deep supervision of the call."""
    _, bound = _bind(args, kwargs)
    adopt_conv_backends(trainer.configuration_manager.network_arch_init_kwargs)
    return BuildInputs(trainer.plans_manager, without_build_inputs(trainer.configuration_manager),
                       bound["num_input_channels"], bound["num_output_channels"],
                       bool(bound.get("enable_deep_supervision", True)))


def network_build_inputs(*args, **kwargs) -> BuildInputs:
    """The arguments of a ``build_network_architecture`` call on the class (nnU-Net's predictor) in either form, as
    the new form. In the old form the configuration is rebuilt from the architecture entry and the build inputs
    recorded in it. Backend decisions recorded in the build inputs are adopted (``adopt_conv_backends``).

    Raises:
        ValueError: an old-form call on an architecture entry without recorded build inputs (a model folder trained
            before they were recorded, predicted on nnU-Net 2.6).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    old_form, bound = _bind(args, kwargs)
    deep_supervision = bool(bound.get("enable_deep_supervision", True))
    channels = bound["num_input_channels"], bound["num_output_channels"]
    if not old_form:
        adopt_conv_backends(bound["configuration_manager"].network_arch_init_kwargs)
        return BuildInputs(bound["plans_manager"], without_build_inputs(bound["configuration_manager"]), *channels,
                           deep_supervision)
    arch_kwargs = dict(bound["arch_init_kwargs"])
    adopt_conv_backends(arch_kwargs)
    recorded = arch_kwargs.pop(BUILD_INPUTS_KEY, None)
    if recorded is None:
        raise ValueError(
            f"The plans' architecture entry ({bound['architecture_class_name']}) lacks the patch size and spacing "
            f"that nnU-Net {'.'.join(map(str, nnunet_version()))} does not pass to build_network_architecture: the "
            f"model folder was written before rep3d-nnunet recorded them. Predict it with nnU-Net >= 2.7, or export "
            f"it there (rep3d-nnunet export), which any supported nnU-Net predicts.")
    architecture = {"network_class_name": bound["architecture_class_name"], "arch_kwargs": arch_kwargs,
                    "_kw_requires_import": list(bound["arch_init_kwargs_req_import"]), **recorded["architecture"]}
    configuration = {"patch_size": recorded["patch_size"], "spacing": recorded["spacing"],
                     "architecture": architecture}
    return BuildInputs(None, ConfigurationManager(configuration), *channels, deep_supervision)


def record_build_inputs(plans: dict, configuration_name: str, conv_backends: dict | None = None) -> None:
    """Writes into ``plans`` (in place) what the old form of ``build_network_architecture`` needs besides the
    architecture entry: the configuration's patch size and spacing, and the architecture entry's other keys (a
    fine-tuned model's source trainer). The entry is written out in the configuration itself (resolving
    ``inherits_from``); a Rep3D trainer calls this before nnU-Net saves the model folder's plans.json.

    Args:
        conv_backends: the backend decisions to record with the model (``backend_choice.record``); None keeps those
            already recorded, if any.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(copy.deepcopy(plans)).get_configuration(configuration_name)
    architecture = copy.deepcopy(resolved.configuration["architecture"])
    arch_kwargs = architecture["arch_kwargs"]
    previous = recorded_conv_backends(arch_kwargs)
    arch_kwargs.pop(BUILD_INPUTS_KEY, None)
    arch_kwargs[BUILD_INPUTS_KEY] = {
        "patch_size": [int(p) for p in resolved.patch_size], "spacing": [float(s) for s in resolved.spacing],
        "architecture": {k: v for k, v in architecture.items() if k not in _ARCHITECTURE_ENTRY_KEYS},
    }
    conv_backends = previous if conv_backends is None else conv_backends
    if conv_backends:
        arch_kwargs[BUILD_INPUTS_KEY][CONV_BACKENDS_KEY] = conv_backends
    plans["configurations"][configuration_name]["architecture"] = architecture


def recorded_conv_backends(arch_kwargs: dict) -> dict | None:
    """The backend decisions recorded in a configuration's ``arch_kwargs`` (``record_build_inputs``), or None."""
    return (arch_kwargs.get(BUILD_INPUTS_KEY) or {}).get(CONV_BACKENDS_KEY)


def adopt_conv_backends(arch_kwargs: dict) -> None:
    """Makes the backend decisions recorded in ``arch_kwargs`` this process's, for the devices this machine has
    (``backend_choice.adopt``: a record of another device is ignored with one printed line)."""
    recorded = recorded_conv_backends(arch_kwargs)
    if recorded:
        from .backend_choice import adopt

        adopt(recorded)


def build_network(trainer_class: type, plans_manager, configuration_manager, num_input_channels: int,
                  num_output_channels: int, enable_deep_supervision: bool):
    """``trainer_class.build_network_architecture`` called as nnU-Net >= 2.7 calls it: the new form when its
    signature names ``plans_manager`` (ours, and nnU-Net's own from 2.7), the old form otherwise (nnU-Net 2.6); the
    configuration without our recorded build inputs, which nnU-Net's own networks would not accept."""
    build = trainer_class.build_network_architecture
    configuration_manager = without_build_inputs(configuration_manager)
    if "plans_manager" in inspect.signature(build).parameters:
        return build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                     enable_deep_supervision)
    return build(configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                 configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
                 enable_deep_supervision)

