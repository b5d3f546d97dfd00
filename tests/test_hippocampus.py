"""Real anatomy: the 25 MSD Task04 Hippocampus cases that ship with the package, through nnU-Net's own commands.

nnUNetv2_convert_MSD_dataset, then the README's "Train Rep3D on your own nnU-Net dataset" commands as written, in one
shell (they cannot rot): nnU-Net's planning, nnUNetTrainerRep3D, rep3d-nnunet export, nnUNetv2_predict from the
exported folder, whose segmentations must equal the trained folder's. Three substitutions only: the placeholder
dataset folder ``Dataset501_X`` is the converted copy (``Dataset501_Hippocampus``), ``nnUNetTrainerRep3D`` gets
nnU-Net's schedule suffix ``_1epoch_5iterations`` (a CPU cannot train 1,000 epochs in a test), and nnU-Net's training
and prediction get ``-device cpu`` (their default is CUDA); between planning and training the test writes a split
whose fold 0 validates on one case (nnU-Net's end-of-training validation only costs time here). On the same dataset:
rep3d-nnunet plan (reduced features) on the real fingerprint, and DKA fine-tuning (-pretrained_weights) of a tiny
nnUNetTrainer's checkpoint with prediction of the held-out cases.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from rep3d_nnunet.datasets.hippocampus import SUBSET, move_held_out_cases
from tests.helpers import (
    TINY_DKA_TRAINER,
    TINY_PLAIN_TRAINER,
    nnunet_environment,
    run,
    training_environment,
    write_tiny_trainer,
)

DATASET_ID = 501  # the README's placeholder id
DATASET = f"Dataset{DATASET_ID:03d}_Hippocampus"
README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- the five commands below are run as written by tests/test_hippocampus.py"
SCHEDULE = "_1epoch_5iterations"
REP3D_PLANS = "Rep3DPlans"
PLAIN_PLANS = "nnUNetPlans_small"  # nnU-Net's plan with the same reduced features, for the plain source network
BASE_FEATURES, MAX_FEATURES = 4, 16


def _write_small_plain_plans(preprocessed: Path) -> None:
    """nnU-Net's plan with features 4-16 (the tests' CPU budget); topology, patch and preprocessing unchanged."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLAIN_PLANS
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [min(MAX_FEATURES, BASE_FEATURES * 2 ** i)
                                    for i in range(len(kwargs["features_per_stage"]))]
    (preprocessed / f"{PLAIN_PLANS}.json").write_text(json.dumps(plans, indent=2))


