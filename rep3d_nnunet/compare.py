"""``rep3d-nnunet compare``: does Rep3D pay on my data at my budget? nnU-Net's trainers against the Rep3D trainer on
one nnU-Net dataset, per iteration and at equal training time, before a 5-fold run is spent on it.

Every contender trains the same folds of nnU-Net's 5-fold split (``splits_final.json``) from nnU-Net's plans
(fingerprint, planning and preprocessing run where missing) with every stage's features divided by
``--feature-divisor`` and the batch set by ``--batch-size`` (plans ``<source>_bench``), on one schedule of
``--max-iterations`` (nnU-Net's poly learning-rate decay over all of them). Default contenders: nnU-Net's default
trainer (SGD), nnU-Net's AdamW trainer, nnU-Net's residual-encoder preset ResEnc M (``nnUNetPlannerResEncM``'s plans,
nnU-Net's default trainer, the same divisor and batch; the compute-matched control that "nnU-Net Revisited",
MICCAI 2024, asks new architectures to be compared with) and the default Rep3D trainer.

At the ``--probes`` (iterations) each run makes nnU-Net's own validation (``perform_actual_validation``: sliding
window on the fold's validation cases, export, ``compute_metrics_on_folder``; mirroring off unless ``--mirroring``),
appended to ``probes.jsonl`` in its fold folder; nnU-Net's ``checkpoint_latest.pth`` is written after every epoch, so
a stopped comparison resumes inside each run (rerun the same command) and loses at most one epoch.
``--speed-iterations`` times one training step of every contender, interleaved in one process on one thread (or the
GPU): the seconds per step that Dice at equal training time uses. ``--budget-seconds S`` instead gives every
contender its own schedule of S seconds of training at its measured step time, probed at 1/8, 1/4, 1/2 and all of it.

Writes ``compare.csv`` (one row per fold, contender and probe), ``speed.csv``, ``compare.md`` (the tables, also
printed) and ``compare.png`` (Dice against iterations and against training time) into ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import json
import math
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import compare_report
from .nnunet_paths import nnunet_folder, raw_dataset

CONFIGURATION = "3d_fullres"
SOURCE_PLANS = "nnUNetPlans"
# plans identifier -> nnU-Net's planner class that writes it
PLANNERS = {SOURCE_PLANS: "ExperimentPlanner", "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM"}
# what nnU-Net's preprocessing depends on: plans that agree on these can share the preprocessed data
PREPROCESSING_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                      "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs", "preprocessor_name")
RUN_FIELDS = ["fold", "trainer", "trainer_class", "epoch", "iteration"]
RECORD_FIELDS = ["mean_dice", "train_loss", "seconds_per_iteration", "seconds_per_case", "validation_cases",
                 "batch_size", "features", "max_iterations", "mirroring", "device", "control"]
SPEED_FIELDS = ["trainer", "seconds_per_iteration", "steps", "batch_size", "features", "device", "threads"]
BUDGET_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)


class BadInput(ValueError):
    """A problem with the user's input: one line naming it and the fix, exit code 2."""


class StopRun(Exception):
    """Raised after the probe at ``--stop-at``: the run's checkpoint_latest.pth is written, a rerun resumes it."""


@dataclass(frozen=True)
class Contender:
    """A trainer in the comparison: a label for tables and plots, and how to build its class."""

    label: str
    base: str  # a trainer class name nnU-Net finds: one of its own, a Rep3D variant, or one in nnUNet_extTrainer
    kernel_size: int | None = None  # overrides the Rep3D variant's large kernel
    # further changes to a Rep3D variant's settings and optimizer (pairs of Rep3DSettings / OptimizerSettings fields)
    rep3d: tuple[tuple[str, object], ...] = ()
    optim: tuple[tuple[str, object], ...] = ()
    # attributes set on the trainer after nnU-Net's __init__ (e.g. nnUNetTrainer_warmup's warmup_duration_whole_net)
    attributes: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Entry:
    """A contender of the comparison: the trainer, and the plan it trains on where that differs from the others'.

    Attributes:
        contender: label and trainer.
        control: one of nnU-Net's own trainers (the report compares every other contender with the best control).
        feature_divisor, batch_size: this contender's own width and batch (None: the comparison's
            ``--feature-divisor`` and ``--batch-size``).
        plans: the nnU-Net plans its bench plans are made from (``PLANNERS``).
    """

    contender: Contender
    control: bool = False
    feature_divisor: int | None = None
    batch_size: int | None = None
    plans: str = SOURCE_PLANS

    @property
    def label(self) -> str:
        return self.contender.label


