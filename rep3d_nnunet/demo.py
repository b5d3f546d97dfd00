"""The end-to-end demo: what Rep3D is for, on a task that needs long-range context, beside nnU-Net's default.

synthetic long-range dataset -> nnU-Net planning -> nnU-Net's default trainer and the Rep3D trainer on the same plan,
fold and number of iterations -> folded export of the Rep3D model -> prediction of held-out cases with both (the
exported one without ``nnUNet_extTrainer``, as a deployed model runs) -> nnU-Net's evaluation -> one table.

Every step is the command a user would type (printed before it runs), so the demo doubles as a walkthrough. The
schedule comes from docs/results.md (32^3, features 8-64, 3 seeds): every Rep3D trainer had learned the long-range
rule after 600 iterations, nnU-Net's default had not after 1,200.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from .environment import export_lines, sync_external_trainer_module

DEMO_TRAINERS = {"nnU-Net default (PlainConvUNet, SGD)": "nnUNetTrainerDemo",
                 "Rep3D (21^3 kernels, LRBM, AdamW)": "nnUNetTrainerRep3DDemo"}
DEMO_PLANS = "nnUNetPlans_demo"
TASK_SENTENCE = (
    "The task: every blob looks the same; whether it is class 1 or 2 is set by a marker plate at least 16 voxels "
    "away, so a network must look that far to tell them apart. See docs/results.md for 3 seeds, the local-contrast "
    "control, and the finding that Rep3D with 3^3 kernels does as well as 21^3 on this task."
)


@dataclass
class DemoSettings:
    """What the demo runs; the defaults take about 12 minutes on 2 CPU cores (measured, README)."""

    workdir: Path
    dataset_id: int = 990
    configuration: str = "3d_fullres"
    epochs: int = 24
    iterations_per_epoch: int = 25  # 24 x 25 = 600 iterations, batch 2, for both trainers
    base_features: int = 8
    max_features: int = 64
    num_training: int = 20
    num_test: int = 6
    size: tuple[int, int, int] = (32, 32, 32)
    device: str = "auto"
    seed: int = 0


def _bin(name: str) -> str:
    """A console script installed beside the running interpreter (the same environment as this package)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class DemoStepFailed(RuntimeError):
    """A command of the demo exited with an error; its own output, printed above, says why."""


def _run(command: list[str], env: dict) -> float:
    print("\n$ " + " ".join(command), flush=True)
    started = time.time()
    status = subprocess.run(command, env=env).returncode
    if status != 0:
        raise DemoStepFailed(f"{Path(command[0]).name} exited with status {status}; its output is above.")
    seconds = time.time() - started
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def demo_environment(workdir: Path, device: str, trainer_folder: Path) -> dict:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(workdir / name)
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    env["nnUNet_extTrainer"] = os.pathsep.join([export_lines(env)[0].split("=", 1)[1], str(trainer_folder)])
    sync_external_trainer_module()  # the rest of eval "$(rep3d-nnunet env)": nnU-Net < 2.8 needs a lookup module
    # nnU-Net's worker pools default to 8 processes; on a small CPU their start-up stalls validation for tens of
    # seconds (rep3d-nnunet doctor explains)
    env.setdefault("nnUNet_def_n_proc", str(min(os.cpu_count() or 1, 4)))
    return env


