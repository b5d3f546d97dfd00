"""AMOS22 (abdominal multi-organ segmentation, CT and MRI) from its official release, one modality at a time.

Source layout (the release on zenodo.org/record/7262581; the extracted ``amos22`` folder or its parent)::

    amos22/
        dataset.json                 labels "1": "spleen" ... "15": "prostate/uterus"; training/validation lists
        imagesTr/amos_0001.nii.gz    labelsTr/amos_0001.nii.gz     (labelled: used)
        imagesVa/amos_0008.nii.gz    labelsVa/amos_0008.nii.gz     (labelled: used with include_validation)
        imagesTs/amos_0002.nii.gz                                  (no labels: never used)

Case ``amos_XXXX`` is CT if XXXX <= 500 and MRI otherwise. Images are copied byte for byte, so nnU-Net reads the
geometry from the NIfTI header.

Labels keep AMOS's values, which already follow the Rep3D paper's order; only names change (AMOS writes
"gall bladder", "arota", "postcava")::

    1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta,
    9 inferior vena cava, 10 pancreas, 11 right adrenal gland, 12 left adrenal gland, 13 duodenum,
    14 bladder (CT only), 15 prostate/uterus (CT only)

The MRI dataset has the 13 organs the paper evaluates on MRI. AMOS does not annotate bladder and prostate/uterus on
MRI; should an MRI label still hold the values 14 or 15, they are set to background and the case is listed in the
converted dataset.json (``rep3d_conversion.relabelled_to_background``).

Which cases: by default the labelled training cases (``labelsTr``), which is what the paper's 200 CT scans are
(Table 6: 160 train / 20 val / 20 test); ``include_validation`` adds the labelled ``labelsVa`` cases.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .layout import (LabelledCase, SourceDataset, check_listed_cases, copy_label, load_json, pair_folders, preview,
                     require)

CT_LABELS = {
    "background": 0, "spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "esophagus": 5, "liver": 6,
    "stomach": 7, "aorta": 8, "inferior vena cava": 9, "pancreas": 10, "right adrenal gland": 11,
    "left adrenal gland": 12, "duodenum": 13, "bladder": 14, "prostate/uterus": 15,
}
MRI_LABELS = {name: value for name, value in CT_LABELS.items() if value <= 13}
LARGEST_CT_CASE_ID = 500
MODALITIES = ("CT", "MRI")
RELEASE = "https://zenodo.org/record/7262581"
REFERENCE = "https://amos22.grand-challenge.org/"

_CASE_NAME = re.compile(r"amos_(\d{4})")
# A few AMOS label values whose names identify the numbering (robust to AMOS's spelling of the others)
_SIGNATURE = {1: "spleen", 6: "liver", 10: "pancreas", 13: "duodenum"}
_LAYOUT = "the AMOS22 release layout (dataset.json, imagesTr/, labelsTr/, imagesVa/, labelsVa/, imagesTs/ with " \
          "files amos_XXXX.nii.gz)"
_FIX = "pass the extracted amos22 folder, the one that contains dataset.json and imagesTr/ (or its parent)"


def locate_amos(source: Path, modality: str, include_validation: bool = False) -> SourceDataset:
    """Validates an AMOS22 release and returns its labelled cases of one modality.

    Args:
        source: the extracted ``amos22`` folder, or a folder containing it.
        modality: ``"CT"`` (case ids <= 500) or ``"MRI"`` (case ids > 500).
        include_validation: also use the labelled validation cases (``imagesVa``/``labelsVa``).

    Returns:
        The release root and its labelled cases of ``modality``, identifiers ``amos_XXXX``.

    Raises:
        FileNotFoundError: a required file or folder is missing, or images and labels do not pair up.
        ValueError: dataset.json does not use AMOS's label numbering, a file is not named ``amos_XXXX.nii.gz``, or
            there is no labelled case of ``modality``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    root = _release_root(Path(source))
    dataset_json = load_json(root / "dataset.json", _LAYOUT, _FIX)
    _check_label_numbering(dataset_json, root / "dataset.json")

    subsets = [("Tr", "training")] + ([("Va", "validation")] if include_validation else [])
    cases: list[LabelledCase] = []
    for suffix, key in subsets:
        images, labels = root / f"images{suffix}", root / f"labels{suffix}"
        require(images, "folder", _LAYOUT, _FIX)
        require(labels, "folder", _LAYOUT, _FIX)
        found = pair_folders(images, labels, _FIX)
        check_listed_cases(dataset_json, key, [c.identifier for c in found], root / "dataset.json", _FIX)
        cases += found

    odd = [f"{c.identifier}.nii.gz" for c in cases if not _CASE_NAME.fullmatch(c.identifier)]
    if odd:
        raise ValueError(f"unexpected file names in {root} ({preview(odd)}): AMOS22 names its cases "
                         f"amos_XXXX.nii.gz and the case id decides CT (<= {LARGEST_CT_CASE_ID}) or MRI. "
                         f"Fix: remove or rename the other files")
    selected = tuple(c for c in sorted(cases, key=lambda c: c.identifier) if modality_of(c.identifier) == modality)
    if not selected:
        where = "labelsTr/labelsVa" if include_validation else "labelsTr"
        raise ValueError(f"no labelled {modality} case in {root / where} (CT: case id <= {LARGEST_CT_CASE_ID}, "
                         f"MRI: > {LARGEST_CT_CASE_ID}). Fix: pass the complete AMOS22 release")
    info = {"licence": dataset_json.get("licence", dataset_json.get("license")),
            "release": dataset_json.get("release")}
    return SourceDataset(root, selected, {k: v for k, v in info.items() if isinstance(v, str)})


