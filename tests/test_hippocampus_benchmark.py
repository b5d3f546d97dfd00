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
    spec = importlib.util.spec_from_file_location("hippocampus_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = _task04(tmp_path / "download")
    module.check_msd_task04(folder)
    staged = module.msd_source(folder, tmp_path / "staging")
    assert staged.name == folder.name and (staged / "imagesTs").is_dir()
    assert (staged / "imagesTr" / "hippocampus_001.nii.gz").is_file()
    assert not (folder / "imagesTs").exists()  # the user's folder is left as it was
    (folder / "imagesTs").mkdir()
    assert module.msd_source(folder, tmp_path / "staging") == folder
