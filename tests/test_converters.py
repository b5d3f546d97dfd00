"""Benchmark converters on miniature fake releases: nnU-Net validity, labels, the paper's splits and layout errors.

Every fake release is written here with the real file names and metadata layout (8^3 volumes), so the tests need
no download.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from rep3d_nnunet.datasets import converters
from rep3d_nnunet.datasets.converters import (
    CONVERTERS,
    SPLITS_FILE,
    add_arguments,
    convert_dataset,
    dataset_split,
    run_from_args,
)

SHAPE = (8, 8, 8)
AMOS_LABEL_NAMES = ["background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver",
                    "stomach", "arota", "postcava", "pancreas", "right adrenal gland", "left adrenal gland",
                    "duodenum", "bladder", "prostate/uterus"]
AMOS_TR_CT = [1, 3, 4, 6, 9, 10, 11, 14, 15, 16, 17, 19]  # 12 labelled CT training cases
AMOS_TR_MRI = [507, 508, 509, 510, 511, 512, 513, 514]
AMOS_VA = [8, 13, 520]
AMOS_TS = [2, 530]
MRI_WITH_BLADDER = 510
KITS_CASES = 12
MSD = {  # converter -> (task folder, dataset.json name, file prefix, MSD label names, converted label names)
    "msd_pancreas": ("Task07_Pancreas", "Pancreas", "pancreas", ["pancreas", "cancer"], ["pancreas", "tumor"]),
    "msd_hepatic_vessel": ("Task08_HepaticVessel", "HepaticVessel", "hepaticvessel", ["Vessel", "Tumour"],
                           ["vessel", "tumor"]),
}
MSD_CASES = [1, 4, 5, 7, 10, 12, 15, 16, 18, 19]


# ---------------------------------------------------------------------------------------------- fake releases


def _write_volume(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.5), direction=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=True)


def _case(path_image: Path, path_label: Path, rng: np.random.Generator, max_label: int, **geometry) -> None:
    _write_volume(path_image, rng.normal(0, 100, SHAPE).astype(np.int16), **geometry)
    label = rng.integers(0, max_label + 1, SHAPE).astype(np.uint8)
    _write_volume(path_label, label, **geometry)


def _entries(ids: list[int], suffix: str) -> list[dict]:
    return [{"image": f"./images{suffix}/amos_{i:04d}.nii.gz", "label": f"./labels{suffix}/amos_{i:04d}.nii.gz"}
            for i in ids]


def make_amos(parent: Path) -> Path:
    """The zip's amos22/ folder with CT and MRI cases in Tr and Va and unlabelled Ts; returns ``parent``."""
    root = parent / "amos22"
    rng = np.random.default_rng(0)
    for suffix, ids in (("Tr", AMOS_TR_CT + AMOS_TR_MRI), ("Va", AMOS_VA)):
        for i in ids:
            name = f"amos_{i:04d}.nii.gz"
            _case(root / f"images{suffix}" / name, root / f"labels{suffix}" / name, rng, 15 if i <= 500 else 13)
    bladder = sitk.ReadImage(str(root / "labelsTr" / f"amos_{MRI_WITH_BLADDER:04d}.nii.gz"))
    array = sitk.GetArrayFromImage(bladder)
    array[0, 0, :3] = [14, 15, 14]
    _write_volume(root / "labelsTr" / f"amos_{MRI_WITH_BLADDER:04d}.nii.gz", array)
    for i in AMOS_TS:
        _write_volume(root / "imagesTs" / f"amos_{i:04d}.nii.gz", np.zeros(SHAPE, np.int16))
    (root / "imagesTr" / "._amos_0001.nii.gz").write_bytes(b"macOS resource fork")
    dataset = {"name": "AMOS", "description": "fake", "tensorImageSize": "3D", "licence": "CC-BY 4.0",
               "release": "1.0", "modality": {"0": "CT"},
               "labels": {str(value): name for value, name in enumerate(AMOS_LABEL_NAMES)},
               "numTraining": len(AMOS_TR_CT + AMOS_TR_MRI), "numValidation": len(AMOS_VA), "numTest": len(AMOS_TS),
               "training": _entries(AMOS_TR_CT + AMOS_TR_MRI, "Tr"), "validation": _entries(AMOS_VA, "Va"),
               "test": [{"image": f"./imagesTs/amos_{i:04d}.nii.gz"} for i in AMOS_TS]}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return parent


