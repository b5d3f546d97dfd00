"""Model-folder export and the rep3d-nnunet commands: clear errors, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rep3d_nnunet.cli import main
from rep3d_nnunet.environment import (
    check_worker_processes,
    diagnose,
    export_lines,
    report,
    sync_external_trainer_module,
    trainer_folder,
)
from rep3d_nnunet.export import export_model_folder


def _model_folder_without_checkpoints(tmp_path):
    folder = tmp_path / "nnUNetTrainerRep3D__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    (folder / "plans.json").write_text(json.dumps({"configurations": {}}))
    return folder


def test_export_of_a_folder_without_checkpoints_says_so_and_writes_nothing(tmp_path, capsys):
    folder = _model_folder_without_checkpoints(tmp_path)
    output = tmp_path / "exported"
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        export_model_folder(folder, output)
    assert not output.exists()
    assert main(["export", str(folder), "-o", str(output)]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_export_of_something_that_is_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an nnU-Net model folder"):
        export_model_folder(tmp_path, tmp_path.parent / "out")


def test_export_never_overwrites_an_existing_folder(tmp_path):
    folder = _model_folder_without_checkpoints(tmp_path)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"not read")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists"):
        export_model_folder(folder, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_env_prints_the_line_that_registers_our_trainers():
    line = export_lines({"nnUNet_extTrainer": "/other/trainers"})[0]
    assert line == f"export nnUNet_extTrainer={trainer_folder()}{os.pathsep}/other/trainers"
    assert (trainer_folder() / "nnUNetTrainerRep3D.py").is_file()


def test_env_imports_neither_nnunet_nor_torch():
    """``eval "$(rep3d-nnunet env)"`` runs in shell start-up files: it must not pay for importing nnU-Net."""
    code = ("import sys; from rep3d_nnunet.cli import main; main(['env']); "
            "heavy = sorted(m for m in ('nnunetv2', 'torch') if m in sys.modules); print('imported:', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "nnUNet_extTrainer=" in result.stdout
    assert "imported: []" in result.stdout


def test_doctor_names_each_problem_and_its_fix(tmp_path):
    text, status = report(diagnose({}))
    assert status == 1
    assert "nnUNet_raw is not set" in text and "nnUNet_extTrainer does not list" in text
    assert "fix: eval \"$(rep3d-nnunet env)\"" in text

    environ = {name: str(tmp_path) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    environ["nnUNet_extTrainer"] = str(trainer_folder())
    sync_external_trainer_module()  # with the line above: eval "$(rep3d-nnunet env)" (a module on nnU-Net < 2.8)
    findings = diagnose(environ)
    assert all(f.ok or not f.blocking for f in findings), report(findings)[0]
    assert any("finds nnUNetTrainerRep3D" in f.what for f in findings)


def test_doctor_warns_when_nnunets_worker_pools_exceed_the_cores():
    unset = check_worker_processes({}, cores=2)
    assert not unset.ok and not unset.blocking and unset.fix == "export nnUNet_def_n_proc=2"
    assert "not set" in unset.what and "8 worker processes" in unset.what
    assert check_worker_processes({"nnUNet_def_n_proc": "2"}, cores=2).ok
    assert not check_worker_processes({"nnUNet_def_n_proc": "16"}, cores=4).ok


def _fold_with(monkeypatch, change) -> None:
    """Every kernel folds, then ``change(conv)`` alters what was written (a fold bug, as the export must see it)."""
    import torch

    from rep3d_nnunet.blocks import ModulatedDepthwiseConv

    original = ModulatedDepthwiseConv.reparameterize

    @torch.no_grad()
    def changed(self):
        original(self)
        change(self)

    monkeypatch.setattr(ModulatedDepthwiseConv, "reparameterize", changed)


def _outer_taps_moved(conv) -> None:
    import torch

    ring = torch.ones_like(conv.weight, dtype=torch.bool)
    ring[(slice(None), slice(None)) + tuple(slice(1, k - 1) if k > 1 else slice(None) for k in conv.kernel_size)] \
        = False
    conv.weight[ring] += 1.0


def test_export_checks_every_kernel_tap_against_the_training_forward(tmp_path, monkeypatch):
    """A fold that got the outermost taps of the large kernels wrong is caught twice: by the per-kernel check against
    W * M from the checkpoint, and by the logits at the full patch size (its input used to be two total strides wide,
    where those taps never touch the input), which report what they are (relative L2)."""
    from rep3d_nnunet import export
    from rep3d_nnunet.model_folder import ModelFolderError
    from tests.helpers import write_model_folder

    folder = write_model_folder(tmp_path, "nnUNetTrainerRep3D")
    _fold_with(monkeypatch, _outer_taps_moved)
    output = tmp_path / "exported"
    with pytest.raises(ModelFolderError, match=r"changed the kernel of encoder\.stages\.\d+\.\d+\.conv by .* "
                                               r"\(relative L2 against W \* M from the checkpoint\)"):
        export_model_folder(folder, output)
    assert not output.exists()
    monkeypatch.setattr(export, "kernel_differences", lambda deployed, expected: {name: 0.0 for name in expected})
    with pytest.raises(ModelFolderError, match=r"changed the logits by .* \(relative L2\)"):
        export_model_folder(folder, output)
    assert not output.exists()


@pytest.mark.parametrize("change", ["zeroed", "perturbed", "bias"])
def test_export_refuses_wrong_kernels_that_the_logits_cannot_see(tmp_path, monkeypatch, change):
    """Issue 30.6: with the residual blocks' layer scale at 0 (where the default network starts), a block passes its
    input through whatever its kernel is, so a logit check passes a fold that zeroed every kernel at 0.0 difference.
    The per-kernel check refuses it, and a 1e-3 perturbation, and a wrong bias."""
    import torch

    from rep3d_nnunet.model_folder import ModelFolderError
    from tests.helpers import write_model_folder

    folder = write_model_folder(tmp_path, "nnUNetTrainerRep3D")
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    scales = [k for k in checkpoint["network_weights"] if k.endswith("layer_scale")]
    assert scales, "the default network has residual Rep3D blocks"
    for key in scales:
        checkpoint["network_weights"][key].zero_()
    torch.save(checkpoint, path)
    changes = {"zeroed": lambda conv: conv.weight.zero_(),
               "perturbed": lambda conv: conv.weight.mul_(1 + 1e-3),
               "bias": lambda conv: conv.bias.add_(1e-3 * conv.bias.norm() + 1e-3)}
    _fold_with(monkeypatch, changes[change])
    output = tmp_path / "exported"
    with pytest.raises(ModelFolderError, match="changed the kernel of .* against W \\* M from the checkpoint"):
        export_model_folder(folder, output)
    assert not output.exists()


def test_export_reports_both_checks(tmp_path):
    from tests.helpers import write_model_folder

    folder = write_model_folder(tmp_path, "nnUNetTrainerRep3D")
    (report,) = export_model_folder(folder, tmp_path / "exported")
    assert report.kernels_checked > 0 and report.max_relative_kernel_difference <= 1e-5
    assert report.relative_logit_difference <= 1e-4
