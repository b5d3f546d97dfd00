"""nnU-Net's three folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) and dataset ids in them.

nnU-Net itself warns at import when a variable is unset and fails later with a ``TypeError`` on ``None``, or with a
``RuntimeError`` for an unknown dataset id; every command of ours that needs a folder or a dataset asks here first,
so that the user reads one line that names the variable or id and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

FOLDER_PURPOSE = {
    "nnUNet_raw": "the raw datasets, DatasetXXX_Name/imagesTr ...",
    "nnUNet_preprocessed": "nnU-Net's plans and preprocessed data",
    "nnUNet_results": "the model folders nnUNetv2_train writes",
}


def nnunet_folder(variable: str, override: str | Path | None = None, hint: str = "", must_exist: bool = True
                  ) -> Path:
    """The folder ``override`` or, without it, ``$variable``.

    Args:
        must_exist: False for commands that create the folder (writing a raw dataset).

    Raises:
        ValueError: unset (names the variable and the export line that fixes it; ``hint`` adds an alternative).
        FileNotFoundError: set to a folder that does not exist (with ``must_exist``).
    """
    value = override if override is not None else os.environ.get(variable)
    if not value:
        raise ValueError(f"{variable} is not set: export {variable}=/path/to/{variable} (the folder of "
                         f"{FOLDER_PURPOSE[variable]}){hint}; rep3d-nnunet doctor checks the whole setup.")
    folder = Path(value).expanduser()
    if must_exist and not folder.is_dir():
        raise FileNotFoundError(f"{variable}={folder} does not exist: create it (mkdir -p {folder}) or point "
                                f"{variable} at the folder of {FOLDER_PURPOSE[variable]}.")
    return folder


def dataset_folder(root: Path, dataset: str | int, variable: str = "", what: str = "dataset") -> Path:
    """The ``DatasetXXX_Name`` folder under ``root`` for a dataset id (``4``, ``"004"``) or full name.

    Args:
        root: one of nnU-Net's folders.
        dataset: id or ``DatasetXXX_Name``.
        variable: the variable ``root`` came from, for the message.
        what: what is missing, for the message (e.g. "trained models for dataset").

    Raises:
        FileNotFoundError: no such dataset folder; the message lists the ones there.
        ValueError: the id names more than one folder.
    """
    text = str(dataset).strip()
    if text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        candidates = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    else:
        candidates = [root / text] if (root / text).is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise ValueError(f"dataset id {text} matches several folders in {root}: "
                         f"{', '.join(p.name for p in candidates)}; pass the full name with -d")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
    where = f"{variable}={root}" if variable else str(root)
    raise FileNotFoundError(f"no {what} {text} in {where} (datasets there: {', '.join(present) or 'none'}); "
                            f"check -d and {variable or 'the folder'}")


def _dataset_in(variable: str, dataset: str | int, advice: str) -> Path:
    try:
        return dataset_folder(nnunet_folder(variable), dataset, variable)
    except FileNotFoundError as error:
        if "does not exist" in str(error):  # the variable's folder itself: its own message says what to do
            raise
        raise FileNotFoundError(f"{error}. {advice}") from None


def preprocessed_dataset(dataset: str | int) -> Path:
    """``$nnUNet_preprocessed/DatasetXXX_Name``: where nnUNetv2_plan_and_preprocess wrote plans and data.

    Raises:
        ValueError, FileNotFoundError: the variable is unset or wrong, or the dataset was not planned yet.
    """
    return _dataset_in("nnUNet_preprocessed", dataset, f"Plan it first: nnUNetv2_plan_and_preprocess -d {dataset}")


def raw_dataset(dataset: str | int) -> Path:
    """``$nnUNet_raw/DatasetXXX_Name``.

    Raises:
        ValueError, FileNotFoundError: the variable is unset or wrong, or there is no such raw dataset.
    """
    return _dataset_in("nnUNet_raw", dataset, "Convert it first (rep3d-nnunet convert / synthetic, or nnU-Net's "
                                               "dataset conversion)")