# kits21 keeps the slice axis first in the voxel grid: a permuted direction stands for that unusual geometry
KITS_DIRECTION = (0.0, 0.0, -1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 0.0)


def make_kits(parent: Path) -> Path:
    """The kits21 repository root (kits21/data/case_XXXXX/...); returns ``parent``."""
    data = parent / "kits21" / "data"
    rng = np.random.default_rng(1)
    for i in range(KITS_CASES):
        case = data / f"case_{i:05d}"
        _case(case / "imaging.nii.gz", case / "aggregated_MAJ_seg.nii.gz", rng, 3, spacing=(3.0, 0.78, 0.78),
              direction=KITS_DIRECTION)
        (case / "segmentations").mkdir()
    (data / "kits.json").write_text("[]")
    return parent


def make_msd(parent: Path, name: str) -> Path:
    """An extracted MSD task folder (dataset.json, imagesTr, labelsTr, unlabelled imagesTs); returns the folder."""
    folder_name, task, prefix, msd_labels, _ = MSD[name]
    root = parent / folder_name
    rng = np.random.default_rng(2)
    for i in MSD_CASES:
        file = f"{prefix}_{i:03d}.nii.gz"
        _case(root / "imagesTr" / file, root / "labelsTr" / file, rng, 2)
    for i in (2, 3, 6):
        _write_volume(root / "imagesTs" / f"{prefix}_{i:03d}.nii.gz", np.zeros(SHAPE, np.int16))
    (root / "imagesTr" / f"._{prefix}_001.nii.gz").write_bytes(b"x")
    (root / "labelsTr" / f"._{prefix}_001.nii.gz").write_bytes(b"x")
    (root / "dataset.json").write_text(json.dumps({
        "name": task, "description": "fake", "reference": "fake", "licence": "CC-BY-SA 4.0", "release": "1.0",
        "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": msd_labels[0], "2": msd_labels[1]},
        "numTraining": len(MSD_CASES), "numTest": 3,
        "training": [{"image": f"./imagesTr/{prefix}_{i:03d}.nii.gz", "label": f"./labelsTr/{prefix}_{i:03d}.nii.gz"}
                     for i in MSD_CASES],
        "test": [f"./imagesTs/{prefix}_{i:03d}.nii.gz" for i in (2, 3, 6)],
    }))
    return root


@pytest.fixture(scope="module")
def amos_source(tmp_path_factory) -> Path:
    return make_amos(tmp_path_factory.mktemp("amos_download"))


@pytest.fixture(scope="module")
def kits_source(tmp_path_factory) -> Path:
    return make_kits(tmp_path_factory.mktemp("kits_repo"))


# ------------------------------------------------------------------------------------------------------ checks


def _identifiers(folder: Path, with_channel: bool) -> set[str]:
    cut = len("_0000.nii.gz") if with_channel else len(".nii.gz")
    return {p.name[:-cut] for p in folder.glob("*.nii.gz")}


