"""Running nnU-Net's own commands against a throwaway nnU-Net tree, as a user would; model folders without training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from rep3d_nnunet.environment import sync_external_trainer_module, trainer_folder
from rep3d_nnunet.nnunet_compat import nnunet_version
from tests.test_architecture import PLAIN, plain_plan_kwargs

TINY_TRAINER = "nnUNetTrainerRep3DTestTiny"
# nnU-Net's recommended way to add a trainer: a file in a folder listed in nnUNet_extTrainer. Epochs and iterations
# are tiny so that five folds run in minutes on two CPU cores; the network is the real one (k=21, LRBM).
TINY_DKA_TRAINER = "nnUNetTrainerDKATestTiny"
TINY_PLAIN_TRAINER = "nnUNetTrainerTestTiny"  # nnU-Net's default trainer and network, the same tiny schedule
TINY_TRAINER_SOURCE = textwrap.dedent(f'''
    from rep3d_nnunet.finetuning import DKATrainer
    from rep3d_nnunet.training import Rep3DTrainer, ScheduledTrainer


    class {TINY_TRAINER}(Rep3DTrainer):
        num_epochs_override = 2
        iterations_per_epoch_override = 3
        val_iterations_per_epoch_override = 1


    class {TINY_DKA_TRAINER}(DKATrainer):
        num_epochs_override = 2
        iterations_per_epoch_override = 3
        val_iterations_per_epoch_override = 1


    class {TINY_PLAIN_TRAINER}(ScheduledTrainer):
        num_epochs_override = 2
        iterations_per_epoch_override = 3
        val_iterations_per_epoch_override = 1
''')


def nnunet_environment(root: Path, extra_trainer_folder: Path | None = None) -> dict:
    """The README's setup (``eval "$(rep3d-nnunet env)"``) for a throwaway nnU-Net tree: the folders, the trainer
    folders in nnUNet_extTrainer and, on nnU-Net < 2.8, the lookup module that searches them."""
    sync_external_trainer_module()
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(root / name)
        (root / name).mkdir(parents=True, exist_ok=True)
    folders = [str(trainer_folder())] + ([str(extra_trainer_folder)] if extra_trainer_folder else [])
    env["nnUNet_extTrainer"] = os.pathsep.join(folders)
    env.update({"nnUNet_def_n_proc": "1", "nnUNet_compile": "false"})
    # see run_in_pairs: spin-waiting OpenMP threads stall whenever another program holds a core (shared machines)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def use_nnunet_tree(monkeypatch, env: dict) -> None:
    """Points nnU-Net in this process at ``env``'s folders and trainer folders.

    nnU-Net 2.8 reads its folder variables when it uses them; before, ``nnunetv2.paths`` read them once at import and
    each module bound the values with ``from nnunetv2.paths import ...``, so those bindings are patched as well.
    """
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(name, env[name])
    if nnunet_version() < (2, 8, 0):
        for module in [m for name, m in list(sys.modules.items()) if name.split(".")[0] == "nnunetv2" and m]:
            for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
                if name in vars(module):  # a str, or None where the variable was unset at import
                    monkeypatch.setattr(module, name, env[name])


def training_environment(env: dict) -> dict:
    """Augmentation in the training process itself: worker processes only cost time on two cores.

    (Not for planning: nnU-Net's planner passes nnUNet_n_proc_DA to torch.set_num_threads, which rejects 0.)
    """
    return {**env, "nnUNet_n_proc_DA": "0"}


def write_tiny_trainer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_TRAINER}.py"
    path.write_text(TINY_TRAINER_SOURCE)
    return folder


def run_in_pairs(jobs: list[tuple[list[str], dict]]) -> None:
    """Runs (console script, environment) jobs two at a time: on two cores a tiny nnU-Net command is mostly start-up
    and worker spawning, which overlap well. Jobs within a pair must not depend on each other.

    ``nnUNetv2_train/predict -device cpu`` set torch's threads to the core count whatever OMP_NUM_THREADS says, so a
    pair runs four OpenMP threads on two cores, and OpenMP's default spin-waiting then makes each tiny epoch up to 15x
    slower (measured: a pair of 2d folds 46 s, 9.3 s for a 3-iteration epoch; with OMP_WAIT_POLICY=PASSIVE 27 s and
    0.6 s; a single training is not affected, 23 vs 24 s)."""
    for start in range(0, len(jobs), 2):
        pair = [(command, subprocess.Popen([str(Path(sys.executable).parent / command[0]), *command[1:]],
                                           env={**env, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
                                           stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True))
                for command, env in jobs[start:start + 2]]
        for command, process in pair:
            output, _ = process.communicate()
            if process.returncode != 0:
                raise AssertionError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-5000:]}")


def run(command: list[str], env: dict, expect_failure: bool = False) -> subprocess.CompletedProcess:
    """Runs a console script from this interpreter's environment; fails the test with its output on error."""
    executable = Path(sys.executable).parent / command[0]
    result = subprocess.run([str(executable), *command[1:]], env=env, capture_output=True, text=True)
    if expect_failure:
        assert result.returncode != 0, f"{' '.join(command)} should have failed:\n{result.stdout[-3000:]}"
    elif result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    return result


# ---- model folders written directly (no training), as nnUNetv2_train leaves them ----

CONFIGURATIONS = {3: ("3d_fullres", [8, 16, 16]), 2: ("2d", [16, 16])}


def tiny_plans(dim: int) -> dict:
    configuration, patch = CONFIGURATIONS[dim]
    return {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans", "label_manager": "LabelManager",
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(range(dim)),
        "transpose_backward": list(range(dim)),
        "configurations": {configuration: {
            "data_identifier": f"nnUNetPlans_{configuration}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": patch, "spacing": [1.0] * dim,
            "architecture": {"network_class_name": PLAIN, "arch_kwargs": plain_plan_kwargs(dim),
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }},
    }


def write_model_folder(root: Path, trainer_name: str, dim: int = 3) -> Path:
    """A model folder as nnUNetv2_train leaves it after one fold, with moved ("trained") weights, without training."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from rep3d_nnunet.nnunet_compat import build_network, find_trainer_class, record_build_inputs

    configuration, _ = CONFIGURATIONS[dim]
    plans = tiny_plans(dim)
    dataset = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
               "file_ending": ".nii.gz"}
    folder = root / f"{trainer_name}__nnUNetPlans__{configuration}"
    (folder / "fold_0").mkdir(parents=True)
    plans_manager = PlansManager(plans)
    trainer = find_trainer_class(trainer_name)
    torch.manual_seed(1)
    network = build_network(trainer, plans_manager, plans_manager.get_configuration(configuration), 1, 2, True)
    if hasattr(trainer, "deploy_architecture"):  # a Rep3D trainer records this before nnU-Net saves plans.json
        record_build_inputs(plans, configuration)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in network.parameters():  # gains of the generator's last norm leave 0, so M != P as after training
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    # The keys nnUNetTrainer.save_checkpoint writes, numpy scalars in its logging included.
    torch.save({
        "network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float32(0.5)], "train_losses": [np.float64(-0.1)]},
        "_best_ema": np.float32(0.5), "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": configuration, "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": trainer_name, "inference_allowed_mirroring_axes": tuple(range(dim)),
    }, folder / "fold_0" / "checkpoint_final.pth")
    return folder


