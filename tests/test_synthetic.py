"""Synthetic raw datasets: determinism, nnU-Net validity, spacing, the long-range rule and argument errors."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from rep3d_nnunet.datasets.synthetic import (
    TASKS,
    add_arguments,
    case_rng,
    generate_synthetic_dataset,
    long_range_geometry,
    run_from_args,
    synthesize_case,
)

SMALL = dict(num_training=3, num_test=1, size=(16, 20, 24))


def _read(path: Path) -> tuple[np.ndarray, tuple]:
    """Array (Z, Y, X) and SimpleITK spacing (x, y, z) of one file."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def _cases(folder: Path, split: str = "Tr") -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (C, Z, Y, X), label (Z, Y, X)) per case of a written dataset."""
    channels = len(json.loads((folder / "dataset.json").read_text())["channel_names"])
    result = []
    for label_file in sorted((folder / f"labels{split}").glob("*.nii.gz")):
        case = label_file.name[: -len(".nii.gz")]
        image = np.stack([_read(folder / f"images{split}" / f"{case}_{c:04d}.nii.gz")[0] for c in range(channels)])
        result.append((image, _read(label_file)[0]))
    return result


def _leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", 1, "long_range", seed=3, **SMALL)
    b = generate_synthetic_dataset(tmp_path / "b", 1, "long_range", seed=3, **SMALL)
    c = generate_synthetic_dataset(tmp_path / "c", 1, "long_range", seed=4, **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 2 * (SMALL["num_training"] + SMALL["num_test"])
    for rel in files:
        (xa, sa), (xb, sb) = _read(a / rel), _read(b / rel)
        np.testing.assert_array_equal(xa, xb)
        assert sa == sb
        assert (a / rel).read_bytes() == (b / rel).read_bytes()  # byte-identical, not just equal arrays
    assert any(not np.array_equal(_read(a / rel)[0], _read(c / rel)[0]) for rel in files)


def test_test_cases_do_not_depend_on_num_training():
    first = synthesize_case("local", case_rng(0, 1, 0), (16, 16, 16))
    again = synthesize_case("local", case_rng(0, 1, 0), (16, 16, 16))
    other = synthesize_case("local", case_rng(0, 0, 0), (16, 16, 16))
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


# ---------------------------------------------------------------------------------------------------- validity


def test_valid_nnunet_raw_dataset(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = generate_synthetic_dataset(tmp_path, 7, "local", num_training=4, num_test=2, size=(12, 16, 20),
                                        num_channels=2)
    assert folder == tmp_path / "Dataset007_Rep3DSynthLocal"
    verify_dataset_integrity(str(folder), num_processes=1)  # nnU-Net's own check; raises on any problem

    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "synthetic0", "1": "synthetic1"}
    assert sorted(meta["labels"].values()) == [0, 1, 2] and meta["labels"]["background"] == 0
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz" and meta["numTest"] == 2
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [
        "test_000_0000.nii.gz", "test_000_0001.nii.gz", "test_001_0000.nii.gz", "test_001_0001.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["test_000.nii.gz", "test_001.nii.gz"]
    for image, label in _cases(folder) + _cases(folder, "Ts"):
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1, 2}
        # roughly standardised per channel
        assert np.allclose(image.mean(axis=(1, 2, 3)), 0, atol=1e-3)
        assert np.allclose(image.std(axis=(1, 2, 3)), 1, atol=1e-3)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size", [(8, 8, 8), (24, 24, 24), (12, 32, 32), (40, 9, 11)])
def test_both_classes_in_every_case(task, size):
    for index in range(8):
        _, label = synthesize_case(task, case_rng(0, 0, index), size, (1.0, 1.0, 1.0))
        assert set(np.unique(label)) == {0, 1, 2}, (task, size, index)


def test_anisotropic_spacing_written(tmp_path):
    folder = generate_synthetic_dataset(tmp_path, 2, "long_range", num_training=2, num_test=1, size=(12, 32, 32),
                                        spacing=(3.0, 0.8, 0.8))
    for path in folder.rglob("*.nii.gz"):
        array, spacing = _read(path)
        assert array.shape == (12, 32, 32)
        assert spacing == pytest.approx((0.8, 0.8, 3.0))  # SimpleITK reports (x, y, z)


def test_blob_radii_are_physical():
    """With 3 mm slices and 0.75 mm pixels a round blob spans ~4x more voxels in-plane than through-plane."""
    from scipy import ndimage

    _, label = synthesize_case("local", case_rng(0, 0, 0), (24, 96, 96), (3.0, 0.75, 0.75))
    blobs, count = ndimage.label(label > 0)
    assert count >= 2
    for box in ndimage.find_objects(blobs):
        extents_mm = np.array([(s.stop - s.start) * mm for s, mm in zip(box, (3.0, 0.75, 0.75))])
        assert extents_mm.max() / extents_mm.min() < 2.0, extents_mm  # stretch and rounding, not 4x


# -------------------------------------------------------------------------------------------------- long range


def _marker_rule_holds(image: np.ndarray, label: np.ndarray) -> None:
    """Recovers the marker from the image alone and checks every labelled voxel against the documented rule."""
    channel = image[0]
    rows = channel.shape[1]
    thickness, gap = long_range_geometry(channel.shape)
    top, bottom = channel[:, :thickness], channel[:, rows - thickness:]
    at_top = np.abs(top).mean() > np.abs(bottom).mean()
    marker = top if at_top else bottom
    half = channel.shape[2] // 2
    left_bright = marker[:, :, :half].mean() > 0
    assert (marker[:, :, half:].mean() > 0) != left_bright, "marker halves must have opposite polarity"

    z, y, x = np.nonzero(label)
    distance = y - thickness if at_top else (rows - thickness - 1) - y
    assert distance.min() >= gap == min(20, rows // 2)
    expected = np.where((x < half) == left_bright, 1, 2)
    np.testing.assert_array_equal(label[z, y, x], expected)
    assert not (x == half).any() and not (x == half - 1).any()  # blobs keep off the midline


def test_long_range_rule_on_written_cases(tmp_path):
    folder = generate_synthetic_dataset(tmp_path, 3, "long_range", num_training=8, num_test=2, size=(16, 32, 24))
    cases = _cases(folder) + _cases(folder, "Ts")
    for image, label in cases:
        _marker_rule_holds(image, label)
    # the marker varies: both ends and both polarities occur, so neither position nor side gives the class away
    configurations = set()
    for image, _ in cases:
        top = np.abs(image[0, :, :2]).mean() > np.abs(image[0, :, -2:]).mean()
        marker = image[0, :, :2] if top else image[0, :, -2:]
        configurations.add((bool(top), bool(marker[:, :, :12].mean() > 0)))
    assert len(configurations) >= 3


@pytest.mark.parametrize("size,spacing", [((32, 32, 32), (1.0, 1.0, 1.0)), ((12, 48, 40), (3.0, 0.8, 0.8))])
def test_long_range_rule_in_memory(size, spacing):
    for index in range(6):
        image, label = synthesize_case("long_range", case_rng(1, 0, index), size, spacing, num_channels=2)
        _marker_rule_holds(image, label)


def _class_statistics(task: str) -> np.ndarray:
    """(mean, std) of the image inside class 1 and class 2 blobs over 12 cases: shape (2 classes, 2 stats)."""
    values = {1: [], 2: []}
    for index in range(12):
        image, label = synthesize_case(task, case_rng(0, 0, index), (24, 24, 24))
        for cls in values:
            values[cls].append(image[0][label == cls])
    return np.array([[np.concatenate(v).mean(), np.concatenate(v).std()] for v in values.values()])


def test_long_range_blobs_look_alike_locally():
    stats = _class_statistics("long_range")
    assert np.abs(stats[0] - stats[1]).max() < 0.1, stats
    local = _class_statistics("local")  # the same measure does separate the local task's classes
    assert abs(local[0, 0] - local[1, 0]) > 2.0, local


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,message", [
    (dict(task="global"), "allowed tasks: local, long_range"),
    (dict(size=(7, 32, 32)), "at least 8"),
    (dict(size=(32, 32)), "three entries"),
    (dict(size=(16.5, 16, 16)), "integers"),
    (dict(spacing=(1.0, 0.0, 1.0)), "positive"),
    (dict(spacing=(1.0, float("nan"), 1.0)), "positive"),
    (dict(spacing=(1.0, 1.0)), "three entries"),
    (dict(spacing=(1.0, "a", 1.0)), "spacing"),
    (dict(num_training=0), "num_training"),
    (dict(num_test=-1), "num_test"),
    (dict(num_channels=0), "num_channels"),
    (dict(seed=-1), "seed"),
    (dict(dataset_name="a/b"), "dataset_name"),
])
def test_bad_arguments_raise_and_write_nothing(tmp_path, kwargs, message):
    raw = tmp_path / "raw"
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(raw, 5, **{**SMALL, **kwargs})
    assert not raw.exists()


