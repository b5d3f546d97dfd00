"""rep3d-nnunet compare: does Rep3D pay on my data? Bad input is refused with one line before anything is written; a
budget in seconds becomes each contender's own schedule; the equal-time table reads contenders with different
probes; and on the 25 Hippocampus cases that ship with the package one command plans, trains the four default
contenders (nnU-Net SGD, AdamW, ResEnc M, Rep3D) and prints both tables, and its rerun resumes instead of training."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rep3d_nnunet import compare_report
from rep3d_nnunet.cli import main
from rep3d_nnunet.compare import CONTENDERS, BadInput, plans_name, run_folder, run_job, timed_schedule
from rep3d_nnunet.datasets.hippocampus import SUBSET
from tests.helpers import nnunet_environment, run, training_environment

DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID}_Hippocampus"


def _refused(capsys, argv: list[str], phrase: str) -> None:
    assert main(["compare", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rep3d-nnunet compare: error: ") and phrase in lines[0], lines


def test_bad_input_is_one_line_and_exit_code_2_before_anything_is_written(capsys, tmp_path, monkeypatch):
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(variable, raising=False)
    _refused(capsys, ["-d", "4"], "nnUNet_raw is not set: export nnUNet_raw=")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / variable / "Dataset004_Hippocampus").mkdir(parents=True)
        monkeypatch.setenv(variable, str(tmp_path / variable))
    before = sorted(tmp_path.rglob("*"))
    _refused(capsys, ["-d", "999"], "no dataset 999 in nnUNet_raw")
    _refused(capsys, ["-d", "4", "--contenders", "rep3d", "nobody"], "--contenders 'nobody' is neither")
    _refused(capsys, ["-d", "4", "--max-iterations", "120", "--iterations", "50"], "must be a multiple")
    _refused(capsys, ["-d", "4", "--budget-seconds", "60", "--probes", "50"], "leave out --probes")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_budget_in_seconds_is_each_contenders_own_schedule():
    args = argparse.Namespace(budget_seconds=100.0, iterations=10, max_iterations=None, probes=None)
    fast, slow = timed_schedule(args, 0.5), timed_schedule(args, 1.3)
    assert (fast.max_iterations, fast.probes) == (200, [20, 50, 100, 200])  # 12.5, 25, 50 and 100 s at 0.5 s / step
    assert (slow.max_iterations, slow.probes) == (70, [10, 30, 70])  # 12.5 and 25 s: one epoch
    assert args.max_iterations is None  # the command's own arguments are left as they were


def test_dice_at_equal_time_reads_contenders_with_probes_of_their_own():
    common = {"fold": "0", "epoch": "1", "dice_a": "0", "batch_size": "2", "features": "4-8", "mirroring": "False",
              "device": "cpu"}
    rows = [{**common, "trainer": "nnU-Net", "control": "True", "max_iterations": "200", "iteration": str(i),
             "mean_dice": str(d)} for i, d in ((100, 0.4), (200, 0.6))]
    rows += [{**common, "trainer": "Rep3D", "control": "False", "max_iterations": "80", "iteration": str(i),
              "mean_dice": str(d)} for i, d in ((40, 0.5), (80, 0.7))]
    speed = [{"trainer": "nnU-Net", "seconds_per_iteration": "0.5", "steps": "3", "batch_size": "2", "device": "cpu"},
             {"trainer": "Rep3D", "seconds_per_iteration": "1.25", "steps": "3", "batch_size": "2", "device": "cpu"}]
    table = compare_report.summary_table(rows, speed)
    assert "| Rep3D | 0.500 (40 it) | 0.700 (80 it) |" in table  # 50 s and 100 s, as nnU-Net's 100 and 200
    assert "| Rep3D | 0.500 | 0.700 | - | - |" in table  # per iteration (40, 80, 100, 200): its own probes
    assert "one schedule per contender (80, 200 iterations" in table
    # per class at the end of each schedule; no paired table: at equal iterations the decays differ
    assert "**Dice per class at the end of each contender's schedule** (folds 0)" in table
    assert "| nnU-Net | 0.000 | 0.600 |" in table and "| Rep3D | 0.000 | 0.700 |" in table
    assert "on the same fold and probe" not in table
    # at equal time, paired on the fold: Rep3D's 40 and 80 iterations against nnU-Net's 100 and 200
    assert "| Rep3D | +0.100 (1/1; 40 it) | +0.100 (1/1; 80 it) |" in table


def test_equal_time_pairs_each_fold_with_its_best_control_and_skips_runs_that_did_not_train_that_far():
    common = {"epoch": "1", "dice_a": "0", "batch_size": "2", "features": "4-8", "mirroring": "False",
              "device": "cpu", "max_iterations": "800"}
    dice = {("SGD", 0): {100: 0.0, 200: 0.1, 400: 0.5}, ("SGD", 1): {100: 0.0, 200: 0.2, 400: 0.6},
            ("AdamW", 0): {100: 0.3, 200: 0.5, 400: 0.7}, ("AdamW", 1): {100: 0.2},  # fold 1 stopped at 100
            ("Rep3D", 0): {100: 0.4, 200: 0.65}, ("Rep3D", 1): {100: 0.25, 200: 0.7}}
    rows = [{**common, "trainer": t, "fold": str(f), "control": str(t != "Rep3D"), "iteration": str(i),
             "mean_dice": str(d)} for (t, f), probes in dice.items() for i, d in probes.items()]
    speed = [{"trainer": t, "seconds_per_iteration": str(s), "steps": "3", "batch_size": "2", "device": "cpu"}
             for t, s in (("SGD", 1.0), ("AdamW", 1.0), ("Rep3D", 2.0))]
    table = compare_report.summary_table(rows, speed)
    # 200 s: Rep3D's 100 iterations; fold 0 against AdamW's 0.5, fold 1 against SGD's 0.2 (AdamW's fold 1 has not
    # trained to 200 s: its 100-iteration probe is not its Dice at 200 s). 400 s: Rep3D's 200 against 0.7 and 0.6
    assert "| Rep3D | - | -0.025 (1/2; 100 it) | +0.025 (1/2; 200 it) |" in table, table
    assert compare_report.reached_within(rows, {"AdamW": 1.0}, "AdamW", 1, 400.0) is None
    assert compare_report.reached_within(rows, {"AdamW": 1.0}, "AdamW", 0, 400.0) == (400, 0.7)
    # a last probe short of half the budget is not a run that used it
    assert compare_report.reached_within(rows, {"Rep3D": 2.0}, "Rep3D", 0, 900.0) is None


def test_a_finished_run_of_another_budget_is_refused_not_reported_as_done(tmp_path, monkeypatch):
    """A run that went past this schedule's end on another schedule (e.g. --max-iterations 3200 before, 800 now) has
    probes at the same iterations from another learning-rate decay: refused with the fix, not counted as done."""
    folder = "Dataset501_Hippocampus"
    for variable in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    entry = CONTENDERS["nnunet_sgd"]
    plans = {"configurations": {"3d_fullres": {"batch_size": 2, "architecture": {"arch_kwargs": {
        "features_per_stage": [8, 16]}}}}}
    (tmp_path / "nnUNet_preprocessed" / folder).mkdir(parents=True)
    (tmp_path / "nnUNet_preprocessed" / folder / f"{plans_name(entry)}.json").write_text(json.dumps(plans))
    args = argparse.Namespace(device="cpu", threads=1, jobs=1, iterations=50, max_iterations=100, probes=None,
                              stop_at=None, seed=0, mirroring=False)
    run = run_folder(folder, entry, 0)
    run.mkdir(parents=True)
    (run / "budget.json").write_text(json.dumps({"max_iterations": 3200, "iterations": 50}))
    (run / "probes.jsonl").write_text("".join(json.dumps({"epoch": e, "iteration": 50 * e}) + "\n" for e in (2, 4)))
    with pytest.raises(BadInput, match="holds a run of another budget or recipe"):
        run_job(entry, folder, 0, args)


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    """The shipped cases converted with nnU-Net's MSD converter as dataset 501, nothing planned yet; a split whose
    fold 0 validates on two cases (nnU-Net's validation is most of a tiny run's time)."""
    root = tmp_path_factory.mktemp("compare")
    env = training_environment(nnunet_environment(root))
    run(["nnUNetv2_convert_MSD_dataset", "-i", str(SUBSET), "-overwrite_id", str(DATASET_ID), "-np", "1"], env)
    cases = sorted(p.name[:-len(".nii.gz")] for p in (Path(env["nnUNet_raw"]) / DATASET / "labelsTr").iterdir())
    (Path(env["nnUNet_preprocessed"]) / DATASET).mkdir()
    (Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").write_text(json.dumps(
        [{"train": cases[2:], "val": cases[:2]}]))
    return root, env


def _compare(env: dict, *flags: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rep3d_nnunet.cli", "compare", "-d", str(DATASET_ID), "--device",
                             "cpu", "--feature-divisor", "8", "--batch-size", "2", "--iterations", "2",
                             "--max-iterations", "2", "--folds", "0", *flags],
                            env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_one_command_compares_the_four_default_contenders_and_resumes(hippocampus):
    root, env = hippocampus
    result = _compare(env, "--speed-iterations", "1")
    labels = [entry.label for entry in CONTENDERS.values()]
    assert len(labels) == 4 and "nnU-Net ResEnc M" in labels
    output = Path(env["nnUNet_results"]) / DATASET / "rep3d_compare"
    rows = compare_report.read_rows(output / "compare.csv")
    assert sorted((r["trainer"], r["iteration"]) for r in rows) == sorted((t, "2") for t in labels)
    assert {r["features"] for r in rows if r["trainer"] != "nnU-Net ResEnc M"} == {"4-8-16-32"}  # 32-256 / 8
    assert all(0 <= float(r["dice_anterior"]) <= 1 and r["validation_cases"] == "2" for r in rows)
    for heading in ("**mean Dice (anterior and posterior)", "**Dice at equal training time**"):
        table = result.stdout[result.stdout.index(heading):].split("\n\n")[1]
        assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [f"| {label}" for label in labels]
    assert (output / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "compare.md").read_text() in result.stdout

    # ResEnc M: nnU-Net's residual-encoder preset at the same divisor and batch, on nnU-Net's preprocessed data
    preprocessed = Path(env["nnUNet_preprocessed"]) / DATASET
    resenc = json.loads((preprocessed / "nnUNetResEncUNetMPlans.json").read_text())["configurations"]["3d_fullres"]
    bench = json.loads((preprocessed / "nnUNetResEncUNetMPlans_bench.json").read_text())["configurations"][
        "3d_fullres"]
    assert bench["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert bench["architecture"]["arch_kwargs"]["features_per_stage"] == [
        f // 8 for f in resenc["architecture"]["arch_kwargs"]["features_per_stage"]]
    assert bench["batch_size"] == 2 and bench["data_identifier"] == "nnUNetPlans_3d_fullres"

    again = _compare(env, "--speed-iterations", "0")  # the step times of the first run are kept in speed.csv
    assert again.stdout.count("done up to 2 iterations") == 4 and "Dice at equal training time" in again.stdout
    assert len(compare_report.read_rows(output / "compare.csv")) == len(rows)
