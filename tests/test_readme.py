"""The README's "Train Rep3D on your own nnU-Net dataset" commands, run as written, in one shell, on the cases that
ship with the package: they cannot rot. Three substitutions only: the placeholder dataset folder ``Dataset501_X`` is the
converted Hippocampus copy (``Dataset501_Hippocampus``), ``nnUNetTrainerRep3D`` gets nnU-Net's schedule suffix
``_1epoch_5iterations`` (a CPU cannot train 1,000 epochs in a test), and nnU-Net's training and prediction get
``-device cpu`` (their default is CUDA). The export's predictions must equal the trained folder's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from rep3d_nnunet.datasets.hippocampus import SUBSET, move_held_out_cases
from tests.helpers import run

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- the five commands below are run as written by tests/test_readme.py"
DATASET_ID, DATASET = 501, "Dataset501_Hippocampus"
SCHEDULE = "_1epoch_5iterations"


def readme_commands() -> list[str]:
    """The shell commands of the README's block after ``MARKER``, continuation lines joined."""
    text = README.read_text()
    block = text[text.index(MARKER):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _on_this_machine(command: str) -> str:
    command = re.split(r"\s+#", command)[0]  # the README's comments
    command = re.sub(r"nnUNetTrainerRep3D(?=\s|__|$)", "nnUNetTrainerRep3D" + SCHEDULE,
                     command.replace("Dataset501_X", DATASET))
    return command + " -device cpu" if command.split()[0] in ("nnUNetv2_train", "nnUNetv2_predict") else command


def test_the_readme_gives_five_commands():
    commands = readme_commands()
    assert len(commands) == 5 and commands[0].startswith('eval "$(rep3d-nnunet env)"')
    assert [c.split()[0] for c in commands[1:]] == ["nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "rep3d-nnunet",
                                                    "nnUNetv2_predict"]


def test_the_readme_commands_train_export_and_predict(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}  # the first command sets it
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(tmp_path / name)
        (tmp_path / name).mkdir()
    env.update({"nnUNet_def_n_proc": "1", "nnUNet_compile": "false", "nnUNet_n_proc_DA": "1",
                "OMP_WAIT_POLICY": "PASSIVE", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    run(["nnUNetv2_convert_MSD_dataset", "-i", str(SUBSET), "-overwrite_id", str(DATASET_ID), "-np", "1"], env)
    raw = Path(env["nnUNet_raw"]) / DATASET
    held_out = move_held_out_cases(raw, every=13)
    script = "\n".join(["set -euo pipefail", *(_on_this_machine(command) for command in readme_commands())])
    result = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, f"{script}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"

    trainer = "nnUNetTrainerRep3D" + SCHEDULE
    assert (Path(env["nnUNet_results"]) / DATASET / f"{trainer}__nnUNetPlans_folded__3d_fullres").is_dir()
    # the trained folder predicts the same segmentations as its export
    registered = {**env, "nnUNet_extTrainer": subprocess.run(
        [str(Path(sys.executable).parent / "rep3d-nnunet"), "env"], env=env, capture_output=True,
        text=True).stdout.split("export nnUNet_extTrainer=")[1].split()[0]}
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "trained"), "-d", str(DATASET_ID),
         "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], registered)
    for case in held_out:
        exported = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "predictions" / f"{case}.nii.gz")))
        trained = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "trained" / f"{case}.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / f"{case}.nii.gz")))
        assert exported.shape == label.shape and set(np.unique(exported)) <= {0, 1, 2}
        np.testing.assert_array_equal(exported, trained)
