"""KiTS21 (kidney, kidney tumour and cyst in contrast-enhanced CT) from the official kits21 repository.

Source layout (github.com/neheller/kits21 after ``python kits21/data/get_imaging.py``)::

    kits21/data/                             the folder to pass (or the repository root, which holds kits21/data)
        case_00000/
            imaging.nii.gz                   CT, downloaded separately by get_imaging.py
            aggregated_MAJ_seg.nii.gz        majority vote of the annotations: 0 background, 1 kidney, 2 tumor, 3 cyst
            segmentations/ ...               individual annotations (not used)
        case_00001/ ...

Every ``case_XXXXX`` folder must hold both files: the repository ships the segmentations but not the imaging, and
a half-downloaded copy would silently change the split, so missing files are an error rather than a skipped case.

Axis order: kits21 stores the volumes with the slice axis first in the NIfTI voxel grid (numpy via nibabel:
(slices, rows, columns)), unlike most CT releases. Like nnU-Net's own KiTS converters, the files are copied byte for
byte: the header's direction and spacing carry the geometry, nnU-Net's SimpleITK reader uses them, and its planner
finds the low-resolution axis from the spacing whatever its position. This only matters when a model trained on
another dataset is applied to KiTS or vice versa (align the axes first).

Labels are used as three classes (the paper reports kidney, tumor and cyst Dice), not as nnU-Net's KiTS regions.
"""

from __future__ import annotations

import re
from pathlib import Path

from .layout import LabelledCase, SourceDataset, preview, require

LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
IMAGE_FILE = "imaging.nii.gz"
LABEL_FILE = "aggregated_MAJ_seg.nii.gz"
REFERENCE = "https://kits-challenge.org/kits21/"
RELEASE = "https://github.com/neheller/kits21"

_CASE_FOLDER = re.compile(r"case_\d{5}")
_LAYOUT = f"the kits21 layout (case_XXXXX/ folders, each with {IMAGE_FILE} and {LABEL_FILE})"
_FIX = "pass the kits21/data folder of the kits21 repository (or the repository root)"


def locate_kits21(source: Path) -> SourceDataset:
    """Validates a kits21 data folder and returns its cases, identifiers ``case_XXXXX``.

    Args:
        source: the ``kits21/data`` folder, or the repository root holding ``kits21/data`` (or ``data``).

    Returns:
        The data folder and every case, sorted.

    Raises:
        FileNotFoundError: no ``case_XXXXX`` folder, or a case lacks its image or label file.
    """
    root = _data_folder(Path(source))
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _CASE_FOLDER.fullmatch(p.name))
    no_image = [f.name for f in folders if not (f / IMAGE_FILE).is_file()]
    no_label = [f.name for f in folders if not (f / LABEL_FILE).is_file()]
    if no_image:
        raise FileNotFoundError(f"{len(no_image)} of {len(folders)} case folders in {root} have no {IMAGE_FILE} "
                                f"({preview(no_image)}). The kits21 repository does not contain the images. "
                                f"Fix: download them with `python kits21/data/get_imaging.py` in the repository")
    if no_label:
        raise FileNotFoundError(f"{len(no_label)} of {len(folders)} case folders in {root} have no {LABEL_FILE} "
                                f"({preview(no_label)}); it ships with the kits21 repository (v1.0 or later). "
                                f"Fix: update the repository (git pull) or {_FIX}")
    cases = tuple(LabelledCase(f.name, f / IMAGE_FILE, f / LABEL_FILE) for f in folders)
    return SourceDataset(root, cases, {})


def _data_folder(source: Path) -> Path:
    """The folder holding the ``case_XXXXX`` folders: ``source`` itself, ``source/kits21/data`` or ``source/data``."""
    require(source, "folder", _LAYOUT, _FIX)
    for candidate in (source, source / "kits21" / "data", source / "data"):
        if candidate.is_dir() and any(p.is_dir() and _CASE_FOLDER.fullmatch(p.name) for p in candidate.iterdir()):
            return candidate
    raise FileNotFoundError(f"no case_XXXXX folder in {source} (nor in {source / 'kits21' / 'data'} or "
                            f"{source / 'data'}): expected {_LAYOUT}. Fix: {_FIX}")