def modality_of(identifier: str) -> str:
    """``"CT"`` or ``"MRI"`` for ``amos_XXXX`` from its case id."""
    return "CT" if int(_CASE_NAME.fullmatch(identifier).group(1)) <= LARGEST_CT_CASE_ID else "MRI"


def write_mri_label(source: Path, target: Path) -> bool:
    """Writes an AMOS MRI label with the 13 MRI organs; values above 13 become background. True if any did."""
    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayFromImage(image)
    outside = array > max(MRI_LABELS.values())
    if not outside.any():
        return copy_label(source, target)
    array = np.where(outside, 0, array).astype(array.dtype)
    relabelled = sitk.GetImageFromArray(array)
    relabelled.CopyInformation(image)  # same origin, spacing and direction as the released file
    sitk.WriteImage(relabelled, str(target), useCompression=True)
    return True


def _release_root(source: Path) -> Path:
    """``source`` if it holds the release, else ``source/amos22`` (the zip's top folder) if that does."""
    if not (source / "dataset.json").exists() and (source / "amos22" / "dataset.json").is_file():
        return source / "amos22"
    require(source, "folder", _LAYOUT, _FIX)
    return source


def _check_label_numbering(dataset_json: dict, path: Path) -> None:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise ValueError(f"{path} has no 'labels' mapping; expected {_LAYOUT}. Fix: {_FIX}")
    # AMOS writes {"1": "spleen", ...}; accept the nnU-Net v2 orientation {"spleen": 1, ...} as well
    if all(str(k).isdigit() for k in labels):
        names = {int(k): str(v).lower() for k, v in labels.items()}
    else:
        names = {int(v): str(k).lower() for k, v in labels.items() if str(v).isdigit()}
    wrong = {value: names.get(value) for value, name in _SIGNATURE.items() if name not in (names.get(value) or "")}
    if wrong:
        raise ValueError(f"{path} does not use AMOS22's label numbering (expected "
                         f"{', '.join(f'{v} {n}' for v, n in _SIGNATURE.items())}, ...; found "
                         f"{', '.join(f'{v} {n}' for v, n in wrong.items())}). Fix: {_FIX}")