@pytest.mark.parametrize("dataset_id", [-1, 1000, True, 2.0])
def test_bad_dataset_id(tmp_path, dataset_id):
    with pytest.raises(ValueError, match="dataset_id"):
        generate_synthetic_dataset(tmp_path / "raw", dataset_id, **SMALL)
    assert not (tmp_path / "raw").exists()


def test_existing_dataset_needs_overwrite(tmp_path):
    folder = generate_synthetic_dataset(tmp_path, 4, seed=0, **SMALL)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_synthetic_dataset(tmp_path, 4, seed=1, **SMALL)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path) == []

    (folder / "stale.txt").write_text("from the old dataset")
    assert generate_synthetic_dataset(tmp_path, 4, seed=1, overwrite=True, **SMALL) == folder
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / "dataset.json").read_text())["rep3d_synthetic"]["seed"] == 1
    assert _leftovers(tmp_path) == []


def test_same_id_other_name_is_refused_even_with_overwrite(tmp_path):
    generate_synthetic_dataset(tmp_path, 6, "local", **SMALL)
    with pytest.raises(FileExistsError, match="Dataset006_Rep3DSynthLocal"):
        generate_synthetic_dataset(tmp_path, 6, "long_range", overwrite=True, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset006_Rep3DSynthLocal"]


def test_failure_leaves_no_partial_dataset(tmp_path, monkeypatch):
    import rep3d_nnunet.datasets.synthetic as synthetic

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "_write_dataset_json", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_synthetic_dataset(tmp_path, 8, **SMALL)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------------- CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_arguments(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    args = _parse(["--dataset-id", "9", "--task", "long_range", "--num-training", "2", "--num-test", "0",
                   "--size", "10", "20", "20", "--spacing", "2", "1", "1", "--channels", "2", "--seed", "5",
                   "--name", "Mine"])
    with pytest.raises(ValueError, match="nnUNet_raw is not set.*or pass --raw-dir"):
        run_from_args(args)

    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    folder = run_from_args(args)
    assert folder == tmp_path / "Dataset009_Mine"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and len(meta["channel_names"]) == 2
    assert meta["rep3d_synthetic"] == {"task": "long_range", "seed": 5, "size_zyx": [10, 20, 20],
                                       "spacing_zyx": [2.0, 1.0, 1.0], "generator_version": 1}
    assert _read(folder / "imagesTr" / "case_000_0001.nii.gz")[1] == pytest.approx((1.0, 1.0, 2.0))

    with pytest.raises(FileExistsError):
        run_from_args(args)
    other = _parse(["-d", "9", "--name", "Mine", "--overwrite", "--raw-dir", str(tmp_path / "elsewhere"),
                    "--size", "8", "8", "8", "--num-training", "1"])
    assert run_from_args(other) == tmp_path / "elsewhere" / "Dataset009_Mine"
