"""Medical Segmentation Decathlon Task07 Pancreas and Task08 HepaticVessel, converted by nnU-Net's own converter.

Source layout (the extracted MSD tar; the ``TaskXX_Name`` folder or its parent)::

    Task07_Pancreas/
        dataset.json                   "name": "Pancreas", "modality": {"0": "CT"},
                                       "labels": {"0": "background", "1": "pancreas", "2": "cancer"}, "training": [...]
        imagesTr/pancreas_001.nii.gz   labelsTr/pancreas_001.nii.gz     (labelled: used)
        imagesTs/pancreas_002.nii.gz                                    (no labels: never used)
    Task08_HepaticVessel/              "name": "HepaticVessel", labels "1": "Vessel", "2": "Tumour";
                                       files hepaticvessel_XXX.nii.gz

The conversion itself is ``nnunetv2.dataset_conversion.convert_MSD_dataset.convert_msd_dataset`` (it splits 4D
files into channels, skips macOS ``._`` files and copies the labels). Two things are arranged around it:

- It reads ``TaskXX_Name/{imagesTr,labelsTr,imagesTs,dataset.json}`` and writes into ``$nnUNet_raw``. It is given a
  private mirror of the release instead: symbolic links to ``imagesTr``/``labelsTr``, an empty ``imagesTs`` (the
  paper's test cases are held-out *labelled* cases, MSD's own test images have no labels and are not converted) and
  a minimal copy of dataset.json. Its output folder is redirected into the converter's staging folder, so the real
  raw folder only ever sees the finished dataset.
- Its result is then redistributed: held-out cases move to ``imagesTs``/``labelsTs``, the rest to
  ``imagesTr``/``labelsTr``, and dataset.json is regenerated with the label names used in the paper
  (pancreas/tumor, vessel/tumor; the values are MSD's).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from .layout import FILE_ENDING, SourceDataset, check_listed_cases, load_json, pair_folders, require

REFERENCE = "http://medicaldecathlon.com/"


@dataclass(frozen=True)
class MsdTask:
    """One MSD task: its number and name as in ``TaskNN_Name`` and the labels the converted dataset uses."""

    number: int
    name: str
    labels: Mapping[str, int]
    modality: str = "CT"

    @property
    def folder_name(self) -> str:
        return f"Task{self.number:02d}_{self.name}"


PANCREAS = MsdTask(7, "Pancreas", {"background": 0, "pancreas": 1, "tumor": 2})
HEPATIC_VESSEL = MsdTask(8, "HepaticVessel", {"background": 0, "vessel": 1, "tumor": 2})
# Real anatomy for the tests, the demo and nnU-Net's integration protocol (a 25-case subset ships in rep3d_nnunet/data)
HIPPOCAMPUS = MsdTask(4, "Hippocampus", {"background": 0, "anterior": 1, "posterior": 2}, modality="MRI")


def locate_msd(source: Path, task: MsdTask) -> SourceDataset:
    """Validates an MSD task folder and returns its labelled training cases (identifiers as the file names).

    Args:
        source: the ``TaskNN_Name`` folder (any name, as long as it holds the task's dataset.json), or its parent.
        task: :data:`PANCREAS`, :data:`HEPATIC_VESSEL` or :data:`HIPPOCAMPUS`.

    Returns:
        The task folder and its labelled cases, sorted.

    Raises:
        FileNotFoundError: dataset.json, imagesTr or labelsTr is missing, images and labels do not pair up, or cases
            listed in dataset.json are not on disk.
        ValueError: the folder holds another MSD task, or not the task's one channel with labels 1 and 2.
    """
    layout = (f"the MSD {task.folder_name} layout (dataset.json, imagesTr/, labelsTr/ with files "
              f"{task.name.lower()}_XXX.nii.gz)")
    fix = f"pass the extracted {task.folder_name} folder, the one that contains dataset.json and imagesTr/"
    source = Path(source)
    root = source
    if not (source / "dataset.json").exists() and (source / task.folder_name / "dataset.json").is_file():
        root = source / task.folder_name
    dataset_json = load_json(root / "dataset.json", layout, fix)
    _check_task(dataset_json, root / "dataset.json", task, fix)
    require(root / "imagesTr", "folder", layout, fix)
    require(root / "labelsTr", "folder", layout, fix)
    cases = pair_folders(root / "imagesTr", root / "labelsTr", fix)
    check_listed_cases(dataset_json, "training", [c.identifier for c in cases], root / "dataset.json", fix)
    if not cases:
        raise FileNotFoundError(f"no labelled case in {root / 'labelsTr'}: expected {layout}. Fix: {fix}")
    info = {"licence": dataset_json.get("licence"), "release": dataset_json.get("release")}
    return SourceDataset(root, tuple(cases), {k: v for k, v in info.items() if isinstance(v, str)})


def write_msd(source: SourceDataset, task: MsdTask, assignment: Mapping[str, str], folder: Path, work: Path,
              num_processes: int) -> None:
    """Converts the cases with nnU-Net's MSD converter and distributes them into ``folder``.

    Args:
        source: from :func:`locate_msd`.
        task: the task ``source`` holds.
        assignment: identifier -> ``"Tr"`` or ``"Ts"`` for every case of ``source``.
        folder: the dataset folder being built; receives ``images{Tr,Ts}/ID_0000.nii.gz`` and ``labels{Tr,Ts}``.
        work: an empty scratch folder inside the staging area.
        num_processes: worker processes for nnU-Net's converter.
    """
    from nnunetv2.dataset_conversion import convert_MSD_dataset as msd_module

    mirror = work / "msd_source" / task.folder_name
    mirror.mkdir(parents=True)
    (mirror / "imagesTr").symlink_to((source.root / "imagesTr").resolve(), target_is_directory=True)
    (mirror / "labelsTr").symlink_to((source.root / "labelsTr").resolve(), target_is_directory=True)
    (mirror / "imagesTs").mkdir()  # MSD's unlabelled test images play no part in the paper's protocol
    (mirror / "dataset.json").write_text(json.dumps(_minimal_msd_json(source.root / "dataset.json")))

    converted_root = work / "nnunet_raw"
    converted_root.mkdir()
    with _msd_converter_writing_to(msd_module, converted_root):
        msd_module.convert_msd_dataset(str(mirror), overwrite_target_id=task.number, num_processes=num_processes)
    converted = converted_root / f"Dataset{task.number:03d}_{task.name}"

    expected_images = {f"{c.identifier}_0000{FILE_ENDING}" for c in source.cases}
    produced = {p.name for p in (converted / "imagesTr").iterdir()}
    if produced != expected_images:
        extra, missing = sorted(produced - expected_images), sorted(expected_images - produced)
        raise RuntimeError(f"nnU-Net's MSD converter did not produce one image per case (unexpected: {extra[:5]}, "
                           f"missing: {missing[:5]}); a multi-channel (4D) image in imagesTr would do that")
    for case in source.cases:
        part = assignment[case.identifier]
        for kind, name in (("images", f"{case.identifier}_0000{FILE_ENDING}"),
                           ("labels", f"{case.identifier}{FILE_ENDING}")):
            (folder / f"{kind}{part}").mkdir(exist_ok=True)
            shutil.move(converted / f"{kind}Tr" / name, folder / f"{kind}{part}" / name)


def _check_task(dataset_json: dict, path: Path, task: MsdTask, fix: str) -> None:
    """Refuses another MSD task or an unexpected channel/label layout before anything is converted."""
    name = dataset_json.get("name")
    if isinstance(name, str) and name.replace(" ", "").lower() != task.name.lower():
        raise ValueError(f"{path} describes the MSD task {name!r}, not {task.name!r}. Fix: {fix}, or pick the "
                         f"converter for {name!r}")
    modality = dataset_json.get("modality", dataset_json.get("channel_names"))
    expected = task.modality
    if not isinstance(modality, dict) or len(modality) != 1 or str(next(iter(modality.values()))).upper() != expected:
        raise ValueError(f"{path} declares the channels {modality!r}; {task.folder_name} has one {expected} channel "
                         f"({{\"0\": \"{expected}\"}}). Fix: {fix}")
    labels = dataset_json.get("labels")
    values = sorted(int(k) for k in labels if str(k).isdigit()) if isinstance(labels, dict) else []
    if values != [0, 1, 2]:
        raise ValueError(f"{path} declares the labels {labels!r}; {task.folder_name} has 0 background and two "
                         f"foreground labels 1 and 2 (MSD format {{\"0\": \"background\", \"1\": ..., \"2\": ...}}). "
                         f"Fix: {fix}")


def _minimal_msd_json(path: Path) -> dict:
    """The keys nnU-Net's converter reads (and deletes) from an MSD dataset.json, so absent extras cannot break it,
    and ``numTraining``, which the converter passes on and nnU-Net's planner reads."""
    original = json.loads(path.read_text())
    training = original.get("training", [])
    return {"name": original.get("name"), "modality": original.get("modality", original.get("channel_names")),
            "labels": original["labels"], "numTraining": len(training), "training": training, "test": []}


@contextlib.contextmanager
def _msd_converter_writing_to(module, raw_folder: Path) -> Iterator[None]:
    """Points nnU-Net's MSD converter at ``raw_folder`` instead of ``$nnUNet_raw`` for the duration of the block.

    The converter reads both names from its module globals (bound at import). Its own dataset-id check would look at
    the user's real nnU-Net folders, where a dataset being replaced with ``overwrite`` legitimately exists; the
    caller has checked ids against the real folders already.
    """
    saved = module.nnUNet_raw, module.find_candidate_datasets
    module.nnUNet_raw = str(raw_folder)
    module.find_candidate_datasets = lambda dataset_id: []
    try:
        yield
    finally:
        module.nnUNet_raw, module.find_candidate_datasets = saved