def training_environment(env: dict, device: str) -> dict:
    """On a CPU, augmentation in the training process: workers would compete with the training step for the cores.
    (Not for planning: nnU-Net's planner passes nnUNet_n_proc_DA to torch.set_num_threads, which rejects 0.)"""
    return {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0")} if device == "cpu" else env


def write_demo_trainers(folder: Path, settings: DemoSettings) -> Path:
    """Both trainers with the demo's schedule, in a file nnU-Net finds through ``nnUNet_extTrainer`` (nnU-Net's
    documented way to add a trainer)."""
    folder.mkdir(parents=True, exist_ok=True)
    epochs, iterations = settings.epochs, settings.iterations_per_epoch
    (folder / "nnUNetTrainerDemo.py").write_text(textwrap.dedent(f'''
        """The demo's two trainers: the same {epochs} x {iterations} iterations, few validation batches per epoch."""
        import torch
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        from rep3d_nnunet.training import Rep3DTrainer


        class nnUNetTrainerDemo(nnUNetTrainer):
            # nnU-Net records its constructor's arguments by name: the signature must be spelled out
            def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
                super().__init__(plans, configuration, fold, dataset_json, device)
                self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = {epochs}, \\
                    {iterations}, 2


        class nnUNetTrainerRep3DDemo(Rep3DTrainer):  # nnUNetTrainerRep3D's method: LRBM, 21^3 kernels, AdamW
            num_epochs_override = {epochs}
            iterations_per_epoch_override = {iterations}
            val_iterations_per_epoch_override = 2
    '''))
    return folder


def write_scaled_plans(preprocessed: Path, settings: DemoSettings) -> Path:
    """nnU-Net's plans with features base * 2^stage capped at max, for every network alike (so both train in minutes
    on a CPU; ``benchmarks/convergence.py`` does the same)."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = DEMO_PLANS
    for configuration in plans["configurations"].values():
        kwargs = configuration.get("architecture", {}).get("arch_kwargs")
        if kwargs and "features_per_stage" in kwargs:
            kwargs["features_per_stage"] = [min(settings.max_features, settings.base_features * 2 ** i)
                                            for i in range(len(kwargs["features_per_stage"]))]
    path = preprocessed / f"{DEMO_PLANS}.json"
    path.write_text(json.dumps(plans, indent=2))
    return path


def dice_per_class(summary_file: Path) -> dict[str, float]:
    """Dice per label from nnU-Net's evaluation summary.json."""
    summary = json.loads(summary_file.read_text())
    return {label: values["Dice"] for label, values in summary["mean"].items()}


def results_table(rows: list[dict]) -> str:
    labels = sorted({label for row in rows for label in row["dice"]}, key=int)
    header = ["model", *[f"class {label} Dice" for label in labels], "mean Dice", "nnUNetv2_train (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        dice = [row["dice"][label] for label in labels]
        lines.append(f"| {row['model']} | " + " | ".join(f"{d:.3f}" for d in dice)
                     + f" | {sum(dice) / len(dice):.3f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def run_demo(settings: DemoSettings) -> list[dict]:
    """Runs the whole pipeline and returns, per model, the Dice per class on the held-out cases and training time."""
    from .datasets.synthetic import generate_synthetic_dataset

    started = time.time()
    workdir = settings.workdir.resolve()
    device = resolve_device(settings.device)
    trainers_folder = write_demo_trainers(workdir / "demo_trainers", settings)
    env = demo_environment(workdir, device, trainers_folder)
    print(f"Working in {workdir} on {device}. nnU-Net paths for this shell:")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc"):
        print(f"  export {name}={env[name]}")

    print(f"\n# 1. a synthetic dataset in nnU-Net's raw format: {settings.num_training} training and "
          f"{settings.num_test} held-out cases of {'x'.join(map(str, settings.size))} voxels\n# {TASK_SENTENCE}")
    dataset = generate_synthetic_dataset(
        Path(env["nnUNet_raw"]), settings.dataset_id, task="long_range", num_training=settings.num_training,
        num_test=settings.num_test, size=settings.size, seed=settings.seed, overwrite=True,
    )
    print(f"  wrote {dataset}")
    d, c = str(settings.dataset_id), settings.configuration

    print("\n# 2. plan and preprocess (nnU-Net)")
    _run([_bin("nnUNetv2_plan_and_preprocess"), "-d", d, "-c", c, "-np", env["nnUNet_def_n_proc"],
          "--verify_dataset_integrity"], env)
    plans_file = write_scaled_plans(Path(env["nnUNet_preprocessed"]) / dataset.name, settings)
    print(f"  wrote {plans_file.name}: nnU-Net's plan with {settings.base_features}-{settings.max_features} features "
          f"per stage, for both networks alike (CPU-sized)")

    print(f"\n# 3. train fold 0 with both trainers, {settings.epochs} x {settings.iterations_per_epoch} iterations "
          f"each (the trainer file nnU-Net finds through nnUNet_extTrainer: "
          f"{trainers_folder / 'nnUNetTrainerDemo.py'})")
    seconds = {}
    for trainer in DEMO_TRAINERS.values():
        seconds[trainer] = _run([_bin("nnUNetv2_train"), d, c, "0", "-tr", trainer, "-p", DEMO_PLANS, "-device",
                                 device], training_environment(env, device))
    results = Path(env["nnUNet_results"]) / dataset.name
    rep3d_trained = results / f"nnUNetTrainerRep3DDemo__{DEMO_PLANS}__{c}"

    print("\n# 4. export the Rep3D model with the generator folded away")
    exported = results / f"nnUNetTrainerRep3DDemo__{DEMO_PLANS}_folded__{c}"
    if exported.exists():
        shutil.rmtree(exported)
    _run([_bin("rep3d-nnunet"), "export", str(rep3d_trained), "-o", str(exported)], env)

    print("\n# 5. predict the held-out cases and evaluate with nnU-Net (the exported model without "
          "nnUNet_extTrainer, as it would run where it is deployed)")
    deploy_env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    model_folders = {"nnUNetTrainerDemo": (results / f"nnUNetTrainerDemo__{DEMO_PLANS}__{c}", env),
                     "nnUNetTrainerRep3DDemo": (exported, deploy_env)}
    rows = []
    for label, trainer in DEMO_TRAINERS.items():
        folder, folder_env = model_folders[trainer]
        predictions = workdir / f"predictions_{trainer}"
        _run([_bin("nnUNetv2_predict_from_modelfolder"), "-i", str(dataset / "imagesTs"), "-o", str(predictions),
              "-m", str(folder), "-f", "0", "-device", device, "-npp", "1", "-nps", "1"], folder_env)
        summary = predictions / "summary.json"
        _run([_bin("nnUNetv2_evaluate_folder"), str(dataset / "labelsTs"), str(predictions), "-djfile",
              str(folder / "dataset.json"), "-pfile", str(folder / "plans.json"), "-o", str(summary), "-np", "1"],
             folder_env)
        rows.append({"model": label, "trainer": trainer, "dice": dice_per_class(summary),
                     "seconds": seconds[trainer]})

    iterations = settings.epochs * settings.iterations_per_epoch
    print(f"\nDice on the {settings.num_test} held-out cases (fold 0, {iterations} "
          f"training iterations each, {device}; Rep3D: the exported, folded model):\n")
    print(results_table(rows))
    print(f"\n{TASK_SENTENCE}")
    print(f"Total wall time: {time.time() - started:.0f} s. Everything is in {workdir}.")
    (workdir / "demo_results.json").write_text(json.dumps(rows, indent=2))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet demo``."""
    parser.add_argument("--workdir", default="rep3d_demo",
                        help="folder for the nnU-Net tree, predictions and results (default ./rep3d_demo)")
    parser.add_argument("--dataset-id", type=int, default=DemoSettings.dataset_id)
    parser.add_argument("--epochs", type=int, default=DemoSettings.epochs,
                        help=f"epochs of {DemoSettings.iterations_per_epoch} iterations for each trainer "
                             f"(default {DemoSettings.epochs}: 600 iterations)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the demo described by parsed :func:`add_arguments` flags (it prints as it goes)."""
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}.")
    try:
        run_demo(DemoSettings(workdir=Path(args.workdir), dataset_id=args.dataset_id, epochs=args.epochs,
                              device=args.device))
    except DemoStepFailed as error:
        print(f"rep3d-nnunet demo: error: {error}", file=sys.stderr)
        return 1
    return 0
