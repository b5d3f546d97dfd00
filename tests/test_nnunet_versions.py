"""What differs between the supported nnU-Net versions: both call forms of build_network_architecture, the lookup
module for nnU-Net < 2.8, and the one room that finds trainer classes (no low module imports the variant table)."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from rep3d_nnunet import environment, nnunet_compat
from rep3d_nnunet.nnunet_compat import BUILD_INPUTS_KEY, find_trainer_class, nnunet_version, record_build_inputs
from tests.helpers import CONFIGURATIONS, tiny_plans, use_nnunet_tree


def test_trainer_names_resolve_through_the_trainer_folder_and_nnunet():
    assert find_trainer_class("nnUNetTrainer") is nnUNetTrainer
    assert find_trainer_class("nnUNetTrainerRep3D_5epochs").num_epochs_override == 5
    assert find_trainer_class("nnUNetTrainer_250epochs").__module__.startswith("nnunetv2.")
    with pytest.raises(nnunet_compat.TrainerNotFoundError, match="nnUNet_extTrainer"):
        find_trainer_class("nnUNetTrainerNobodyHasThis")


def _shapes(network: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerRep3D", "nnUNetTrainerRep3DCSLA", "nnUNetTrainerDKA"])
def test_the_old_call_form_builds_what_the_new_one_does(trainer_name):
    """nnU-Net 2.6 passes the architecture entry alone; the build inputs recorded in it make up the rest."""
    configuration_name, _ = CONFIGURATIONS[3]
    plans = tiny_plans(3)
    plans["configurations"][configuration_name]["patch_size"] = [8, 32, 32]  # caps the large kernels per stage
    trainer = find_trainer_class(trainer_name)
    new_form = trainer.build_network_architecture(PlansManager(plans), PlansManager(plans).get_configuration(
        configuration_name), 1, 2, enable_deep_supervision=False)
    record_build_inputs(plans, configuration_name)
    recorded = PlansManager(plans).get_configuration(configuration_name)
    assert recorded.network_arch_init_kwargs[BUILD_INPUTS_KEY]["patch_size"] == [8, 32, 32]
    old_form = trainer.build_network_architecture(
        recorded.network_arch_class_name, recorded.network_arch_init_kwargs,
        recorded.network_arch_init_kwargs_req_import, 1, 2, enable_deep_supervision=False)
    assert _shapes(old_form) == _shapes(new_form)
    # the new form ignores the recorded entry, and nnU-Net's own trainer never sees it
    assert _shapes(trainer.build_network_architecture(PlansManager(plans), recorded, 1, 2, False)) == _shapes(new_form)
    nnunet_compat.build_network(nnUNetTrainer, PlansManager(plans), recorded, 1, 2, False)


@pytest.mark.parametrize("call_form", ["new", "old"])
def test_initialize_builds_through_the_trainer_classes_hook_in_either_call_form(tmp_path, monkeypatch, call_form):
    """nnUNetTrainer.initialize calls self.build_network_architecture: from 2.7 with the plans and configuration, on
    2.6 (and for a signature without plans_manager) with the configuration's architecture entry alone. The trainer
    class's own hook builds the network in both, the same network; no instance attribute stands in for it."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    env = {name: str(tmp_path / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    use_nnunet_tree(monkeypatch, {**env, "nnUNet_extTrainer": str(environment.trainer_folder())})
    configuration_name, _ = CONFIGURATIONS[3]
    plans = tiny_plans(3)
    plans["configurations"][configuration_name]["patch_size"] = [8, 32, 32]  # caps the large kernels per stage
    plans["configurations"][configuration_name]["batch_dice"] = False
    data = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"] / f"nnUNetPlans_{configuration_name}"
    data.mkdir(parents=True)
    (data / "case.b2nd").touch()  # initialize infers the dataset class from the files' ending
    if call_form == "old" and nnunet_version() >= (2, 7, 0):
        # what 2.8's initialize does for a signature without plans_manager: 2.6's call
        monkeypatch.setattr(trainer_module, "inspect", SimpleNamespace(signature=lambda f: SimpleNamespace(
            parameters={})))
    dataset = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
               "file_ending": ".nii.gz"}
    trainer_class = find_trainer_class("nnUNetTrainerRep3D")
    trainer = trainer_class({**plans, "continue_training": False}, configuration_name, 0, dataset,
                            torch.device("cpu"))
    assert "build_network_architecture" not in vars(trainer)
    calls = []
    build = trainer_class.build_network_architecture.__func__

    @functools.wraps(build)  # the same signature: nnU-Net chooses the call form by it
    def counted(cls, *args, **kwargs):
        calls.append(args[0])
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "build_network_architecture", classmethod(counted))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 2.8 on the old form
        trainer.initialize()
    assert len(calls) == 1 and isinstance(calls[0], str) == (call_form == "old" or nnunet_version() < (2, 7, 0))
    expected = trainer_class.build_network_architecture(PlansManager(plans), PlansManager(plans).get_configuration(
        configuration_name), 1, 2, enable_deep_supervision=True)
    assert _shapes(trainer.network) == _shapes(expected)


