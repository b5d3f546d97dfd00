"""Every mistake a user can make with rep3d-nnunet: one line that names the file or argument and the fix, exit
code 2, nothing half-written. docs/errors.md lists these cases; each row names its test here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rep3d_nnunet.cli import _LIBRARY_COMMANDS, main
from rep3d_nnunet.export import export_model_folder
from tests.helpers import write_model_folder

COMMANDS = ["env", "doctor", "trainers", *_LIBRARY_COMMANDS]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_a_working_help(command):
    result = subprocess.run([sys.executable, "-m", "rep3d_nnunet.cli", command, "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: rep3d-nnunet {command}")


def test_top_level_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "rep3d_nnunet.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and all(command in result.stdout for command in COMMANDS)


def _fails(capsys, argv: list[str], *phrases: str) -> str:
    """Runs ``rep3d-nnunet ARGV`` in this process; asserts exit code 2 and one error line with every phrase."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"rep3d-nnunet {argv[0]}: error: "), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


@pytest.fixture
def results(tmp_path):
    return tmp_path / "results"


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_missing_model_folder(capsys, tmp_path):
    _fails(capsys, ["export", str(tmp_path / "nope")], "does not exist")
    _fails(capsys, ["masks", str(tmp_path / "nope")], "does not exist")


def test_folder_that_is_not_a_model_folder(capsys, tmp_path):
    _fails(capsys, ["erf", str(tmp_path)], "not an nnU-Net model folder", "plans.json")


def test_corrupted_checkpoint(capsys, results, tmp_path):
    folder = write_model_folder(results, "nnUNetTrainerRep3D")
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])  # an interrupted copy
    before = _snapshot(tmp_path)
    for command in ("export", "masks", "erf"):
        _fails(capsys, [command, str(folder), "-o", str(tmp_path / f"out_{command}")],
               str(checkpoint), "truncated or corrupted", "Copy it again")
    assert _snapshot(tmp_path) == before


def test_file_that_is_not_an_nnunet_checkpoint(capsys, results):
    folder = write_model_folder(results, "nnUNetTrainerRep3D")
    torch.save({"state_dict": {}}, folder / "fold_0" / "checkpoint_final.pth")
    _fails(capsys, ["masks", str(folder)], "not an nnU-Net checkpoint", "network_weights")


def test_checkpoint_with_pickled_objects_is_refused(capsys, results):
    folder = write_model_folder(results, "nnUNetTrainerRep3D")
    torch.save({"network_weights": {}, "init_args": {}, "trainer_name": Path("x")},
               folder / "fold_0" / "checkpoint_final.pth")
    _fails(capsys, ["export", str(folder)], "weights-only load refuses")


def test_model_folder_of_a_trainer_without_rep3d_blocks(capsys, results, tmp_path):
    folder = write_model_folder(results, "nnUNetTrainer")
    _fails(capsys, ["export", str(folder), "-o", str(tmp_path / "out")], "not a Rep3D model folder",
           "nothing to fold")
    _fails(capsys, ["masks", str(folder)], "not a Rep3D model folder", "ModulatedDepthwiseConv")
    assert not (tmp_path / "out").exists()


def test_plans_and_checkpoint_that_do_not_belong_together(capsys, results, tmp_path):
    folder = write_model_folder(results, "nnUNetTrainerRep3D")
    plans = json.loads((folder / "plans.json").read_text())
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [2 * f for f in kwargs["features_per_stage"]]
    (folder / "plans.json").write_text(json.dumps(plans))
    _fails(capsys, ["export", str(folder), "-o", str(tmp_path / "out")], "do not fit", "plans and checkpoint do not "
           "belong together")
    plans["configurations"] = {"2d": plans["configurations"]["3d_fullres"]}
    (folder / "plans.json").write_text(json.dumps(plans))
    _fails(capsys, ["masks", str(folder)], "trained on configuration '3d_fullres'", "does not have")
    assert not (tmp_path / "out").exists()


def test_export_output_that_exists_and_an_exported_folder(capsys, results):
    folder = write_model_folder(results, "nnUNetTrainerRep3D")
    existing = results / "existing"
    existing.mkdir()
    _fails(capsys, ["export", str(folder), "-o", str(existing)], "already exists", "never overwrites")
    exported = results / "exported"
    export_model_folder(folder, exported)
    _fails(capsys, ["export", str(exported), "-o", str(results / "again")], "already exported")
    assert sorted(p.name for p in results.iterdir()) == sorted([folder.name, "existing", "exported"])


def test_missing_checkpoint_or_fold(capsys, results, tmp_path):
    folder = write_model_folder(results, "nnUNetTrainerRep3D")
    _fails(capsys, ["masks", str(folder), "--fold", "3"], "no fold_3/checkpoint_final.pth", "--fold")
    _fails(capsys, ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "pred"), "-m", str(folder), "-f", "0", "1"],
           "fold(s) [1]", "fold_0")
    _fails(capsys, ["predict", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "pred"), "-m", str(folder), "-f",
                    "0"], "Input folder", "does not exist")
    assert not (tmp_path / "pred").exists()


def test_unknown_custom_trainer(capsys, results, monkeypatch):
    folder = write_model_folder(results, "nnUNetTrainerRep3D")
    checkpoint_path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerSomeoneElses"
    torch.save(checkpoint, checkpoint_path)
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    _fails(capsys, ["erf", str(folder)], "cannot find the trainer 'nnUNetTrainerSomeoneElses'", "nnUNet_extTrainer")


@pytest.mark.parametrize("command", [["plan", "-d", "999"], ["table", "-d", "999", "-tr", "nnUNetTrainerRep3D"]])
def test_nnunet_folders_not_set(capsys, command, monkeypatch):
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(variable, raising=False)
    _fails(capsys, command, "is not set: export nnUNet_")


def test_dataset_id_that_does_not_exist(capsys, tmp_path, monkeypatch):
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / variable / "Dataset004_Hippocampus").mkdir(parents=True)
        monkeypatch.setenv(variable, str(tmp_path / variable))
    _fails(capsys, ["plan", "-d", "999"], "no dataset 999 in nnUNet_raw", "Dataset004_Hippocampus")
    _fails(capsys, ["table", "-d", "999", "-tr", "nnUNetTrainerRep3D"], "no trained models for dataset 999",
           "Dataset004_Hippocampus")


def test_nnunet_folder_set_to_a_folder_that_does_not_exist(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    _fails(capsys, ["plan", "-d", "4"], f"nnUNet_raw={tmp_path / 'raw'} does not exist", "mkdir -p")


def test_demo_data_that_is_not_msd_task04(capsys, tmp_path, monkeypatch):
    """rep3d-nnunet demo --data: an empty folder, another MSD task, or --data with the synthetic task; nothing is
    written (the working folder is not even created)."""
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "demo"
    _fails(capsys, ["demo", "--data", str(tmp_path / "nope"), "--workdir", str(workdir)], "dataset.json",
           "Task04_Hippocampus")
    other = tmp_path / "Task07_Pancreas"
    (other / "imagesTr").mkdir(parents=True)
    (other / "dataset.json").write_text(json.dumps({"name": "Pancreas", "modality": {"0": "CT"},
                                                    "labels": {"0": "background", "1": "p", "2": "t"}}))
    _fails(capsys, ["demo", "--data", str(other), "--workdir", str(workdir)], "'Pancreas', not 'Hippocampus'")
    _fails(capsys, ["demo", "--task", "long_range", "--data", str(other), "--workdir", str(workdir)],
           "--data is the hippocampus demo's input")
    assert not workdir.exists()
