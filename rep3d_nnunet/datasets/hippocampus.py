"""Real anatomy that ships with the package: 25 MSD Task04 Hippocampus cases (``rep3d_nnunet/data/Task04_Hippocampus``,
CC-BY-SA 4.0, attribution in its README.md), and held-out cases for an nnU-Net dataset converted from any copy of
the task (the MSD release's own test images have no labels).

The folder is in the MSD release layout, so nnU-Net's converter reads it as a user's download:
``nnUNetv2_convert_MSD_dataset -i SUBSET -overwrite_id ID``. Check a user's folder with
``msd.locate_msd(path, msd.HIPPOCAMPUS)`` first: it names what is missing in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SUBSET = Path(__file__).resolve().parents[1] / "data" / "Task04_Hippocampus"
IMAGE_SUFFIX = "_0000.nii.gz"  # nnU-Net's name of channel 0, as its MSD converter writes it


def move_held_out_cases(dataset: Path, every: int) -> list[str]:
    """Moves every ``every``-th case of a converted nnU-Net raw dataset (sorted identifiers, the first included) from
    imagesTr/labelsTr to imagesTs/labelsTs and updates dataset.json's numTraining.

    Returns:
        The moved identifiers, sorted.
    """
    identifiers = sorted(p.name[:-len(IMAGE_SUFFIX)] for p in (dataset / "imagesTr").glob(f"*{IMAGE_SUFFIX}"))
    held_out = identifiers[::every]
    for kind in ("imagesTs", "labelsTs"):
        (dataset / kind).mkdir(exist_ok=True)
    for identifier in held_out:
        shutil.move(dataset / "imagesTr" / f"{identifier}{IMAGE_SUFFIX}", dataset / "imagesTs")
        shutil.move(dataset / "labelsTr" / f"{identifier}.nii.gz", dataset / "labelsTs")
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    dataset_json["numTraining"] = len(identifiers) - len(held_out)
    (dataset / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    return held_out


def converter_input(source: Path, work: Path, every: int = 1) -> Path:
    """A folder nnU-Net's MSD converter accepts for the Task04 folder ``source`` (checked first, see below).

    The converter needs the folder to be named ``Task04_Hippocampus`` and to contain ``imagesTs/`` (copies of the
    release often drop that empty folder, and users rename folders); it gets symbolic links to ``imagesTr`` and
    ``labelsTr``, an empty ``imagesTs`` and the keys of dataset.json it reads, inside ``work`` (created). With
    ``every`` > 1 only every ``every``-th labelled case (sorted identifiers, the first included) is linked.

    Raises:
        FileNotFoundError, ValueError: ``source`` is not an MSD Task04 Hippocampus folder (one line naming the fix).
    """
    from .msd import HIPPOCAMPUS, _minimal_msd_json, locate_msd

    located = locate_msd(Path(source), HIPPOCAMPUS)
    mirror = Path(work) / HIPPOCAMPUS.folder_name
    if mirror.exists():
        shutil.rmtree(mirror)
    mirror.mkdir(parents=True)
    dataset_json = _minimal_msd_json(located.root / "dataset.json")
    if every == 1:
        for kind in ("imagesTr", "labelsTr"):
            (mirror / kind).symlink_to((located.root / kind).resolve(), target_is_directory=True)
    else:
        selected = located.cases[::every]
        for kind in ("imagesTr", "labelsTr"):
            (mirror / kind).mkdir()
        for case in selected:
            (mirror / "imagesTr" / case.image.name).symlink_to(case.image.resolve())
            (mirror / "labelsTr" / case.label.name).symlink_to(case.label.resolve())
        names = {case.label.name for case in selected}
        dataset_json["training"] = [entry for entry in dataset_json["training"]
                                    if Path(entry["label"]).name in names]
        dataset_json["numTraining"] = len(dataset_json["training"])
    (mirror / "imagesTs").mkdir()
    (mirror / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    return mirror
