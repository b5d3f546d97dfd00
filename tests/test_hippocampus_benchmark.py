"""benchmarks/hippocampus.py without training: a --data folder that is not MSD Task04, or a schedule that does not fit,
is refused with one line and exit code 2 before anything is written; a download without imagesTs/ is staged for
nnU-Net's MSD converter; the report's tables (probes, the best control per fold, plateau, equal training time); a
stopped run keeps its records and is resumed only with the same budget and recipe."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rep3d_nnunet import compare, compare_report

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
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def _rows(module, means: dict, iteration: int = 50) -> list[dict]:
    """CSV rows from {(trainer, fold): mean Dice}; trainers whose name starts with "nnU-Net" are controls."""
    common = {"epoch": str(iteration // 25), "iteration": str(iteration), "train_loss": "0",
              "seconds_per_iteration": "1.0", "seconds_per_case": "0.5", "validation_cases": "40", "batch_size": "2",
              "features": "8-16-32-64", "mirroring": "False", "device": "cpu", "trainer_class": "x",
              "max_iterations": "100"}
    return [{**common, "fold": fold, "trainer": trainer, "dice_anterior": str(mean), "dice_posterior": str(mean),
             "mean_dice": str(mean), "control": str(trainer.startswith("nnU-Net"))}
            for (trainer, fold), mean in means.items()]


def test_tables_only_average_folds_that_every_contender_has_at_that_probe():
    module = _load_script()
    rows = _rows(module, {("A", "0"): 0.3, ("B", "0"): 0.7, ("A", "1"): 0.9}, 50)
    rows += _rows(module, {("A", "0"): 0.4, ("B", "0"): 0.8, ("A", "1"): 0.95, ("B", "1"): 0.85}, 100)
    assert compare_report.complete_folds(rows, 50) == [0] and compare_report.complete_folds(rows, 100) == [0, 1]
    table = module.summary_table(rows)
    assert "| trainer | 50 it (1 fold) | 100 it (2 folds) |" in table
    assert "| A | 0.300 | 0.675 ± 0.275 |" in table  # fold 1 at 50 iterations left out: B lacks it


def test_contenders_are_compared_with_the_best_control_fold_by_fold():
    module = _load_script()
    means = {("nnU-Net SGD", "0"): 0.10, ("nnU-Net AdamW", "0"): 0.20, ("nnU-Net SGD", "1"): 0.40,
             ("nnU-Net AdamW", "1"): 0.30, ("Rep3D", "0"): 0.25, ("Rep3D", "1"): 0.37}
    table = module.summary_table(_rows(module, means))
    # fold 0: 0.25 - 0.20 (AdamW the better control), fold 1: 0.37 - 0.40 (SGD the better one)
    assert "| Rep3D | +0.010 (1/2) |" in table
    assert "| nnU-Net SGD | +" not in table  # controls are not compared with themselves


def test_plateau_is_the_best_controls_gain_per_doubling():
    module = _load_script()
    rows = _rows(module, {("nnU-Net A", "0"): 0.50, ("Rep3D", "0"): 0.1}, 100)
    rows += _rows(module, {("nnU-Net A", "0"): 0.505, ("Rep3D", "0"): 0.2}, 200)
    rows += _rows(module, {("nnU-Net A", "0"): 0.9, ("Rep3D", "0"): 0.3}, 300)  # not a doubling: no gain line
    assert compare_report.plateau_lines(rows)[1] == "- fold 0: best control's gain per doubling: 100 -> 200: +0.005"


def test_dice_at_equal_training_time_uses_the_measured_step_times():
    module = _load_script()
    rows = []
    for iteration, (control, rep3d) in {100: (0.2, 0.4), 200: (0.5, 0.6), 400: (0.7, 0.65)}.items():
        rows += _rows(module, {("nnU-Net A", "0"): control, ("Rep3D", "0"): rep3d}, iteration)
    speed = [{"trainer": "nnU-Net A", "seconds_per_iteration": "0.5", "steps": "8", "batch_size": "2",
              "device": "cpu"}, {"trainer": "Rep3D", "seconds_per_iteration": "1.0", "steps": "8",
                                 "batch_size": "2", "device": "cpu"}]
    table = "\n".join(compare_report.speed_table(rows, speed))
    assert "| Rep3D | 1.000 | 2.00x |" in table
    # the control's probes take 50, 100 and 200 s; Rep3D reaches 100 iterations in 100 s, 200 in 200 s
    assert "| Rep3D | - | 0.400 (100 it) | 0.600 (200 it) |" in table
    assert compare_report.speed_table(rows, []) == ["Speed: not measured (run with --speed-iterations N).\n"]


@pytest.mark.parametrize("flags, phrase", [
    (["--max-iterations", "120", "--iterations", "50"], "must be a multiple of --iterations"),
    (["--probes", "75"], "are not multiples of --iterations"),
    (["--stop-at", "300"], "is not one of the probes"),
    (["--only", "nobody"], "matched no contender"),
])
def test_a_schedule_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, flags, phrase):
    output = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(output), *flags], capture_output=True,
                            text=True)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hippocampus.py: ") and phrase in lines[0], result.stderr
    assert not output.exists()


def test_a_run_cut_off_mid_record_keeps_its_complete_probes(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps({"iteration": 100, "mean_dice": 0.5}) + "\n" + '{"iteration": 200, "mea')
    assert compare.read_records(path) == [{"iteration": 100, "mean_dice": 0.5}]
    assert compare.read_records(tmp_path / "absent.jsonl") == []


def test_a_run_of_another_budget_or_recipe_is_not_resumed(tmp_path, monkeypatch):
    """A run folder whose budget.json differs (another schedule, plan or trainer recipe, e.g. after the default
    trainer changed) is refused with the fix, before any training: resuming it would mix two runs in one curve."""
    module = _load_script()
    preprocessed, results = tmp_path / "preprocessed", tmp_path / "results"
    folder = "Dataset004_Hippocampus"
    (preprocessed / folder).mkdir(parents=True)
    plans = {"configurations": {"3d_fullres": {"batch_size": 2, "architecture": {"arch_kwargs": {
        "features_per_stage": [8, 16]}}}}}
    entry = module.CONTENDERS[2]  # the Rep3D default trainer
    (preprocessed / folder / f"{compare.plans_name(entry)}.json").write_text(json.dumps(plans))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    monkeypatch.setenv("nnUNet_results", str(results))
    args = module.parse_args(["--max-iterations", "100", "--iterations", "50", "--probes", "50", "100"])
    run = compare.run_folder(folder, entry, 0)
    run.mkdir(parents=True)
    (run / "budget.json").write_text(json.dumps({"max_iterations": 100, "recipe": "an older default"}))
    with pytest.raises(compare.BadInput, match="another budget or recipe"):
        compare.run_job(entry, folder, 0, args)


def test_the_slices_figure_skips_folds_whose_predictions_are_gone(tmp_path):
    """A resumed benchmark whose nnU-Net tree was rebuilt has CSV rows for folds without predictions on disk: the
    figure is drawn from a fold that has them, or not at all, and never stops the report."""
    module = _load_script()
    rows = [{"fold": "0", "trainer": entry.label, "trainer_class": compare.class_name(entry), "epoch": "2"}
            for entry in module.CONTENDERS]
    assert module.slices_figure(rows, tmp_path / "results", tmp_path / "raw", tmp_path / "slices.png") is False
    assert not (tmp_path / "slices.png").exists()