CONTENDERS = {
    "nnunet_sgd": Entry(Contender("nnU-Net (SGD)", "nnUNetTrainer"), control=True),
    "nnunet_adamw": Entry(Contender("nnU-Net AdamW 1e-3", "nnUNetTrainerAdam1en3"), control=True),
    "resenc_m": Entry(Contender("nnU-Net ResEnc M", "nnUNetTrainer"), control=True, plans="nnUNetResEncUNetMPlans"),
    "rep3d": Entry(Contender("Rep3D (default)", "nnUNetTrainerRep3D")),
}


def class_name(entry: Entry) -> str:
    """The trainer class name of a contender; nnU-Net names its output folder after it."""
    return "Bench_" + re.sub(r"[^A-Za-z0-9]+", "_", entry.label).strip("_")


def plans_name(entry: Entry) -> str:
    suffix = "".join(f"_{key}{value}" for key, value in (("w", entry.feature_divisor), ("b", entry.batch_size))
                     if value is not None)
    return f"{entry.plans}_bench{suffix}"


def csv_fields(classes: list[str]) -> list[str]:
    return RUN_FIELDS + [f"dice_{name}" for name in classes] + RECORD_FIELDS


# ---- the schedule ----------------------------------------------------------------------------------------------------
def schedule(args) -> tuple[int, list[int], int]:
    """(epochs, probe epochs, the epoch after which runs stop) of the arguments. Raises BadInput."""
    if args.max_iterations < args.iterations or args.max_iterations % args.iterations:
        raise BadInput(f"--max-iterations {args.max_iterations} must be a multiple of --iterations "
                       f"{args.iterations}; pass e.g. --max-iterations {args.iterations * 64}")
    epochs = args.max_iterations // args.iterations
    first = args.iterations * math.ceil(100 / args.iterations)  # the first whole epoch at or past 100 iterations
    probes = args.probes or [first * 2 ** k for k in range(int(math.log2(max(args.max_iterations / first, 1))) + 1)
                             if first * 2 ** k <= args.max_iterations]
    wrong = [p for p in probes if p % args.iterations or not 0 < p <= args.max_iterations]
    if wrong:
        raise BadInput(f"--probes {wrong} are not multiples of --iterations {args.iterations} within "
                       f"--max-iterations {args.max_iterations}; pass probes such as {args.iterations * 2}")
    probe_epochs = sorted({p // args.iterations for p in probes} | {epochs})
    stop = epochs
    if args.stop_at is not None:
        if args.stop_at // args.iterations not in probe_epochs or args.stop_at % args.iterations:
            raise BadInput(f"--stop-at {args.stop_at} is not one of the probes "
                           f"{[e * args.iterations for e in probe_epochs]}; pass one of them")
        stop = args.stop_at // args.iterations
    return epochs, probe_epochs, stop


def timed_schedule(args, seconds_per_iteration: float) -> argparse.Namespace:
    """The arguments of one contender's run under ``--budget-seconds``: as many whole epochs as its measured step time
    fits into the budget (at least one), probed at the epochs that fit into each of ``BUDGET_FRACTIONS`` of it."""
    def epochs_within(seconds: float) -> int:
        return max(1, int(seconds / seconds_per_iteration) // args.iterations)

    own = copy.copy(args)
    own.max_iterations = epochs_within(args.budget_seconds) * args.iterations
    own.probes = sorted({epochs_within(args.budget_seconds * f) * args.iterations for f in BUDGET_FRACTIONS})
    return own


# ---- the data: nnU-Net's fingerprint, planners and preprocessing, then the bench plans ----------------------------
def _nnunet_command(name: str, *arguments: str) -> None:
    # nnU-Net's planner hands nnUNet_n_proc_DA to torch.set_num_threads, which refuses 0 (augmentation in-process)
    env = {**os.environ, "nnUNet_n_proc_DA": str(max(1, int(os.environ.get("nnUNet_n_proc_DA") or 1)))}
    done = subprocess.run([str(Path(sys.executable).parent / name), *arguments], env=env, stdout=subprocess.DEVNULL)
    if done.returncode:
        raise BadInput(f"{name} {' '.join(arguments)} failed (exit code {done.returncode}, nnU-Net's message above); "
                       f"fix the dataset as it says, then run compare again")


def _preprocessed(folder: Path, plans: str) -> bool:
    if not (folder / f"{plans}.json").is_file() or not (folder / "gt_segmentations").is_dir():
        return False
    configurations = json.loads((folder / f"{plans}.json").read_text())["configurations"]
    if CONFIGURATION not in configurations:
        raise BadInput(f"{folder / plans}.json has no {CONFIGURATION} configuration (2D images?): compare trains "
                       f"nnU-Net's {CONFIGURATION}")
    return (folder / configurations[CONFIGURATION]["data_identifier"]).is_dir()


def prepare_dataset(dataset_id: int, entries: list[Entry], feature_divisor: int, batch_size: int) -> str:
    """nnU-Net's fingerprint, planners and preprocessing where missing (the ResEnc planner's plans share nnU-Net's
    preprocessed data when they preprocess alike), then every contender's bench plans; returns the dataset folder's
    name."""
    processes = os.environ.get("nnUNet_def_n_proc", "2")
    root = nnunet_folder("nnUNet_preprocessed")
    existing = sorted(root.glob(f"Dataset{dataset_id:03d}_*"))
    if not (existing and _preprocessed(existing[0], SOURCE_PLANS)):
        _nnunet_command("nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", CONFIGURATION, "-np", processes)
        existing = sorted(root.glob(f"Dataset{dataset_id:03d}_*"))
    folder = existing[0]
    for plans in dict.fromkeys(e.plans for e in entries):
        if plans != SOURCE_PLANS and not (folder / f"{plans}.json").is_file():
            _nnunet_command("nnUNetv2_plan_experiment", "-d", str(dataset_id), "-pl", PLANNERS[plans])
        if not _preprocessed(folder, plans) and not _shared_data_identifier(folder, plans):
            _nnunet_command("nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", plans, "-c", CONFIGURATION,
                            "-np", processes)
    for entry in entries:
        write_bench_plans(folder, entry.feature_divisor or feature_divisor,
                          batch_size if entry.batch_size is None else entry.batch_size, plans_name(entry), entry.plans)
    return folder.name


def _shared_data_identifier(folder: Path, plans: str) -> str | None:
    """nnU-Net's preprocessed data folder if ``plans`` preprocess as nnU-Net's default plans do (a planner that only
    sizes the network differently), else None."""
    ours = json.loads((folder / f"{plans}.json").read_text())["configurations"][CONFIGURATION]
    default = json.loads((folder / f"{SOURCE_PLANS}.json").read_text())["configurations"][CONFIGURATION]
    if all(ours.get(k) == default.get(k) for k in PREPROCESSING_KEYS) and _preprocessed(folder, SOURCE_PLANS):
        return default["data_identifier"]
    return None


def write_bench_plans(preprocessed: Path, feature_divisor: int, batch_size: int, name: str,
                      source: str = SOURCE_PLANS) -> dict:
    """``source`` plans with every stage's features divided by ``feature_divisor`` (and the batch size set unless 0),
    saved as ``name``. Returns the configuration."""
    plans = json.loads((preprocessed / f"{source}.json").read_text())
    plans["plans_name"] = name
    configuration = plans["configurations"][CONFIGURATION]
    if source != SOURCE_PLANS and not (preprocessed / configuration["data_identifier"]).is_dir():
        configuration["data_identifier"] = _shared_data_identifier(preprocessed, source)
    kwargs = configuration["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(1, f // feature_divisor) for f in kwargs["features_per_stage"]]
    if batch_size:
        configuration["batch_size"] = batch_size
    path = preprocessed / f"{name}.json"
    text = json.dumps(plans, indent=2)
    if not path.is_file() or path.read_text() != text:  # parallel jobs read it: only write what changed
        path.write_text(text)
    return configuration


def foreground_classes(dataset_json: dict) -> dict[str, str]:
    """{key of nnU-Net's summary.json: class name} of the foreground labels (lower case, a region's name too)."""
    classes = {}
    for name, value in dataset_json["labels"].items():
        if value == 0 or name == "ignore":
            continue
        key = str(value) if isinstance(value, int) else str(tuple(value) if len(value) > 1 else value[0])
        classes[key] = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return classes


# ---- trainers: a probe at chosen epochs, resumable runs -------------------------------------------------------------
def trainer_class(contender: Contender, epochs: int, iterations: int, probes: list[int], probe, name: str):
    """The contender's trainer class with the run length set and ``probe(trainer, epoch)`` (the record's Dice fields)
    after the ``probes`` epochs; the time it takes is summed in ``probe_seconds``, apart from training time. nnU-Net
    names the output folder after ``name``."""
    from .nnunet_compat import find_trainer_class

    base = find_trainer_class(contender.base)

    class Probed(base):
        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = 2
            for attribute, value in contender.attributes:
                setattr(self, attribute, value)
            self.save_every = 10 ** 6  # checkpoints cost time and disk; the probe records what we need
            self.probe_records: list[dict] = []
            self.probe_seconds = 0.0

        def on_epoch_end(self):
            epoch = self.current_epoch + 1
            super().on_epoch_end()
            if epoch in probes:
                started = time.time()
                record = probe(self, epoch)
                self.probe_seconds += time.time() - started
                record.update(epoch=epoch, iteration=epoch * iterations,
                              train_loss=float(self.logger.get_value("train_losses", step=-1)))
                self.probe_records.append(record)
                per_class = ", ".join(f"{record[k]:.3f}" for k in record if k.startswith("dice_"))
                print(f"  {contender.label}: epoch {epoch}, iteration {epoch * iterations}: "
                      f"mean Dice {record['mean_dice']:.3f} ({per_class})", flush=True)

    attributes = {}
    kernel = {"kernel_size": contender.kernel_size} if contender.kernel_size else {}
    rep3d_changes = {**kernel, **dict(contender.rep3d)}
    if rep3d_changes:
        attributes["rep3d"] = base.rep3d.replace(**rep3d_changes)
    if contender.optim:
        attributes["optim"] = dataclasses.replace(base.optim, **dict(contender.optim))
    return type(name, (Probed,), attributes)


def nnunet_validation(mirroring: bool):
    """A probe for ``trainer_class``: nnU-Net's own validation of the fold; its predictions are kept in
    ``validation_epoch<N>`` beside nnU-Net's ``validation`` folder."""

    def probe(trainer, epoch: int) -> dict:
        axes = trainer.inference_allowed_mirroring_axes
        if not mirroring:
            trainer.inference_allowed_mirroring_axes = None  # nnU-Net's predictor mirrors along these axes
        started = time.time()
        trainer.perform_actual_validation(save_probabilities=False)
        seconds = time.time() - started
        trainer.inference_allowed_mirroring_axes = axes
        folder = Path(trainer.output_folder) / "validation"
        summary = json.loads((folder / "summary.json").read_text())
        kept = folder.with_name(f"validation_epoch{epoch}")
        shutil.rmtree(kept, ignore_errors=True)
        folder.rename(kept)
        cases = len(summary["metric_per_case"])
        dice = {name: float(summary["mean"][key]["Dice"])
                for key, name in foreground_classes(trainer.dataset_json).items()}
        return {**{f"dice_{name}": value for name, value in dice.items()}, "mean_dice": float(np.mean(list(
            dice.values()))), "validation_cases": cases, "seconds_per_case": round(seconds / cases, 3)}

    return probe


def run_folder(folder: str, entry: Entry, fold: int) -> Path:
    """nnU-Net's output folder of a contender's run (``nnUNetTrainer.output_folder``)."""
    return (Path(os.environ["nnUNet_results"]) / folder / f"{class_name(entry)}__{plans_name(entry)}__{CONFIGURATION}"
            / f"fold_{fold}")


def read_records(path: Path) -> list[dict]:
    """The probe records of a run (``probes.jsonl``); a line cut off by a stop is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _budget(args, plans: dict, entry: Entry, trainer: type) -> dict:
    """What a run is: a resumed run must match it (schedule, plan and, for our trainers, the recipe)."""
    configuration = plans["configurations"][CONFIGURATION]
    recipe = " ".join(repr(getattr(trainer, name)) for name in ("rep3d", "optim") if hasattr(trainer, name))
    return {"max_iterations": args.max_iterations, "iterations": args.iterations, "seed": args.seed,
            "batch_size": configuration["batch_size"], "mirroring": args.mirroring,
            "features": "-".join(map(str, configuration["architecture"]["arch_kwargs"]["features_per_stage"])),
            "recipe": recipe or " ".join(map(str, (entry.contender.base, *entry.contender.attributes)))}


def resumable_trainer_class(entry: Entry, args, epochs: int, probe_epochs: list[int], stop_epoch: int,
                            common: dict):
    """The contender's trainer: nnU-Net's validation at the probe epochs, each record appended to ``probes.jsonl``
    as soon as it is made, ``checkpoint_latest.pth`` after every epoch, StopRun after ``stop_epoch``."""
    probe = nnunet_validation(args.mirroring)
    probed = trainer_class(entry.contender, epochs, args.iterations, probe_epochs, probe, class_name(entry) + "Probed")

    class Resumable(probed):
        # nnUNetTrainer records its constructor's arguments by name (for checkpoints): the signature is spelled out
        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.save_every = 1  # nnU-Net writes checkpoint_latest.pth after every epoch but the last

        def record_probe(self, epoch: int) -> None:
            """Appends this epoch's probe record (made by ``Probed.on_epoch_end`` or by ``probe_now``)."""
            record = {**common, **self.probe_records[-1]}
            with open(Path(self.output_folder) / "probes.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

        def probe_now(self, epoch: int) -> None:
            """The probe of a finished epoch whose validation a stop interrupted (the checkpoint is of that epoch)."""
            record = probe(self, epoch)
            record.update(epoch=epoch, iteration=epoch * args.iterations,
                          train_loss=float(self.logger.get_value("train_losses", step=-1)))
            self.probe_records.append(record)
            self.record_probe(epoch)

        def on_epoch_end(self):
            made = len(self.probe_records)
            super().on_epoch_end()  # nnU-Net's logging and checkpoint, then the probe
            if len(self.probe_records) > made:
                self.record_probe(self.current_epoch)
            if self.current_epoch >= stop_epoch and self.current_epoch < self.num_epochs:
                raise StopRun()

    return type(class_name(entry), (Resumable,), {})


def run_job(entry: Entry, folder: str, fold: int, args) -> str:
    """Trains (or resumes) one contender on one fold up to the stop epoch; returns a line saying what it did."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if args.device == "cpu":
        torch.set_num_threads(args.threads or (1 if args.jobs > 1 else min(2, os.cpu_count() or 1)))
    epochs, probe_epochs, stop_epoch = schedule(args)
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / folder
    plans = load_json(str(preprocessed / f"{plans_name(entry)}.json"))
    budget = _budget(args, plans, entry, trainer_class(entry.contender, epochs, args.iterations, [], None, "Budget"))
    directory = run_folder(folder, entry, fold)
    records = read_records(directory / "probes.jsonl")
    stop_iteration = stop_epoch * args.iterations
    budget_file = directory / "budget.json"
    if budget_file.is_file() and json.loads(budget_file.read_text()) != budget:  # before "done": its probes differ
        raise BadInput(f"{directory} holds a run of another budget or recipe ({budget_file.read_text().strip()}); "
                       f"pass the same --max-iterations (or --budget-seconds), --iterations, --seed, --batch-size, "
                       f"--feature-divisor and --mirroring (and the same trainer settings) to resume it, or delete "
                       f"that folder to start it again")
    if any(int(r["iteration"]) >= stop_iteration for r in records):
        return f"fold {fold}, {entry.label}: done up to {stop_iteration} iterations"
    latest = directory / "checkpoint_latest.pth"
    if records and not latest.is_file():
        raise BadInput(f"{directory} has probe records but no checkpoint_latest.pth to resume from; delete the folder "
                       f"to run {entry.label} on fold {fold} again")
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / "run.lock", "w")
    try:  # two processes on one nnU-Net tree must not train the same run at once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return f"fold {fold}, {entry.label}: being trained by another process, skipped"
    plans["continue_training"] = False  # nnUNetTrainer pops this key, which nnU-Net's run_training adds
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    common = {"fold": fold, "trainer": entry.label, "trainer_class": class_name(entry), "device": args.device,
              "control": entry.control, **budget}
    cls = resumable_trainer_class(entry, args, epochs, probe_epochs, stop_epoch, common)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    trainer = cls(plans, CONFIGURATION, fold, dataset_json, torch.device(args.device))
    budget_file.write_text(json.dumps(budget))
    resumed = ""
    if latest.is_file():
        trainer.load_checkpoint(str(latest))
        done = trainer.current_epoch
        resumed = f" (resumed after {done * args.iterations} iterations)"
        if done in probe_epochs and not any(int(r["epoch"]) == done for r in records):
            trainer.on_train_start()  # the validation needs the dataloaders and folders run_training makes
            trainer.probe_now(done)
        if done >= stop_epoch:
            return f"fold {fold}, {entry.label}: done up to {stop_iteration} iterations{resumed}"
    try:
        trainer.run_training()
    except StopRun:
        pass
    return f"fold {fold}, {entry.label}: trained to {stop_iteration} iterations{resumed}"


def _run_job_in_worker(job) -> str:
    entry, folder, fold, args = job
    try:
        return run_job(entry, folder, fold, args)
    except BadInput as problem:
        return f"ERROR: {problem}"


def run_jobs(jobs: list, workers: int) -> list[str]:
    """Runs the (entry, folder, fold, args) jobs, ``workers`` at a time in fresh processes (nnU-Net's validation
    starts worker pools of its own, so they are not daemonic); returns the errors."""
    if workers == 1:
        for job in jobs:
            print(run_job(*job), flush=True)
        return []
    from concurrent.futures import ProcessPoolExecutor, as_completed

    errors = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_run_job_in_worker, job): job for job in jobs}
        for future in as_completed(futures):
            line = future.result()
            print(line, flush=True)
            if line.startswith("ERROR"):
                errors.append(line)
    return errors


def gather_rows(folder: str, entries: list[Entry], folds: list[int], fields: list[str]) -> list[dict]:
    """Every probe record of the runs of ``entries`` on ``folds``, as CSV rows of ``fields``."""
    rows = []
    for fold in folds:
        for entry in entries:
            for record in read_records(run_folder(folder, entry, fold) / "probes.jsonl"):
                rows.append({k: str(record.get(k, "")) for k in fields})
    return rows


# ---- speed: one training step of each contender, interleaved in one process ----------------------------------------
def measure_speed(entries: list[Entry], folder: str, args) -> list[dict]:
    """Median seconds of nnU-Net's ``train_step`` (forward, loss, backward, optimizer) per contender on one batch of
    fold 0, the contenders interleaved round by round in this process on one CPU thread (or the GPU), the first round
    left out (warm-up). Data loading is not timed: it is the same for every contender."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if args.device == "cpu":
        torch.set_num_threads(1)
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / folder
    steps = {}
    for entry in entries:
        plans = {**load_json(str(preprocessed / f"{plans_name(entry)}.json")), "continue_training": False}
        cls = trainer_class(entry.contender, 1, 1, [], None, class_name(entry) + "Speed")
        trainer = cls(plans, CONFIGURATION, 0, load_json(str(preprocessed / "dataset.json")),
                      torch.device(args.device))
        trainer.initialize()
        loader, _ = trainer.get_dataloaders()
        batch = next(loader)
        trainer.network.train()
        steps[entry.label] = (trainer, batch, [])
    for _ in range(args.speed_iterations + 1):
        for trainer, batch, times in steps.values():
            if args.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            trainer.train_step(batch)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    rows = []
    for label, (trainer, batch, times) in steps.items():
        configuration = trainer.configuration_manager
        rows.append({"trainer": label, "seconds_per_iteration": f"{statistics.median(times[1:]):.4f}",
                     "steps": str(len(times) - 1), "batch_size": str(configuration.batch_size),
                     "features": "-".join(map(str, configuration.network_arch_init_kwargs["features_per_stage"])),
                     "device": args.device, "threads": "1" if args.device == "cpu" else "-"})
    return rows


def _measure_speed_in_child(job) -> list[dict]:
    entries, folder, args, results = job
    os.environ["nnUNet_results"] = results  # the timing trainers' logs stay out of the comparison's runs
    os.environ["nnUNet_n_proc_DA"] = "0"  # one batch is all it needs: no augmentation workers
    return measure_speed(entries, folder, args)


def run_speed(entries: list[Entry], folder: str, args, output: Path) -> list[dict]:
    """``measure_speed`` in a fresh process whose nnU-Net results folder is its own (the timing trainers write logs)."""
    from concurrent.futures import ProcessPoolExecutor

    results = output / "speed_results"
    results.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_speed_in_child, (entries, folder, args, str(results))).result()


def update_speed(entries: list[Entry], folder: str, args, output: Path, path: Path, again: bool) -> dict[str, float]:
    """``path``'s step times, those of ``entries`` measured where missing (all of them with ``again``); returns
    {label: seconds per iteration}."""
    measured = {r["trainer"]: r for r in (compare_report.read_rows(path) if path.is_file() else [])}
    missing = [e for e in entries if again or e.label not in measured]
    if missing:
        measured.update({r["trainer"]: r for r in run_speed(missing, folder, args, output)})
        compare_report.write_csv(path, list(measured.values()), SPEED_FIELDS)
    return {label: float(r["seconds_per_iteration"]) for label, r in measured.items()}


# ---- the command -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None, contenders: bool = True) -> None:
    """Arguments of ``rep3d-nnunet compare``; ``defaults`` replaces some (a given ``dataset_id`` makes -d optional),
    ``contenders`` False leaves out --contenders (a caller with contenders of its own)."""
    defaults = defaults or {}
    parser.add_argument("-d", "--dataset-id", required="dataset_id" not in defaults, type=int,
                        help="nnU-Net dataset id (in nnUNet_raw)")
    parser.add_argument("--output", help="folder for the CSV, speed.csv, tables and plot (default: "
                                         "$nnUNet_results/DatasetXXX_Name/rep3d_compare)")
    if contenders:
        parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                            help=f"keys of the default contenders ({', '.join(CONTENDERS)}) or trainer class names "
                                 f"that nnU-Net finds (default: all four)")
    parser.add_argument("--feature-divisor", type=int, default=1,
                        help="every stage's features divided by this, for every contender (1: the plan's; "
                             "default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="batch size of every contender (0: the plan's; default %(default)s)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0],
                        help="folds of nnU-Net's 5-fold split (default %(default)s)")
    parser.add_argument("--iterations", type=int, default=250,
                        help="training iterations per epoch (default %(default)s, nnU-Net's)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-iterations", type=int, default=None,
                        help="length of every run in iterations, a multiple of --iterations: nnU-Net's poly decay "
                             "runs over these (default %(default)s; none: 20 epochs)")
    budget.add_argument("--budget-seconds", type=float, default=None,
                        help="length of every run in seconds of training instead: each contender's iterations from "
                             "its measured seconds per step, probed at 1/8, 1/4, 1/2 and all of it")
    parser.add_argument("--probes", type=int, nargs="+", default=None,
                        help="iterations after which nnU-Net's validation runs, multiples of --iterations; the last "
                             "iteration always (default: doubling from the first epoch end at or past 100, e.g. "
                             "100, 200, 400, ... with --iterations 50)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="end every run after the probe at this iteration (rerun to resume from there)")
    parser.add_argument("--speed-iterations", type=int, default=5,
                        help="time this many training steps of every contender, interleaved in one process on one "
                             "thread or the GPU (0: skip; default %(default)s)")
    parser.add_argument("--mirroring", action="store_true", help="validate with mirroring (nnU-Net's default; 8x "
                                                                 "the prediction time in 3D)")
    parser.add_argument("--seed", type=int, default=0, help="torch and numpy seed of every run")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if there is one")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (CPU: one thread each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (default: 1 with --jobs > 1, else up to 2)")
    parser.set_defaults(**defaults)


def selected_entries(names: list[str]) -> list[Entry]:
    """The contenders named by key or trainer class name. Raises BadInput for a name that is neither."""
    from .nnunet_compat import TrainerNotFoundError, find_trainer_class

    entries = []
    for name in dict.fromkeys(names):
        if name in CONTENDERS:
            entries.append(CONTENDERS[name])
            continue
        try:
            trainer = find_trainer_class(name)
        except TrainerNotFoundError:
            raise BadInput(f"--contenders {name!r} is neither a default contender ({', '.join(CONTENDERS)}) nor a "
                           f"trainer nnU-Net finds; rep3d-nnunet trainers lists ours") from None
        entries.append(Entry(Contender(name, name), control=trainer.__module__.startswith("nnunetv2.")))
    return entries


def check_arguments(args) -> None:
    """Everything about the arguments that can be checked before anything is written. Raises BadInput."""
    if args.feature_divisor < 1 or args.batch_size < 0 or args.iterations < 1 or args.jobs < 1:
        raise BadInput("--feature-divisor, --iterations and --jobs must be >= 1 and --batch-size >= 0")
    if not all(0 <= f < 5 for f in args.folds):
        raise BadInput(f"--folds must be in 0..4 (nnU-Net's 5-fold split), got {args.folds}")
    if args.budget_seconds is not None:
        if args.budget_seconds <= 0 or args.probes or args.stop_at is not None:
            raise BadInput("--budget-seconds must be > 0 and sets every contender's probes itself: leave out "
                           "--probes and --stop-at")
        if not args.speed_iterations:
            raise BadInput("--budget-seconds needs the measured step times: pass --speed-iterations N (N >= 1)")
    else:
        schedule(args)


def run_from_args(args: argparse.Namespace) -> int:
    if args.max_iterations is None and args.budget_seconds is None:
        args.max_iterations = 20 * args.iterations
    check_arguments(args)
    raw = raw_dataset(args.dataset_id)
    for variable in ("nnUNet_preprocessed", "nnUNet_results"):
        nnunet_folder(variable)
    entries = selected_entries(args.contenders)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    output = Path(args.output) if args.output else nnunet_folder("nnUNet_results") / raw.name / "rep3d_compare"
    return compare(args, entries, output)


def compare(args, entries: list[Entry], output: Path, stem: str = "compare", recorded: list[Entry] | None = None,
            report=None, prog: str = "rep3d-nnunet compare: error") -> int:
    """Plans where missing, trains (or resumes) every contender on every fold, measures the step times and writes
    the report; returns the exit status (2 if a run refused to resume).

    Args:
        args: the command's arguments (``add_arguments``), checked by ``check_arguments``.
        output: folder of ``stem``.csv (the probes of every run of ``recorded``, default ``entries``, on any fold),
            speed.csv and the report.
        report: ``report(rows, speed, output)`` writes and prints the report of ``entries``' rows (default:
            ``write_report``).
        prog: what error lines start with.
    """
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    # before torch loads OpenMP: on a crowded CPU spinning threads are the cost (an nnU-Net epoch of 7 iterations on
    # a shared 2-core machine: 44-75 s with 2 threads spinning, 8-9 s with 1 thread waiting passively)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    folder = prepare_dataset(args.dataset_id, entries, args.feature_divisor, args.batch_size)
    speed_path = output / "speed.csv"
    if args.budget_seconds is not None:
        seconds = update_speed(entries, folder, args, output, speed_path, again=False)  # kept: runs resume
        own = {e.label: timed_schedule(args, seconds[e.label]) for e in entries}
    else:
        own = {e.label: args for e in entries}
    # folds outside, so that every contender has the same folds done first
    jobs = [(entry, folder, fold, own[entry.label]) for fold in args.folds for entry in entries]
    errors = run_jobs(jobs, args.jobs)
    dataset_json = json.loads((Path(os.environ["nnUNet_preprocessed"]) / folder / "dataset.json").read_text())
    fields = csv_fields(list(foreground_classes(dataset_json).values()))
    rows = gather_rows(folder, recorded or entries, list(range(5)), fields)
    compare_report.write_csv(output / f"{stem}.csv", rows, fields)
    if args.speed_iterations and args.budget_seconds is None:
        update_speed(entries, folder, args, output, speed_path, again=True)
    speed = compare_report.read_rows(speed_path) if speed_path.is_file() else []
    labels = {e.label for e in entries}
    (report or (lambda *a: write_report(*a, stem=stem)))([r for r in rows if r["trainer"] in labels], speed, output)
    for error in errors:
        print(f"{prog}: {error[len('ERROR: '):]}", file=sys.stderr)
    return 2 if errors else 0


def write_report(rows: list[dict], speed: list[dict], output: Path, stem: str = "compare") -> None:
    if not rows:
        print("no probe recorded yet: nothing to report")
        return
    print(compare_report.write_report(rows, speed, output, stem))
    print(f"tables: {output / f'{stem}.md'}, plot: {output / f'{stem}.png'}, rows: {output / f'{stem}.csv'}")
