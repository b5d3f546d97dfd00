"""What the tests share: nnU-Net-style plans and the networks nnU-Net builds from them, torch.compile's one-graph
check, and nnU-Net's own commands against a throwaway nnU-Net tree as a user would run them (model folders written
without training). The one helper module: no test module imports another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from rep3d_nnunet.config import REP3D_NETWORK_CLASS, Rep3DSettings, rep3d_architecture
from rep3d_nnunet.variants import make_trainer_class

from rep3d_nnunet.environment import sync_external_trainer_module, trainer_folder
from rep3d_nnunet.nnunet_compat import nnunet_version

# ---- plans and networks, as nnU-Net builds them ----

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def plain_plan_kwargs(dim: int = 3, features=(4, 8, 16)) -> dict:
    """arch_kwargs in the form nnU-Net's default planner writes them (3 stages, first one anisotropic in 3D)."""
    n = len(features)
    if dim == 3:
        kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n - 1)
        strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n - 2)
    else:
        kernels, strides = [[3, 3]] * n, [[1, 1]] + [[2, 2]] * (n - 1)
    return {
        "n_stages": n, "features_per_stage": list(features), "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


def build(settings: Rep3DSettings, dim: int = 3, patch=(8, 16, 16), deep_supervision=True, num_classes=3):
    kwargs, req_import = rep3d_architecture(PLAIN, plain_plan_kwargs(dim), patch, [1.0] * dim, settings)
    return get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, req_import, 1, num_classes,
                                  deep_supervision=deep_supervision)


FAMILIES = {
    "lrbm": "nnUNetTrainerRep3D",
    "fixed": "nnUNetTrainerRep3DFixedPrior",
    "vanilla": "nnUNetTrainerRep3DVanilla",
    "csla": "nnUNetTrainerRep3DCSLA",
    "uxnet_lrbm": "nnUNetTrainerUXNetLRBM",
}
# (dimension, patch, spacing): nnU-Net-style plans of three stages; the 3D ones start with a flat-z stage
# (kernel 1x3x3, stride 1x2x2) as nnU-Net plans anisotropic data; "3d" is isotropic throughout.
PLANS = {
    "2d": (2, (16, 24), (1.0, 1.0)),
    "3d": (3, (16, 16, 16), (1.0, 1.0, 1.0)),
    "3d_anisotropic": (3, (8, 16, 16), (3.0, 0.8, 0.8)),
}


def plan_configuration(dim: int, patch, spacing, features=(4, 8, 16)) -> ConfigurationManager:
    arch_kwargs = plain_plan_kwargs(dim, features)
    if dim == 3 and spacing[0] == spacing[1]:  # isotropic: a cubic first stage
        arch_kwargs["kernel_sizes"][0] = [3, 3, 3]
        arch_kwargs["strides"][1] = [2, 2, 2]
    return ConfigurationManager({
        "patch_size": list(patch), "spacing": list(spacing), "batch_size": 2,
        "architecture": {"network_class_name": PLAIN, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    })


def build_network(trainer_name: str, configuration: ConfigurationManager, seed: int = 0,
                  deep_supervision: bool = True) -> torch.nn.Module:
    """The network nnUNetTrainer builds for ``trainer_name`` (one input channel, three classes)."""
    torch.manual_seed(seed)
    plans_manager = PlansManager({"configurations": {}})
    return make_trainer_class(trainer_name).build_network_architecture(plans_manager, configuration, 1, 3,
                                                                      deep_supervision)


def random_input(configuration: ConfigurationManager, batch: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 1, *configuration.patch_size, generator=generator).to(dtype)


def assert_one_graph(network: torch.nn.Module, x: torch.Tensor) -> None:
    """torch._dynamo.explain of a training forward and of an eval (no_grad) forward: one graph, no break."""
    for mode in ("train", "eval"):
        getattr(network, mode)()
        torch._dynamo.reset()
        with torch.set_grad_enabled(mode == "train"):
            explanation = torch._dynamo.explain(network)(x)
        reasons = [r.reason.splitlines()[0] for r in explanation.break_reasons]
        assert explanation.graph_break_count == 0, (mode, reasons)
        assert explanation.graph_count == 1, mode
    torch._dynamo.reset()


# ---- nnU-Net's commands against a throwaway tree ----

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


