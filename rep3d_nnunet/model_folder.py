"""Opening an nnU-Net model folder: plans, dataset.json, checkpoints, the trainer class and the network.

One room for everything that reads a trained or exported model folder (``export``, ``masks``, ``erf``, ``predict``,
the DKA trainers' source checkpoints): every failure a user can cause is raised here, once, as an exception whose
message names the file or argument and the fix. ``FileNotFoundError`` for something missing, ``ModelFolderError``
(a ``ValueError``) for content that is there but wrong; ``rep3d-nnunet`` turns both into one line and exit code 2.

Checkpoints are loaded with ``torch.load(weights_only=True)``: tensors and plain types only, never arbitrary
pickled objects. nnU-Net's training checkpoints hold numpy scalars in their logging entry, which are allowed
explicitly; exported checkpoints hold nothing but tensors and plain types.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .nnunet_compat import build_network, find_trainer_class, without_build_inputs

CHECKPOINT_PATTERN = "checkpoint_*.pth"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
REQUIRED_CHECKPOINT_KEYS = ("network_weights", "init_args", "trainer_name")
WHAT_A_MODEL_FOLDER_IS = (
    "An nnU-Net model folder is what nnUNetv2_train writes (dataset.json, plans.json, fold_*/checkpoint_*.pth), "
    "e.g. $nnUNet_results/DatasetXXX_Name/nnUNetTrainerRep3D__nnUNetPlans__3d_fullres, or its export "
    "(rep3d-nnunet export)."
)


class ModelFolderError(ValueError):
    """A model folder, checkpoint or plans file that exists but cannot be used; the message says why and the fix."""


def _numpy_scalar_globals() -> list:
    """What nnU-Net's training checkpoints pickle besides tensors: numpy scalars in their logging entry."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def load_checkpoint(path: str | Path) -> dict:
    """An nnU-Net checkpoint as a dict, loaded on the CPU with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        ModelFolderError: the file is truncated or corrupted, holds objects a weights-only load refuses, or is not an
            nnU-Net checkpoint (keys ``network_weights``, ``init_args``, ``trainer_name`` missing).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ModelFolderError(f"{path} holds objects that a weights-only load refuses ({first_line[:200]}); it was "
                               f"not written by nnUNetv2_train or rep3d-nnunet export. Use the checkpoint that "
                               f"nnU-Net wrote.") from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise ModelFolderError(f"{path} cannot be read: it is truncated or corrupted ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:160] if str(error) else 'no details'}). Copy it "
                               f"again from where it was trained, or retrain that fold.") from error
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_CHECKPOINT_KEYS):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ModelFolderError(f"{path} is not an nnU-Net checkpoint: it lacks {list(REQUIRED_CHECKPOINT_KEYS)} "
                               f"(found {found}). {WHAT_A_MODEL_FOLDER_IS}")
    return checkpoint


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{path} is not valid JSON ({error}); the model folder's {what} is damaged. Copy "
                               f"it again from the training output.") from error


@dataclass
class ModelFolder:
    """An nnU-Net model folder, checked when opened.

    Attributes:
        path: the folder.
        plans: plans.json.
        dataset_json: dataset.json.
        checkpoints: every fold_*/checkpoint_*.pth, sorted.
    """

    path: Path
    plans: dict
    dataset_json: dict
    checkpoints: list[Path]

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        """Reads plans.json and dataset.json and lists the checkpoints.

        Raises:
            FileNotFoundError: not a folder, plans.json or dataset.json missing, or no checkpoint inside.
            ModelFolderError: plans.json or dataset.json is not valid JSON.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Model folder {path} does not exist. {WHAT_A_MODEL_FOLDER_IS}")
        missing = [name for name in ("dataset.json", "plans.json") if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not an nnU-Net model folder: {', '.join(missing)} missing. "
                                    f"{WHAT_A_MODEL_FOLDER_IS}")
        plans, dataset_json = _read_json(path / "plans.json", "plans"), _read_json(path / "dataset.json", "dataset")
        checkpoints = sorted(p for fold in path.glob("fold_*") if fold.is_dir() for p in fold.glob(CHECKPOINT_PATTERN))
        if not checkpoints:
            raise FileNotFoundError(f"{path} has no checkpoints (fold_*/{CHECKPOINT_PATTERN}). Train at least one "
                                    f"fold first (nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER).")
        return cls(path, plans, dataset_json, checkpoints)

    def checkpoint_path(self, fold: str | int | None = None, name: str = DEFAULT_CHECKPOINT) -> Path:
        """``fold_<fold>/<name>``; without a fold, the lowest fold that has it (numbered folds before ``fold_all``).

        Raises:
            FileNotFoundError: no such checkpoint; the message lists those that exist.
        """
        matching = [p for p in self.checkpoints if p.name == name and (fold is None or p.parent.name == f"fold_{fold}")]
        if not matching:
            wanted = f"fold_{fold}/{name}" if fold is not None else f"fold_*/{name}"
            existing = ", ".join(str(p.relative_to(self.path)) for p in self.checkpoints)
            raise FileNotFoundError(f"{self.path} has no {wanted}. Checkpoints there: {existing}. "
                                    f"Choose one with --fold and --checkpoint.")
        return min(matching, key=_fold_order)

    def check_folds(self, folds, name: str = DEFAULT_CHECKPOINT) -> None:
        """Raises FileNotFoundError naming the folds without ``name`` and the folds that have it."""
        missing = [f for f in folds if not (self.path / f"fold_{f}" / name).is_file()]
        if missing:
            available = sorted({p.parent.name for p in self.checkpoints if p.name == name})
            raise FileNotFoundError(f"{self.path} has no {name} for fold(s) {missing}; folds that have it: "
                                    f"{', '.join(available) or 'none'}. Pass -f with those folds or train the "
                                    f"missing ones.")

    def load_checkpoint(self, path: Path) -> dict:
        """``load_checkpoint`` plus a check that the checkpoint's configuration exists in this folder's plans."""
        checkpoint = load_checkpoint(path)
        configuration = checkpoint["init_args"].get("configuration")
        if configuration not in self.plans.get("configurations", {}):
            raise ModelFolderError(
                f"{path} was trained on configuration {configuration!r}, which {self.path / 'plans.json'} does not "
                f"have (it has {sorted(self.plans.get('configurations', {}))}): plans and checkpoint do not belong "
                f"together. Use the plans.json that nnUNetv2_train wrote beside this checkpoint.")
        return checkpoint

    @cached_property
    def plans_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans)

    def configuration_manager(self, checkpoint: dict):
        """The checkpoint's configuration as the plans give it (without the build inputs our trainers record there
        for nnU-Net 2.6, see ``nnunet_compat``)."""
        return without_build_inputs(self.plans_manager.get_configuration(checkpoint["init_args"]["configuration"]))

    @cached_property
    def label_manager(self):
        return self.plans_manager.get_label_manager(self.dataset_json)

    def num_input_channels(self, checkpoint: dict) -> int:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        return determine_num_input_channels(self.plans_manager, self.configuration_manager(checkpoint),
                                            self.dataset_json)

    def trainer_class(self, checkpoint: dict) -> type:
        return find_trainer_class(checkpoint["trainer_name"])

    def build_network(self, checkpoint: dict, trainer_class: type | None = None, deep_supervision: bool = False
                      ) -> nn.Module:
        """The network nnU-Net's predictor builds for this checkpoint (``trainer_class`` by default the one the
        checkpoint names), freshly initialised, no weights loaded."""
        trainer_class = trainer_class or self.trainer_class(checkpoint)
        return build_network(trainer_class, self.plans_manager, self.configuration_manager(checkpoint),
                             self.num_input_channels(checkpoint), self.label_manager.num_segmentation_heads,
                             deep_supervision)

    def load_network(self, checkpoint: dict, path: Path | None = None) -> nn.Module:
        """``build_network`` with the checkpoint's weights loaded strictly, in eval mode, on the CPU.

        Raises:
            ModelFolderError: the weights do not fit the network the trainer builds from these plans.
        """
        network = self.build_network(checkpoint)
        try:
            network.load_state_dict(checkpoint["network_weights"])
        except RuntimeError as error:
            where = path or self.path
            raise ModelFolderError(
                f"The weights in {where} do not fit the network that {checkpoint['trainer_name']} builds from "
                f"{self.path / 'plans.json'}: plans and checkpoint do not belong together "
                f"({_first_mismatch(str(error))}). Use the plans.json that nnUNetv2_train wrote beside it."
            ) from error
        return network.eval()


def _fold_order(path: Path) -> tuple:
    suffix = path.parent.name.removeprefix("fold_")
    return (0, int(suffix), "") if suffix.isdigit() else (1, 0, suffix)


def _first_mismatch(message: str) -> str:
    """The first specific line of load_state_dict's report (missing/unexpected keys or a size mismatch)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if line), lines[0] if lines else message)
    return detail[:300]