def readme_commands() -> list[str]:
    """The shell commands of the README's block after ``MARKER``, continuation lines joined, comments dropped."""
    text = README.read_text()
    block = text[text.index(MARKER):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [re.split(r"\s+#", line.strip())[0] for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _on_this_machine(command: str) -> str:
    command = re.sub(r"nnUNetTrainerRep3D(?=\s|__|$)", "nnUNetTrainerRep3D" + SCHEDULE,
                     command.replace("Dataset501_X", DATASET))
    return command + " -device cpu" if command.split()[0] in ("nnUNetv2_train", "nnUNetv2_predict") else command


def _shell(commands: list[str], env: dict, cwd: Path) -> None:
    script = "\n".join(["set -euo pipefail", *commands])
    result = subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{script}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    """Converted, then the README's commands (planned, trained, exported, predicted); then the Rep3D planner and fold 0
    of a tiny nnUNetTrainer on reduced features. Two cases are held out (imagesTs/labelsTs)."""
    root = tmp_path_factory.mktemp("hippocampus")
    env = nnunet_environment(root, write_tiny_trainer(root / "test_trainers"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the README's commands, this environment
    run(["nnUNetv2_convert_MSD_dataset", "-i", str(SUBSET), "-overwrite_id", str(DATASET_ID), "-np", "1"], env)
    raw = Path(env["nnUNet_raw"]) / DATASET
    held_out = move_held_out_cases(raw, every=13)
    commands = [_on_this_machine(command) for command in readme_commands()]
    _shell(commands[:2], env, root)  # rep3d-nnunet env, nnUNetv2_plan_and_preprocess
    preprocessed = Path(env["nnUNet_preprocessed"]) / DATASET
    training = sorted(p.name[:-len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": training[1:], "val": training[:1]}]))
    _shell(commands[:1] + commands[2:], training_environment(env), root)  # env, train, export, predict
    run(["rep3d-nnunet", "plan", "-d", str(DATASET_ID), "-c", "3d_fullres", "--base-features", str(BASE_FEATURES),
         "--max-features", str(MAX_FEATURES), "-np", "1"], env)
    _write_small_plain_plans(preprocessed)
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TINY_PLAIN_TRAINER, "-p", PLAIN_PLANS,
         "-device", "cpu"], training_environment(env))
    return root, env, raw, held_out


def test_the_readme_gives_five_commands():
    commands = readme_commands()
    assert len(commands) == 5 and commands[0].startswith('eval "$(rep3d-nnunet env)"')
    assert [c.split()[0] for c in commands[1:]] == ["nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "rep3d-nnunet",
                                                    "nnUNetv2_predict"]


def test_the_readme_commands_train_export_and_the_export_predicts_as_the_trained_folder(hippocampus):
    root, env, raw, held_out = hippocampus
    trainer = "nnUNetTrainerRep3D" + SCHEDULE
    assert _model_folder(env, trainer, "nnUNetPlans_folded").is_dir()
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(root / "trained"), "-d", str(DATASET_ID), "-c",
         "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    for case in held_out:
        exported = _segmentation(root / "predictions" / f"{case}.nii.gz")
        assert exported.shape == _segmentation(raw / "labelsTs" / f"{case}.nii.gz").shape
        assert set(np.unique(exported)) <= {0, 1, 2}
        np.testing.assert_array_equal(exported, _segmentation(root / "trained" / f"{case}.nii.gz"))


def _model_folder(env: dict, trainer: str, plans: str) -> Path:
    return Path(env["nnUNet_results"]) / DATASET / f"{trainer}__{plans}__3d_fullres"


def _segmentation(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_shipped_subset_is_an_msd_release_with_its_licence():
    from rep3d_nnunet.datasets.msd import HIPPOCAMPUS, locate_msd

    source = locate_msd(SUBSET, HIPPOCAMPUS)
    assert len(source.cases) == 25
    readme = (SUBSET / "README.md").read_text()
    assert "CC-BY-SA 4.0" in readme and "Vanderbilt University Medical Center" in readme
    assert sum(p.stat().st_size for p in SUBSET.rglob("*.nii.gz")) < 2_000_000


def test_rep3d_planner_on_the_real_fingerprint(hippocampus):
    """On 1 mm MRI crops of about 36 x 50 x 35 voxels the Rep3D plan keeps nnU-Net's spacing, normalisation,
    preprocessed data and patch (the patch covers the median image), and puts 21^3 kernels wherever they fit."""
    root, env, raw, held_out = hippocampus
    preprocessed = Path(env["nnUNet_preprocessed"]) / DATASET
    ours = json.loads((preprocessed / f"{REP3D_PLANS}.json").read_text())["configurations"]["3d_fullres"]
    nnunet = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    assert ours["spacing"] == nnunet["spacing"] == [1.0, 1.0, 1.0]
    assert ours["normalization_schemes"] == nnunet["normalization_schemes"] == ["ZScoreNormalization"]
    assert ours["data_identifier"] == nnunet["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert all(p >= m for p, m in zip(ours["patch_size"], ours["median_image_size_in_voxels"]))
    assert ours["patch_size"] == nnunet["patch_size"]
    assert ours["batch_size"] >= 2
    architecture = ours["architecture"]
    assert architecture["network_class_name"] == "rep3d_nnunet.architecture.Rep3DUNet"
    kwargs = architecture["arch_kwargs"]
    assert kwargs["features_per_stage"][0] == BASE_FEATURES and max(kwargs["features_per_stage"]) == MAX_FEATURES
    total_stride = np.prod(np.array(kwargs["strides"]), axis=0)
    assert all(p % s == 0 for p, s in zip(ours["patch_size"], total_stride))
    # the first stage sees the whole 40 x 56 x 40 patch: the default 21^3 kernel, never shrunk for speed
    assert kwargs["large_kernel_sizes"][0] == [21, 21, 21]


def test_dka_finetunes_a_plain_nnunet_checkpoint_and_predicts(hippocampus):
    """-pretrained_weights from nnUNetTrainer's checkpoint: the plain network stays frozen key by key, adapters are
    added, the head trains; the fine-tuned folder predicts the held-out cases."""
    root, env, raw, held_out = hippocampus
    source = _model_folder(env, TINY_PLAIN_TRAINER, PLAIN_PLANS) / "fold_0" / "checkpoint_final.pth"
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TINY_DKA_TRAINER, "-p", PLAIN_PLANS, "-device",
         "cpu", "-pretrained_weights", str(source)], training_environment(env))
    tuned = _model_folder(env, TINY_DKA_TRAINER, PLAIN_PLANS)
    architecture = json.loads((tuned / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert architecture["dka"] == {"source_trainer": TINY_PLAIN_TRAINER}
    tuned_weights = torch.load(tuned / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    source_weights = torch.load(source, weights_only=False)["network_weights"]
    assert any(".dka_adapter." in k for k in tuned_weights) and set(source_weights) <= set(tuned_weights)
    for key, value in source_weights.items():
        if ".seg_layers." not in key:
            assert torch.equal(tuned_weights[key], value), key
    assert any(not torch.equal(tuned_weights[k], v) for k, v in source_weights.items() if ".seg_layers." in k)
    run(["nnUNetv2_predict_from_modelfolder", "-i", str(raw / "imagesTs"), "-o", str(root / "pred_dka"), "-m",
         str(tuned), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    for identifier in held_out:
        segmentation = _segmentation(root / "pred_dka" / f"{identifier}.nii.gz")
        assert segmentation.shape == _segmentation(raw / "labelsTs" / f"{identifier}.nii.gz").shape


def test_slices_figure_of_a_real_case(tmp_path):
    """The demo's picture: image, ground truth and predictions through the largest cross-sections; a prediction of
    another case (other geometry) is refused by name."""
    from rep3d_nnunet.slices_figure import central_slices, read_array, write_slices_figure

    image, label = SUBSET / "imagesTr" / "hippocampus_001.nii.gz", SUBSET / "labelsTr" / "hippocampus_001.nii.gz"
    labels = read_array(label)
    for axis, index in central_slices(labels):
        area = (np.take(labels, index, axis=axis) > 0).sum()
        assert area == max((np.take(labels, i, axis=axis) > 0).sum() for i in range(labels.shape[axis]))
    png = write_slices_figure(image, label, {"model": label}, tmp_path / "slices.png", {1: "anterior", 2: "posterior"})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="other case"):
        write_slices_figure(image, label, {"other case": SUBSET / "labelsTr" / "hippocampus_020.nii.gz"},
                            tmp_path / "refused.png")
    assert not (tmp_path / "refused.png").exists()
