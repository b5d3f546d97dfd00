"""Running nnU-Net's own commands against a throwaway nnU-Net tree, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rep3d_nnunet.environment import trainer_folder

TINY_TRAINER = "nnUNetTrainerRep3DTestTiny"
# nnU-Net's recommended way to add a trainer: a file in a folder listed in nnUNet_extTrainer. Epochs and iterations
# are tiny so that five folds run in minutes on two CPU cores; the network is the real one (k=21, LRBM).
TINY_TRAINER_SOURCE = textwrap.dedent(f'''
    from rep3d_nnunet.training import Rep3DTrainer


    class {TINY_TRAINER}(Rep3DTrainer):
        num_epochs_override = 2
        iterations_per_epoch_override = 3
        val_iterations_per_epoch_override = 1
''')


def nnunet_environment(root: Path, extra_trainer_folder: Path | None = None) -> dict:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(root / name)
        (root / name).mkdir(parents=True, exist_ok=True)
    folders = [str(trainer_folder())] + ([str(extra_trainer_folder)] if extra_trainer_folder else [])
    env["nnUNet_extTrainer"] = os.pathsep.join(folders)
    env.update({"nnUNet_def_n_proc": "1", "nnUNet_compile": "false"})
    return env


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
