"""The end-to-end demo: nnU-Net's default trainer and nnU-Net's AdamW trainer beside the default Rep3D trainer, the
whole job as a user runs it.

Default (``--task hippocampus``): real anatomy, the 25 MSD Task04 Hippocampus cases that ship with the package (or
the user's own download, ``--data PATH``) -> nnU-Net's MSD converter, every 5th case held out -> nnU-Net planning ->
the three trainers on the same plan, fold and number of iterations -> folded export of the Rep3D model -> prediction
of the held-out cases with each (the exported one without ``nnUNet_extTrainer``, as a deployed model runs) ->
nnU-Net's evaluation -> one table and one PNG of a held-out case's slices.

``--task long_range``: the synthetic task that needs long-range context (docs/results.md: 32^3, features 8-64, 3
seeds; every Rep3D trainer had learned the long-range rule after 600 iterations, nnU-Net's default had not after
1,200).

Every step is the command a user would type (printed before it runs), so the demo doubles as a walkthrough.
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

# label -> trainer, the longest first: trainings run two at a time (see _run_concurrently)
DEMO_TRAINERS = {"Rep3D default (nnUNetTrainerRep3D)": "nnUNetTrainerRep3DDemo",
                 "nnU-Net default (PlainConvUNet, SGD)": "nnUNetTrainerDemo",
                 "nnU-Net with AdamW (PlainConvUNet, nnUNetTrainerAdam1en3)": "nnUNetTrainerAdamDemo"}
REP3D_DEMO_TRAINER = "nnUNetTrainerRep3DDemo"
DEMO_PLANS = "nnUNetPlans_demo"
TASKS = ("hippocampus", "long_range")
LONG_RANGE_SENTENCE = (
    "The task: every blob looks the same; whether it is class 1 or 2 is set by a marker plate at least 16 voxels "
    "away, so a network must look that far to tell them apart. See docs/results.md for 3 seeds, the local-contrast "
    "control, and the finding that Rep3D with 3^3 kernels does as well as 21^3 on this task."
)
NNUNET_DEFAULT_ITERATIONS = 1000 * 250


def hippocampus_sentence(iterations: int, features: str) -> str:
    """What the real-data comparison does and does not show."""
    return (
        f"All three trainers ran {iterations} iterations on the same plan (nnU-Net's, features {features} so that a "
        f"CPU runs it in minutes) and fold: a first-minutes budget, {NNUNET_DEFAULT_ITERATIONS // iterations:,} times "
        f"less than nnU-Net's {NNUNET_DEFAULT_ITERATIONS:,} iterations behind its published ~0.90 / 0.89 Dice. One run "
        f"on 5 cases decides little: on 200 cases (docs/hippocampus.md: 3 folds, up to 1,600 iterations) the Rep3D "
        f"default is ahead per iteration and level with nnU-Net's best trainer at equal training time (a Rep3D step "
        f"costs 1.3x nnU-Net's on this plan). The Rep3D row is the exported, folded model, predicted without "
        f"nnUNet_extTrainer."
    )


@dataclass
class DemoSettings:
    """What the demo runs. Defaults: the synthetic task's schedule (``--task long_range``, about 10 minutes on 2 CPU
    cores); the hippocampus task takes :data:`HIPPOCAMPUS_DEFAULTS` instead."""

    workdir: Path
    task: str = "long_range"
    dataset_id: int = 990
    configuration: str = "3d_fullres"
    epochs: int = 24
    iterations_per_epoch: int = 25  # 24 x 25 = 600 iterations, batch 2, for every trainer
    base_features: int = 8
    max_features: int = 64
    num_training: int = 20
    num_test: int = 6
    size: tuple[int, int, int] = (32, 32, 32)
    device: str = "auto"
    seed: int = 0
    data: Path | None = None  # hippocampus: an MSD Task04 folder (default: the cases that ship with the package)
    held_out_every: int = 5  # hippocampus: every 5th case (sorted) is held out for prediction


# The real-data demo's schedule and network width: 8 x 25 = 200 iterations at batch 2 for each trainer, features 8-64
# (CPU-sized, aimed at under 15 minutes on 2 cores; nnU-Net's plan gives patch 40 x 56 x 40 on these cases)
HIPPOCAMPUS_DEFAULTS = {"dataset_id": 994, "epochs": 8, "iterations_per_epoch": 25, "base_features": 8,
                        "max_features": 64}


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
    if device == "cpu":
        # nnUNetv2_train/predict -device cpu use one torch thread per core; with OpenMP's default spin-waiting, a
        # core taken by another program stalls the other threads at every barrier (tests/nnunet_helpers.run_in_pairs
        # measured 15x slower epochs); passive waiting costs a single job nothing measurable
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
        """The demo's three trainers: the same {epochs} x {iterations} iterations, few validation batches per epoch."""
        import torch
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam1en3

        from rep3d_nnunet.variants import make_trainer_class


        class nnUNetTrainerDemo(nnUNetTrainer):
            # nnU-Net records its constructor's arguments by name: the signature must be spelled out
            def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
                super().__init__(plans, configuration, fold, dataset_json, device)
                self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = {epochs}, \\
                    {iterations}, 2


        class nnUNetTrainerAdamDemo(nnUNetTrainerAdam1en3):  # nnU-Net's own AdamW trainer (lr 1e-3)
            def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
                super().__init__(plans, configuration, fold, dataset_json, device)
                self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = {epochs}, \\
                    {iterations}, 2


        class nnUNetTrainerRep3DDemo(make_trainer_class("nnUNetTrainerRep3D")):  # the default Rep3D trainer
            num_epochs_override = {epochs}
            iterations_per_epoch_override = {iterations}
            val_iterations_per_epoch_override = 2
    '''))
    return folder


def write_scaled_plans(preprocessed: Path, settings: DemoSettings) -> Path:
    """nnU-Net's plans with features base * 2^stage capped at max, for every network alike (so they train in minutes
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


def results_table(rows: list[dict], label_names: dict[str, str] | None = None) -> str:
    """Markdown table: Dice per class (named by ``label_names``, value -> name), mean, training and prediction s."""
    labels = sorted({label for row in rows for label in row["dice"]}, key=int)
    names = label_names or {}
    header = ["model", *[f"{names.get(label, f'class {label}')} Dice" for label in labels], "mean Dice",
              "nnUNetv2_train (s)", "predict (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        dice = [row["dice"][label] for label in labels]
        lines.append(f"| {row['model']} | " + " | ".join(f"{d:.3f}" for d in dice)
                     + f" | {sum(dice) / len(dice):.3f} | {row['seconds']:.0f} | {row['predict_seconds']:.0f} |")
    return "\n".join(lines)


def _start(settings: DemoSettings) -> tuple[Path, str, Path, dict]:
    """Working folder, device, trainer folder and nnU-Net environment of a demo run; prints the export lines."""
    workdir = settings.workdir.resolve()
    device = resolve_device(settings.device)
    trainers_folder = write_demo_trainers(workdir / "demo_trainers", settings)
    env = demo_environment(workdir, device, trainers_folder)
    print(f"Working in {workdir} on {device}. nnU-Net paths for this shell:")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc"):
        print(f"  export {name}={env[name]}")
    return workdir, device, trainers_folder, env


def _plan(dataset: Path, settings: DemoSettings, env: dict, step: int) -> None:
    n = env["nnUNet_def_n_proc"]
    print(f"\n# {step}. plan and preprocess (nnU-Net)")
    _run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(settings.dataset_id), "-c", settings.configuration,
          "-npfp", n, "-np", n, "--verify_dataset_integrity"], env)
    plans_file = write_scaled_plans(Path(env["nnUNet_preprocessed"]) / dataset.name, settings)
    print(f"  wrote {plans_file.name}: nnU-Net's plan with {settings.base_features}-{settings.max_features} features "
          f"per stage, for every network alike (CPU-sized)")


def _train_export_predict(dataset: Path, settings: DemoSettings, workdir: Path, device: str, trainers_folder: Path,
                          env: dict, step: int) -> list[dict]:
    """Both trainers on fold 0, the Rep3D export, prediction of imagesTs and nnU-Net's evaluation against labelsTs.

    Returns:
        Per model: label, trainer, Dice per class, training seconds, prediction seconds, prediction folder.
    """
    d, c = str(settings.dataset_id), settings.configuration
    print(f"\n# {step}. train fold 0 with each trainer, {settings.epochs} x {settings.iterations_per_epoch} "
          f"iterations each, two at a time (the trainer file nnU-Net finds through nnUNet_extTrainer: "
          f"{trainers_folder / 'nnUNetTrainerDemo.py'}; each training's output in {workdir / 'logs'})")
    seconds = _run_concurrently({trainer: [_bin("nnUNetv2_train"), d, c, "0", "-tr", trainer, "-p", DEMO_PLANS,
                                           "-device", device] for trainer in DEMO_TRAINERS.values()},
                                training_environment(env, device), workdir / "logs", 2 if device == "cpu" else 1)
    results = Path(env["nnUNet_results"]) / dataset.name

    print(f"\n# {step + 1}. export the Rep3D model with the generator folded away")
    exported = results / f"{REP3D_DEMO_TRAINER}__{DEMO_PLANS}_folded__{c}"
    if exported.exists():
        shutil.rmtree(exported)
    _run([_bin("rep3d-nnunet"), "export", str(results / f"{REP3D_DEMO_TRAINER}__{DEMO_PLANS}__{c}"), "-o",
          str(exported)], env)

    print(f"\n# {step + 2}. predict the held-out cases and evaluate with nnU-Net (the exported model without "
          "nnUNet_extTrainer, as it would run where it is deployed)")
    deploy_env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    rows = []
    for label, trainer in DEMO_TRAINERS.items():
        folder, folder_env = ((exported, deploy_env) if trainer == REP3D_DEMO_TRAINER else
                              (results / f"{trainer}__{DEMO_PLANS}__{c}", env))
        predictions = workdir / f"predictions_{trainer}"
        if predictions.exists():
            shutil.rmtree(predictions)
        predict_seconds = _run([_bin("nnUNetv2_predict_from_modelfolder"), "-i", str(dataset / "imagesTs"), "-o",
                                str(predictions), "-m", str(folder), "-f", "0", "-device", device, "-npp", "1",
                                "-nps", "1"], folder_env)
        summary = predictions / "summary.json"
        _run([_bin("nnUNetv2_evaluate_folder"), str(dataset / "labelsTs"), str(predictions), "-djfile",
              str(folder / "dataset.json"), "-pfile", str(folder / "plans.json"), "-o", str(summary), "-np", "1"],
             folder_env)
        rows.append({"model": label, "trainer": trainer, "dice": dice_per_class(summary),
                     "seconds": seconds[trainer], "predict_seconds": predict_seconds,
                     "predictions": str(predictions)})
    return rows


def _run_concurrently(commands: dict[str, list[str]], env: dict, logs: Path, slots: int) -> dict[str, float]:
    """Runs the commands ``slots`` at a time (in the given order), each one's output into ``logs/<name>.log``;
    returns the seconds each took.

    On a CPU two trainings side by side, one torch thread each with passive OpenMP waiting, finish in about the time of
    one with two threads: a small network's step does not keep two threads busy.

    Raises:
        DemoStepFailed: a command exited with an error (the others are waited for first).
    """
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, seconds, failed = list(commands.items()), {}, {}, []
    while pending or running:
        while pending and len(running) < slots:
            name, command = pending.pop(0)
            print(f"\n$ {' '.join(command)}   > {logs / (name + '.log')}", flush=True)
            log = open(logs / f"{name}.log", "w")
            threads = {"OMP_NUM_THREADS": "1"} if slots > 1 else {}
            running[name] = (subprocess.Popen(command, env={**env, **threads}, stdout=log, stderr=subprocess.STDOUT),
                             log, time.time())
        time.sleep(1)
        for name, (process, log, started) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            seconds[name] = time.time() - started
            print(f"  {name}: {seconds[name]:.0f} s" + ("" if process.returncode == 0 else
                                                          f", exited with status {process.returncode}"), flush=True)
            if process.returncode != 0:
                failed.append(f"{Path(commands[name][0]).name} {name} exited with status {process.returncode}; "
                              f"its output is in {logs / (name + '.log')}.")
    if failed:
        raise DemoStepFailed(" ".join(failed))
    return seconds


def run_long_range_demo(settings: DemoSettings) -> list[dict]:
    """The synthetic long-range task: returns, per model, the Dice per class on the held-out cases and times."""
    from .datasets.synthetic import generate_synthetic_dataset

    started = time.time()
    workdir, device, trainers_folder, env = _start(settings)
    print(f"\n# 1. a synthetic dataset in nnU-Net's raw format: {settings.num_training} training and "
          f"{settings.num_test} held-out cases of {'x'.join(map(str, settings.size))} voxels\n# {LONG_RANGE_SENTENCE}")
    dataset = generate_synthetic_dataset(
        Path(env["nnUNet_raw"]), settings.dataset_id, task="long_range", num_training=settings.num_training,
        num_test=settings.num_test, size=settings.size, seed=settings.seed, overwrite=True,
    )
    print(f"  wrote {dataset}")
    _plan(dataset, settings, env, 2)
    rows = _train_export_predict(dataset, settings, workdir, device, trainers_folder, env, 3)
    iterations = settings.epochs * settings.iterations_per_epoch
    print(f"\nDice on the {settings.num_test} held-out cases (fold 0, {iterations} "
          f"training iterations each, {device}; Rep3D: the exported, folded model):\n")
    print(results_table(rows))
    print(f"\n{LONG_RANGE_SENTENCE}")
    print(f"Total wall time: {time.time() - started:.0f} s. Everything is in {workdir}.")
    (workdir / "demo_results.json").write_text(json.dumps(rows, indent=2))
    return rows


def _remove_dataset(env: dict, dataset_id: int) -> None:
    """Removes the demo's own earlier copy of its dataset from its nnU-Net tree (nnU-Net's converter refuses a
    dataset id that is taken). Only folders inside the demo's working folder are touched."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        for folder in Path(env[name]).glob(f"Dataset{dataset_id:03d}_*"):
            shutil.rmtree(folder)


def run_hippocampus_demo(settings: DemoSettings) -> list[dict]:
    """Real anatomy: returns, per model, the Dice per class on the held-out cases and times; writes the table
    (demo_results.json) and a PNG of a held-out case's slices (demo_slices.png) into the working folder.

    Raises:
        FileNotFoundError, ValueError: ``settings.data`` is not an MSD Task04 Hippocampus folder (before anything
            is written).
    """
    from .datasets.hippocampus import SUBSET, converter_input, move_held_out_cases
    from .datasets.msd import HIPPOCAMPUS, locate_msd
    from .slices_figure import write_slices_figure

    started = time.time()
    source = locate_msd(settings.data or SUBSET, HIPPOCAMPUS)  # a wrong --data fails here, nothing written yet
    workdir, device, trainers_folder, env = _start(settings)
    n = env["nnUNet_def_n_proc"]

    print(f"\n# 1. nnU-Net's MSD converter on {len(source.cases)} labelled cases of MSD Task04 Hippocampus "
          f"({source.root}); every {settings.held_out_every}th case is held out for prediction")
    _remove_dataset(env, settings.dataset_id)
    converter_folder = converter_input(source.root, workdir / "msd_source")
    print(f"  {converter_folder}: links to its imagesTr and labelsTr and an empty imagesTs (the converter needs "
          f"the name Task04_Hippocampus and that folder)")
    _run([_bin("nnUNetv2_convert_MSD_dataset"), "-i", str(converter_folder), "-overwrite_id",
          str(settings.dataset_id), "-np", n], env)
    dataset = Path(env["nnUNet_raw"]) / f"Dataset{settings.dataset_id:03d}_{HIPPOCAMPUS.name}"
    held_out = move_held_out_cases(dataset, settings.held_out_every)
    print(f"  moved {len(held_out)} cases to imagesTs/labelsTs: {', '.join(held_out[:6])}"
          f"{', ...' if len(held_out) > 6 else ''}; {len(source.cases) - len(held_out)} remain for training")
    _plan(dataset, settings, env, 2)
    rows = _train_export_predict(dataset, settings, workdir, device, trainers_folder, env, 3)

    dataset_json = json.loads((dataset / "dataset.json").read_text())
    label_names = {str(value): name.lower() for name, value in dataset_json["labels"].items() if value}
    case = held_out[0]
    figure = write_slices_figure(
        dataset / "imagesTs" / f"{case}_0000.nii.gz", dataset / "labelsTs" / f"{case}.nii.gz",
        {row["model"].split(" (")[0]: Path(row["predictions"]) / f"{case}.nii.gz" for row in rows},
        workdir / "demo_slices.png", {int(v): k for v, k in label_names.items()}, title=f"held-out case {case}")

    iterations = settings.epochs * settings.iterations_per_epoch
    features = f"{settings.base_features}-{settings.max_features}"
    print(f"\nDice on the {len(held_out)} held-out cases (nnU-Net's evaluation; fold 0 of "
          f"{len(source.cases) - len(held_out)} cases, {iterations} training iterations each, {device}):\n")
    print(results_table(rows, label_names))
    print(f"\n{hippocampus_sentence(iterations, features)}")
    print(f"Slices of {case} (image, ground truth, each model's prediction): {figure}")
    print(f"Total wall time: {time.time() - started:.0f} s. Everything is in {workdir}.")
    (workdir / "demo_results.json").write_text(json.dumps(rows, indent=2))
    return rows


def run_demo(settings: DemoSettings) -> list[dict]:
    """Runs the demo of ``settings.task`` (see the module docstring)."""
    if settings.task == "hippocampus":
        return run_hippocampus_demo(settings)
    return run_long_range_demo(settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet demo``."""
    parser.add_argument("--task", default="hippocampus", choices=TASKS,
                        help="hippocampus (default): real MRI, the MSD Task04 cases that ship with the package; "
                             "long_range: the synthetic task that needs long-range context")
    parser.add_argument("--data", default=None,
                        help="hippocampus: your own MSD Task04_Hippocampus folder (the extracted download with "
                             "dataset.json, imagesTr/, labelsTr/) instead of the 25 shipped cases")
    parser.add_argument("--workdir", default="rep3d_demo",
                        help="folder for the nnU-Net tree, predictions and results (default ./rep3d_demo)")
    parser.add_argument("--dataset-id", type=int, default=None,
                        help=f"nnU-Net dataset id in the demo's own tree (default {HIPPOCAMPUS_DEFAULTS['dataset_id']} "
                             f"for hippocampus, {DemoSettings.dataset_id} for long_range)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of 25 iterations for each trainer (default {HIPPOCAMPUS_DEFAULTS['epochs']} "
                             f"for hippocampus, {DemoSettings.epochs} for long_range)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The settings of parsed :func:`add_arguments` flags.

    Raises:
        ValueError: --epochs below 1, or --data with --task long_range.
    """
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}.")
    if args.data is not None and args.task != "hippocampus":
        raise ValueError("--data is the hippocampus demo's input; --task long_range generates its own data. Fix: "
                         "drop --data, or use --task hippocampus.")
    task_defaults = HIPPOCAMPUS_DEFAULTS if args.task == "hippocampus" else {}
    overrides = {"dataset_id": args.dataset_id, "epochs": args.epochs}
    values = {**task_defaults, **{k: v for k, v in overrides.items() if v is not None}}
    return DemoSettings(workdir=Path(args.workdir), task=args.task, device=args.device,
                        data=Path(args.data) if args.data else None, **values)


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the demo described by parsed :func:`add_arguments` flags (it prints as it goes)."""
    settings = settings_from_args(args)
    if settings.task == "hippocampus":  # a folder that is not MSD Task04: one line and exit 2, before any work
        from .datasets.hippocampus import SUBSET
        from .datasets.msd import HIPPOCAMPUS, locate_msd

        locate_msd(settings.data or SUBSET, HIPPOCAMPUS)
    try:
        run_demo(settings)
    except DemoStepFailed as error:
        print(f"rep3d-nnunet demo: error: {error}", file=sys.stderr)
        return 1
    return 0