def test_the_old_call_form_without_recorded_inputs_says_what_to_do():
    configuration = PlansManager(tiny_plans(3)).get_configuration(CONFIGURATIONS[3][0])
    with pytest.raises(ValueError, match="patch size and spacing.*rep3d-nnunet export"):
        find_trainer_class("nnUNetTrainerRep3D").build_network_architecture(
            configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
            configuration.network_arch_init_kwargs_req_import, 1, 2, False)


# ---- the lookup module for nnU-Net < 2.8 (written into a temporary folder here, never into the real nnU-Net) ----


@pytest.fixture
def module_path(tmp_path, monkeypatch):
    path = tmp_path / environment.EXTERNAL_TRAINER_MODULE
    monkeypatch.setattr(environment, "external_trainer_module_path", lambda: path)
    return path


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("lookup_module_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lookup_module_is_idempotent_undoable_and_reported(module_path, monkeypatch):
    monkeypatch.setattr(environment, "has_external_trainer_folders", lambda: False)
    assert environment.external_trainer_module_state() == "missing"
    assert not environment._check_external_trainer_module().ok
    assert "wrote" in environment.sync_external_trainer_module()
    assert environment.external_trainer_module_state() == "installed"
    assert environment.sync_external_trainer_module() is None  # idempotent
    assert environment._check_external_trainer_module().ok
    module_path.write_text(module_path.read_text().replace("as nnU-Net 2.8 does", "as an older version said"))
    assert environment.external_trainer_module_state() == "stale"
    assert "stale" in environment._check_external_trainer_module().what
    environment.sync_external_trainer_module()
    assert environment.external_trainer_module_state() == "installed"
    assert environment.remove_external_trainer_module() and not module_path.exists()
    assert not environment.remove_external_trainer_module()

    monkeypatch.setattr(environment, "has_external_trainer_folders", lambda: True)
    assert environment.external_trainer_module_state() == "not needed"
    module_path.write_text(environment.EXTERNAL_TRAINER_MODULE_SOURCE)
    finding = environment._check_external_trainer_module()
    assert environment.external_trainer_module_state() == "leftover" and not finding.ok and not finding.blocking
    assert "removed" in environment.sync_external_trainer_module() and not module_path.exists()


def test_a_file_we_did_not_write_is_left_alone(module_path, monkeypatch):
    monkeypatch.setattr(environment, "has_external_trainer_folders", lambda: False)
    module_path.write_text("# someone else's module\n")
    with pytest.raises(FileExistsError, match="not written by rep3d-nnunet"):
        environment.sync_external_trainer_module()
    assert not environment.remove_external_trainer_module() and module_path.exists()


def test_the_lookup_module_answers_from_the_external_trainer_folders(module_path, monkeypatch):
    module_path.write_text(environment.EXTERNAL_TRAINER_MODULE_SOURCE)
    module = _load(module_path)
    monkeypatch.setenv("nnUNet_extTrainer", str(environment.trainer_folder()))
    assert module.nnUNetTrainerRep3D.__name__ == "nnUNetTrainerRep3D"
    assert not hasattr(module, "nnUNetTrainerNobodyHasThis")
    monkeypatch.delenv("nnUNet_extTrainer")
    assert not hasattr(module, "nnUNetTrainerRep3D")  # as nnU-Net 2.8: only the listed folders
    monkeypatch.setenv("nnUNet_extTrainer", str(environment.trainer_folder()))
    monkeypatch.setitem(sys.modules, "rep3d_nnunet.nnunet_compat", None)  # rep3d-nnunet uninstalled
    assert not hasattr(module, "nnUNetTrainerRep3D")


def test_a_read_only_nnunet_gets_one_line_and_the_fix(module_path, monkeypatch):
    monkeypatch.setattr(environment, "has_external_trainer_folders", lambda: False)

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(environment.os, "replace", refuse)  # as in a site-packages owned by another user
    with pytest.raises(PermissionError, match="cannot write .*Fix: run rep3d-nnunet env once as the owner") as error:
        environment.sync_external_trainer_module()
    assert "\n" not in str(error.value) and not list(module_path.parent.glob(".*.tmp"))


def test_env_and_its_undo_print_shell_lines(module_path, monkeypatch, capsys):
    from rep3d_nnunet.cli import main

    monkeypatch.setattr(environment, "has_external_trainer_folders", lambda: False)
    monkeypatch.setenv("nnUNet_extTrainer", "/other/trainers")
    assert main(["env"]) == 0
    out, err = capsys.readouterr()
    registered = f"{environment.trainer_folder()}{os.pathsep}/other/trainers"
    assert out.strip() == f"export nnUNet_extTrainer={registered}" and "wrote" in err and module_path.is_file()
    monkeypatch.setenv("nnUNet_extTrainer", registered)
    assert main(["env", "--undo"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "export nnUNet_extTrainer=/other/trainers" and "removed" in err
    assert not module_path.exists()


def test_trainers_are_made_when_nnunet_asks_for_them():
    """nnU-Net's own lookup (recursive_find_python_class over the nnUNet_extTrainer folder) finds every name of the
    variant table, a process makes only the classes it asks for, and the same class each time."""
    probe = textwrap.dedent("""
        import sys
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
        from rep3d_nnunet.nnunet_compat import trainer_folder
        from rep3d_nnunet.variants import trainer_names
        first = recursive_find_python_class(str(trainer_folder()), "nnUNetTrainerRep3DFixedPrior_250epochs",
                                            "nnUNet_trainers")
        module = sys.modules["nnUNet_trainers.nnUNetTrainerRep3D"]
        made = sorted(k for k, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__)
        assert made == ["nnUNetTrainerRep3DFixedPrior_250epochs"], made
        again = recursive_find_python_class(str(trainer_folder()), "nnUNetTrainerRep3DFixedPrior_250epochs",
                                            "nnUNet_trainers")
        assert again is first and first.num_epochs_override == 250 and first.rep3d.modulation == "fixed"
        assert recursive_find_python_class(str(trainer_folder()), "nnUNetTrainerRep3D_3epochs", "nnUNet_trainers") \\
            is None
        names = trainer_names()
        assert sorted(module.__all__) == sorted(names) and set(names) <= set(dir(module))
        assert all(isinstance(getattr(module, name), type) for name in names)
        print(len(names))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) == 861  # nnU-Net < 2.8 prints notes on its paths first
    command = str(Path(sys.executable).parent / "rep3d-nnunet")
    listed = subprocess.run([command, "trainers", "--all"], capture_output=True, text=True)
    assert listed.returncode == 0 and len([w for w in listed.stdout.split() if w.startswith("nnUNetTrainer")]) == 861
    assert "(861 trainer names in all" in subprocess.run([command, "trainers"], capture_output=True, text=True).stdout