def _check_dataset(folder: Path, labels: dict, channel: str, folds: int, num_test: int,
                   preprocessed: Path | None = None) -> tuple[dict, list[dict]]:
    """nnU-Net's integrity check, labels, and a split that is disjoint, complete and matches the files."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)  # nnU-Net's own check; raises on any problem
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == labels
    assert dataset["channel_names"] == {"0": channel}
    assert dataset["file_ending"] == ".nii.gz"

    train_val = _identifiers(folder / "imagesTr", True)
    test = _identifiers(folder / "imagesTs", True)
    assert _identifiers(folder / "labelsTr", False) == train_val
    assert _identifiers(folder / "labelsTs", False) == test
    assert len(test) == num_test == dataset["numTest"] and not test & train_val  # held out of imagesTr
    assert dataset["numTraining"] == len(train_val)
    assert dataset["rep3d_split"]["folds"] == folds and dataset["rep3d_split"]["test_cases"] == sorted(test)

    splits = json.loads((folder / SPLITS_FILE).read_text())
    assert len(splits) == folds
    for fold in splits:
        assert set(fold) == {"train", "val"}
        assert not set(fold["train"]) & set(fold["val"])
        assert set(fold["train"]) | set(fold["val"]) == train_val
    if folds > 1:  # cross-validation: every case validated exactly once
        validated = [case for fold in splits for case in fold["val"]]
        assert sorted(validated) == sorted(train_val)
    if preprocessed is not None:
        assert json.loads((preprocessed / folder.name / SPLITS_FILE).read_text()) == splits
    return dataset, splits


def _leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir() if p.name.startswith(".")) if raw.exists() else []


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ------------------------------------------------------------------------------------------- split protocol


@pytest.mark.parametrize("name, n, test, train_val", [
    ("amos_ct", 200, 20, [(160, 20)]),
    ("amos_mri", 33, 7, [(22, 4)]),
    ("amos_ct", 300, 30, [(240, 30)]),  # with the validation cases: the paper's ratio
    ("kits21", 300, 30, [(216, 54)] * 5),
    ("msd_pancreas", 282, 30, None),
    ("msd_pancreas", 281, 30, None),  # the MSD release has 281 labelled cases
    ("msd_hepatic_vessel", 303, 31, None),
])
def test_paper_counts(name, n, test, train_val):
    split = dataset_split(name, [f"case_{i:03d}" for i in range(n)], seed=5)
    assert len(split.test) == test
    assert len(split.train_val) == n - test
    if train_val is not None:
        assert [(len(t), len(v)) for t, v in split.folds] == train_val


def test_split_depends_only_on_the_case_set_and_seed():
    ids = [f"case_{i:05d}" for i in range(40)]
    a = dataset_split("kits21", ids, seed=1)
    assert dataset_split("kits21", list(reversed(ids)), seed=1) == a
    assert dataset_split("kits21", ids, seed=2) != a
    assert len(a.folds) == 5 and sorted(v for _, val in a.folds for v in val) == list(a.train_val)


@pytest.mark.parametrize("name, n", [("kits21", 5), ("amos_mri", 2)])
def test_too_few_cases_is_a_clear_error(name, n):
    with pytest.raises(ValueError, match="too few"):
        dataset_split(name, [f"c{i}" for i in range(n)])


# ----------------------------------------------------------------------------------------------------- AMOS


def test_amos_ct(amos_source, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    folder = convert_dataset("amos_ct", amos_source, raw, preprocessed_root=pre)
    assert folder == raw / "Dataset741_AMOS22CT"
    labels = {"background": 0, "spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "esophagus": 5,
              "liver": 6, "stomach": 7, "aorta": 8, "inferior vena cava": 9, "pancreas": 10,
              "right adrenal gland": 11, "left adrenal gland": 12, "duodenum": 13, "bladder": 14,
              "prostate/uterus": 15}
    dataset, splits = _check_dataset(folder, labels, "CT", folds=1, num_test=1, preprocessed=pre)
    assert (len(splits[0]["train"]), len(splits[0]["val"])) == (10, 1)
    cases = _identifiers(folder / "imagesTr", True) | _identifiers(folder / "imagesTs", True)
    assert cases == {f"amos_{i:04d}" for i in AMOS_TR_CT}  # labelled CT training cases only: no MRI, Va or Ts
    assert dataset["rep3d_split"]["seed"] == 0 and dataset["licence"] == "CC-BY 4.0"
    case = sorted(cases)[0]
    part = "Tr" if (folder / "imagesTr" / f"{case}_0000.nii.gz").exists() else "Ts"
    assert (folder / f"images{part}" / f"{case}_0000.nii.gz").read_bytes() == \
        (amos_source / "amos22" / "imagesTr" / f"{case}.nii.gz").read_bytes()  # copied as released
    assert _leftovers(raw) == []


def test_amos_mri_has_13_organs_and_drops_bladder_values(amos_source, tmp_path):
    folder = convert_dataset("amos_mri", amos_source / "amos22", tmp_path, dataset_id=12)
    assert folder.name == "Dataset012_AMOS22MRI"
    dataset, splits = _check_dataset(folder, {**{n: v for n, v in CONVERTERS["amos_ct"].labels.items() if v <= 13}},
                                     "MRI", folds=1, num_test=2)
    assert len(dataset["labels"]) == 14 and "bladder" not in dataset["labels"]
    cases = _identifiers(folder / "imagesTr", True) | _identifiers(folder / "imagesTs", True)
    assert cases == {f"amos_{i:04d}" for i in AMOS_TR_MRI}
    bladder_case = f"amos_{MRI_WITH_BLADDER:04d}"
    assert dataset["rep3d_conversion"]["relabelled_to_background"]["cases"] == [bladder_case]
    written = next(folder.glob(f"labels*/{bladder_case}.nii.gz"))
    original = _read(amos_source / "amos22" / "labelsTr" / f"{bladder_case}.nii.gz")
    np.testing.assert_array_equal(_read(written), np.where(original > 13, 0, original))


def test_amos_include_validation(amos_source, tmp_path):
    folder = convert_dataset("amos_ct", amos_source, tmp_path, include_validation=True)
    cases = _identifiers(folder / "imagesTr", True) | _identifiers(folder / "imagesTs", True)
    assert cases == {f"amos_{i:04d}" for i in AMOS_TR_CT + [8, 13]}  # the MRI validation case stays out
    with pytest.raises(ValueError, match="only AMOS"):
        convert_dataset("kits21", amos_source, tmp_path / "other", include_validation=True)


# ----------------------------------------------------------------------------------------------------- KiTS


def test_kits21(kits_source, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    folder = convert_dataset("kits21", kits_source, raw, preprocessed_root=pre)  # repository root: kits21/data
    assert folder == raw / "Dataset743_KiTS21"
    _check_dataset(folder, {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}, "CT", folds=5, num_test=1,
                   preprocessed=pre)
    data = kits_source / "kits21" / "data"
    for written in folder.glob("images*/*.nii.gz"):  # byte for byte: the header carries kits21's geometry
        assert written.read_bytes() == (data / written.name[:10] / "imaging.nii.gz").read_bytes()
    assert sitk.ReadImage(str(written)).GetDirection() == KITS_DIRECTION
    again = convert_dataset("kits21", data, tmp_path / "again")  # the data folder itself works as well
    assert (again / SPLITS_FILE).read_text() == (folder / SPLITS_FILE).read_text()


def test_split_on_disk_is_deterministic_per_seed(kits_source, tmp_path):
    def converted(run: str, seed: int) -> tuple[str, set[str]]:
        folder = convert_dataset("kits21", kits_source, tmp_path / run, seed=seed)
        return (folder / SPLITS_FILE).read_text(), _identifiers(folder / "imagesTs", True)

    first, same, other = converted("a", 3), converted("b", 3), converted("c", 4)
    assert first == same
    assert first[0] != other[0]


# ------------------------------------------------------------------------------------------------------ MSD


@pytest.mark.parametrize("name", list(MSD))
def test_msd_through_nnunets_converter(name, tmp_path):
    from nnunetv2.dataset_conversion import convert_MSD_dataset as msd_module

    before = (msd_module.nnUNet_raw, msd_module.find_candidate_datasets)
    source = make_msd(tmp_path / "download", name)
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    folder = convert_dataset(name, source, raw, preprocessed_root=pre, num_processes=1)
    assert folder == raw / f"Dataset{CONVERTERS[name].default_id}_{CONVERTERS[name].dataset_name}"
    *_, prefix, _, names = MSD[name]
    dataset, _ = _check_dataset(folder, {"background": 0, names[0]: 1, names[1]: 2}, "CT", folds=5, num_test=1,
                                preprocessed=pre)
    cases = _identifiers(folder / "imagesTr", True) | _identifiers(folder / "imagesTs", True)
    assert cases == {f"{prefix}_{i:03d}" for i in MSD_CASES}  # MSD's unlabelled imagesTs and ._ files stay out
    assert dataset["licence"] == "CC-BY-SA 4.0"
    assert (msd_module.nnUNet_raw, msd_module.find_candidate_datasets) == before
    assert _leftovers(raw) == []


def test_msd_accepts_the_parent_folder_and_refuses_the_other_task(tmp_path):
    make_msd(tmp_path / "download", "msd_pancreas")
    hepatic = make_msd(tmp_path / "download", "msd_hepatic_vessel")
    convert_dataset("msd_pancreas", tmp_path / "download", tmp_path / "raw", num_processes=1)
    with pytest.raises(ValueError, match="'HepaticVessel', not 'Pancreas'"):
        convert_dataset("msd_pancreas", hepatic, tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists()


def test_msd_failure_inside_nnunets_converter_leaves_nothing(tmp_path):
    from nnunetv2.dataset_conversion import convert_MSD_dataset as msd_module

    before = (msd_module.nnUNet_raw, msd_module.find_candidate_datasets)
    source = make_msd(tmp_path / "download", "msd_pancreas")
    (source / "imagesTr" / "pancreas_004.nii.gz").write_bytes(b"not a nifti file")
    raw = tmp_path / "raw"
    with pytest.raises(RuntimeError, match="pancreas_004"):  # raised by SimpleITK in nnU-Net's worker process
        convert_dataset("msd_pancreas", source, raw, num_processes=1)
    assert list(raw.iterdir()) == []
    assert (msd_module.nnUNet_raw, msd_module.find_candidate_datasets) == before


# --------------------------------------------------------------------------------------------- layout errors


def test_amos_wrong_layout_names_what_is_missing(amos_source, tmp_path):
    broken = tmp_path / "amos22"
    broken.mkdir()
    (broken / "dataset.json").write_text((amos_source / "amos22" / "dataset.json").read_text())
    raw = tmp_path / "raw"
    with pytest.raises(FileNotFoundError, match=r"amos22/imagesTr not found: expected the AMOS22 release layout"):
        convert_dataset("amos_ct", broken, raw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/dataset.json not found: .*Fix: pass the extracted amos22"):
        convert_dataset("amos_ct", tmp_path / "empty", raw)
    with pytest.raises(FileNotFoundError, match=r"nowhere not found"):
        convert_dataset("amos_ct", tmp_path / "nowhere", raw)
    assert not raw.exists()  # nothing written


def test_amos_incomplete_extraction_is_reported(amos_source, tmp_path):
    copy = tmp_path / "amos22"
    shutil.copytree(amos_source / "amos22", copy)
    (copy / "labelsTr" / "amos_0003.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) in .*imagesTr have no label .*amos_0003"):
        convert_dataset("amos_ct", copy, tmp_path / "raw")
    (copy / "imagesTr" / "amos_0003.nii.gz").unlink()  # consistently missing: only dataset.json can tell
    with pytest.raises(FileNotFoundError, match=r"lists 20 cases under 'training' but 1 of them are not on disk"):
        convert_dataset("amos_ct", copy, tmp_path / "raw")
    labels = json.loads((copy / "dataset.json").read_text())
    labels["labels"]["1"] = "liver"
    (copy / "dataset.json").write_text(json.dumps(labels))
    with pytest.raises(ValueError, match="does not use AMOS22's label numbering"):
        convert_dataset("amos_ct", copy, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_kits_without_images_points_to_get_imaging(kits_source, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(kits_source / "kits21" / "data", data)
    (data / "case_00004" / "imaging.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"case_00004\).*get_imaging.py"):
        convert_dataset("kits21", data, tmp_path / "raw")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no case_XXXXX folder in .*empty"):
        convert_dataset("kits21", tmp_path / "empty", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_msd_wrong_layout_names_what_is_missing(tmp_path):
    source = make_msd(tmp_path, "msd_hepatic_vessel")
    shutil.rmtree(source / "labelsTr")
    with pytest.raises(FileNotFoundError, match=r"Task08_HepaticVessel/labelsTr not found: expected the MSD "
                                                r"Task08_HepaticVessel layout"):
        convert_dataset("msd_hepatic_vessel", source, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_unknown_name_lists_the_converters(tmp_path):
    with pytest.raises(ValueError, match="amos_ct, amos_mri, kits21, msd_pancreas, msd_hepatic_vessel"):
        convert_dataset("amos", tmp_path, tmp_path)


# ------------------------------------------------------------------------------------------- existing targets


def test_existing_target_and_taken_ids_are_refused(kits_source, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    folder = convert_dataset("kits21", kits_source, raw, preprocessed_root=pre, seed=1)
    marker = folder / "dataset.json"
    content = marker.read_text()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        convert_dataset("kits21", kits_source, raw, seed=1)
    assert marker.read_text() == content

    replaced = convert_dataset("kits21", kits_source, raw, preprocessed_root=pre, seed=2, overwrite=True)
    assert replaced == folder and json.loads(marker.read_text())["rep3d_split"]["seed"] == 2
    assert (pre / folder.name / SPLITS_FILE).read_text() == (folder / SPLITS_FILE).read_text()
    assert _leftovers(raw) == []

    (raw / "Dataset750_Other").mkdir()
    with pytest.raises(FileExistsError, match="dataset id 750 is already used by Dataset750_Other"):
        convert_dataset("kits21", kits_source, raw, dataset_id=750)
    (pre / "Dataset751_Other").mkdir()
    with pytest.raises(FileExistsError, match="dataset id 751 is already used by Dataset751_Other"):
        convert_dataset("kits21", kits_source, raw, dataset_id=751, preprocessed_root=pre)
    assert not (raw / "Dataset751_KiTS21").exists()


def test_a_different_split_in_the_preprocessed_folder_is_refused(kits_source, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    convert_dataset("kits21", kits_source, raw, preprocessed_root=pre, seed=1)
    shutil.rmtree(raw)  # the raw dataset is gone but its split was kept with the preprocessed data
    convert_dataset("kits21", kits_source, raw, preprocessed_root=pre, seed=1)  # same split: fine
    shutil.rmtree(raw)
    with pytest.raises(FileExistsError, match="already holds a different split"):
        convert_dataset("kits21", kits_source, raw, preprocessed_root=pre, seed=2)
    assert not raw.exists()


# ---------------------------------------------------------------------------------------------------- CLI glue


def test_cli_arguments_use_the_nnunet_environment(kits_source, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    folder = run_from_args(parser.parse_args(["kits21", str(kits_source), "--dataset-id", "7", "--seed", "3"]))
    assert folder == tmp_path / "raw" / "Dataset007_KiTS21"
    assert (tmp_path / "pre" / "Dataset007_KiTS21" / SPLITS_FILE).is_file()
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(ValueError, match="--raw-dir"):
        run_from_args(parser.parse_args(["kits21", str(kits_source)]))
    with pytest.raises(SystemExit):
        parser.parse_args(["kits19", str(kits_source)])


def test_registry_entries():
    assert list(CONVERTERS) == ["amos_ct", "amos_mri", "kits21", "msd_pancreas", "msd_hepatic_vessel"]
    ids = [c.default_id for c in CONVERTERS.values()]
    assert len(set(ids)) == len(ids)
    assert all(c.description for c in CONVERTERS.values())
    assert converters.get_converter("kits21") is CONVERTERS["kits21"]
