"""benchmarks/hippocampus.py without training: a --data folder that is not MSD Task04 is refused with one line and
exit code 2 before anything is written, and a download without imagesTs/ is staged for nnU-Net's MSD converter."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hippocampus.py"
TASK04_JSON = {"name": "Hippocampus", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior",
                                                                          "2": "Posterior"},
               "training": [{"image": "./imagesTr/hippocampus_001.nii.gz",
                             "label": "./labelsTr/hippocampus_001.nii.gz"}]}


def _task04(root: Path, dataset_json: dict = TASK04_JSON, name: str = "Task04_Hippocampus") -> Path:
    folder = root / name
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "hippocampus_001.nii.gz").write_bytes(b"")
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return folder


def _refused(tmp_path: Path, data: Path, phrase: str) -> None:
    output = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--output", str(output)],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hippocampus.py: --data ") and phrase in lines[0], result.stderr
    assert "MSD release layout" in lines[0]  # the fix
    assert not output.exists()


@pytest.mark.parametrize("make, phrase", [
    (lambda root: root / "absent", "is not a folder"),
    (lambda root: root, "start with 'Task'"),
    (lambda root: _task04(root, {**TASK04_JSON, "labels": {"0": "background", "1": "liver"}}), "labels 0, 1"),
    (lambda root: _task04(root, {**TASK04_JSON, "training": [{"image": "./imagesTr/x.nii.gz"}]}), "are missing"),
])
def test_a_folder_that_is_not_msd_task04_is_refused(tmp_path, make, phrase):
    root = tmp_path / "data"
    root.mkdir()
    _refused(tmp_path, make(root), phrase)


def test_a_folder_without_labels_is_refused(tmp_path):
    folder = _task04(tmp_path)
    for path in (folder / "labelsTr").iterdir():
        path.unlink()
    (folder / "labelsTr").rmdir()
    _refused(tmp_path, folder, "lacks labelsTr")


def test_a_download_without_imagesTs_is_staged_for_the_converter(tmp_path):
    from rep3d_nnunet.datasets.hippocampus import converter_input

    module = _load_script()
    folder = _task04(tmp_path / "download")
    module.check_msd_task04(folder)
    staged = converter_input(folder, tmp_path / "staging")  # what the benchmark hands nnU-Net's converter
    assert staged.name == "Task04_Hippocampus" and (staged / "imagesTs").is_dir()
    assert (staged / "imagesTr" / "hippocampus_001.nii.gz").is_file()
    staged_json = json.loads((staged / "dataset.json").read_text())  # nnU-Net 2.8's planner reads numTraining
    assert staged_json["numTraining"] == len(staged_json["training"]) == len(list((folder / "labelsTr").iterdir()))
    every_second = json.loads((converter_input(folder, tmp_path / "half", every=2) / "dataset.json").read_text())
    assert every_second["numTraining"] == len(every_second["training"]) == (staged_json["numTraining"] + 1) // 2
    assert not (folder / "imagesTs").exists()  # the user's folder is left as it was


def _load_script():
    spec = importlib.util.spec_from_file_location("hippocampus_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tables_only_average_folds_that_every_contender_finished():
    module = _load_script()
    common = {"epoch": "2", "iteration": "50", "train_loss": "0", "seconds_per_iteration": "1.0",
              "seconds_per_case": "0.5", "validation_cases": "40", "batch_size": "2", "features": "8-16-32-64",
              "mirroring": "False", "device": "cpu", "trainer_class": "x"}
    def row(fold, trainer, anterior, posterior):
        return {**common, "fold": fold, "trainer": trainer, "dice_anterior": anterior, "dice_posterior": posterior,
                "mean_dice": str((float(anterior) + float(posterior)) / 2)}

    rows = [row("0", "A", "0.2", "0.4"), row("0", "B", "0.6", "0.8"), row("1", "A", "0.9", "0.9")]
    kept, note = module.complete_folds(rows)
    assert [(r["fold"], r["trainer"]) for r in kept] == [("0", "A"), ("0", "B")]
    assert note == "Left out of the tables and plots, unfinished: fold 1 (1 of 2 contenders done).\n"
    table = module.summary_table(kept)
    assert "| A | 1 | 0.200 | 0.400 | 0.300 |" in table
    assert "| B | 1.00 | 0.50 |" in table


def test_contenders_are_compared_with_the_reference_fold_by_fold():
    module = _load_script()
    reference = module.PAIRED_REFERENCE
    common = {"epoch": "2", "iteration": "50", "train_loss": "0", "seconds_per_iteration": "1.0",
              "seconds_per_case": "0.5", "validation_cases": "40", "batch_size": "2", "features": "8-16-32-64",
              "mirroring": "False", "device": "cpu", "trainer_class": "x", "dice_anterior": "0",
              "dice_posterior": "0"}
    means = {(reference, "0"): 0.10, (reference, "1"): 0.30, ("A", "0"): 0.15, ("A", "1"): 0.25}
    rows = [{**common, "fold": fold, "trainer": trainer, "mean_dice": str(mean)}
            for (trainer, fold), mean in means.items()]
    table = module.summary_table(rows)
    assert f"**mean Dice minus {reference} on the same fold, after 50 iterations**" in table
    assert "| A | +0.050 | -0.050 | +0.000 | 1 of 2 folds |" in table
    assert "minus" not in module.summary_table([r for r in rows if r["fold"] == "0"])  # one fold: nothing to pair


def test_the_slices_figure_skips_folds_whose_predictions_are_gone(tmp_path):
    """A resumed benchmark whose nnU-Net tree was rebuilt has CSV rows for folds without predictions on disk: the
    figure is drawn from a fold that has them, or not at all, and never stops the report."""
    module = _load_script()
    rows = [{"fold": "0", "trainer": contender.label, "trainer_class": "nnUNetTrainerBench", "epoch": "2"}
            for contender in module.CONTENDERS]
    assert module.slices_figure(rows, tmp_path / "results", tmp_path / "raw", tmp_path / "slices.png") is False
    assert not (tmp_path / "slices.png").exists()
