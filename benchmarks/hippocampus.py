"""Real anatomy: MSD Task04 Hippocampus, nnU-Net's trainers against the Rep3D trainers, past the first minutes.

Input: any folder in the MSD release layout of Task04 (``dataset.json``, ``imagesTr/``, ``labelsTr/``; labels
1 anterior and 2 posterior hippocampus; default: the 25 cases that ship with the package, a smoke-sized run),
converted with nnU-Net's own ``nnUNetv2_convert_MSD_dataset`` and planned with nnU-Net's default planner (3d_fullres:
patch 40 x 56 x 40, batch 7, 4 stages, features 32-256 on 200 cases). For CPU runs every stage's features are
divided by ``--feature-divisor`` and the batch is set by ``--batch-size``, the same for every trainer (plans
``nnUNetPlans_bench``); a contender may name its own width or batch (the baseline checks of docs/hippocampus.md).

Every contender trains the same folds of nnU-Net's 5-fold split (``splits_final.json``) on one schedule of
``--max-iterations`` (nnU-Net's poly learning-rate decay over all of them). At the log-spaced ``--probes`` it runs
nnU-Net's own validation (``perform_actual_validation``: sliding window on the fold's validation cases, export to
the original geometry, ``compute_metrics_on_folder``; mirroring off unless ``--mirroring``). A run saves nnU-Net's
``checkpoint_latest.pth`` after every epoch and its probe records as they are made (``probes.jsonl`` in its fold
folder): a stopped benchmark resumes inside each run and loses at most one epoch. ``--jobs 2`` trains two runs at
once (one thread each); ``--stop-at N`` ends every run after the probe at N iterations (resume later with a larger
one). ``--speed-iterations`` times one training step of every contender, interleaved in one process on one thread:
the seconds per iteration that the report uses for Dice at equal training time (runs that share the cores do not
give comparable times).

Writes into ``--output``: ``hippocampus.csv`` (one row per fold, contender and probe), ``speed.csv``,
``hippocampus.md`` (tables), ``hippocampus.png`` (Dice vs iterations, log axis, and vs training time) and
``hippocampus_slices.png`` (validation slices). The nnU-Net tree (raw, preprocessed, results with every probe's
validation predictions and the checkpoints) is ``--output``/nnunet.

    python benchmarks/hippocampus.py --data /data/Task04_Hippocampus --output hippocampus_long --jobs 2 \\
        --folds 0 1 2 --speed-iterations 8                      # docs/hippocampus.md, 200 cases, CPU
    python benchmarks/hippocampus.py --data /data/Task04_Hippocampus --device cuda --feature-divisor 1 \\
        --batch-size 0 --iterations 250 --max-iterations 250000 --probes 25000 50000 125000 250000 --mirroring
    python benchmarks/hippocampus.py --plot-only hippocampus_long/hippocampus.csv
"""

from __future__ import annotations

import argparse
import csv
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import convergence  # noqa: E402
from convergence import Contender, read_rows, set_nnunet_paths  # noqa: E402

from rep3d_nnunet.datasets.hippocampus import SUBSET, converter_input  # noqa: E402

PLANS_NAME = convergence.PLANS_NAME
CONFIGURATION = "3d_fullres"
CLASSES = {"1": "anterior", "2": "posterior"}


@dataclass(frozen=True)
class Entry:
    """A contender of the benchmark: the trainer, and the plan it trains on where that differs from the others'.

    Attributes:
        contender: label and trainer (see ``convergence.Contender``).
        control: one of nnU-Net's own trainers (the report compares every Rep3D trainer with the best control).
        feature_divisor, batch_size: this contender's own width and batch (None: the benchmark's ``--feature-divisor``
            and ``--batch-size``); used to check whether the benchmark's reduction handicaps nnU-Net's default.
    """

    contender: Contender
    control: bool = False
    feature_divisor: int | None = None
    batch_size: int | None = None

    @property
    def label(self) -> str:
        return self.contender.label


CONTENDERS = (
    Entry(Contender("nnU-Net (SGD)", "nnUNetTrainer"), control=True),
    Entry(Contender("nnU-Net AdamW 1e-3", "nnUNetTrainerAdam1en3"), control=True),
    Entry(Contender("Rep3D (default)", "nnUNetTrainerRep3D")),
    Entry(Contender("Rep3D fixed prior k=21", "nnUNetTrainerRep3DFixedPrior")),
    Entry(Contender("Rep3D vanilla k=21", "nnUNetTrainerRep3DVanilla")),
    Entry(Contender("Rep3D LRBM k=3", "nnUNetTrainerRep3D", kernel_size=3)),
)
# Not run unless named with --only: UX-Net (optional in the comparison), the checks of nnU-Net's default at the plan's
# width and batch, and the recipe hypotheses of docs/hippocampus.md (each a change to the Rep3D default trainer).
OPTIONAL = (
    Entry(Contender("UX-Net + LRBM k=7", "nnUNetTrainerUXNetLRBM")),
    Entry(Contender("nnU-Net (SGD), full width", "nnUNetTrainer"), control=True, feature_divisor=1),
    Entry(Contender("nnU-Net (SGD), batch 7", "nnUNetTrainer"), control=True, batch_size=7),
    # nnU-Net's own warm-up trainer ramps the learning rate up linearly over 50 of its 1,000 epochs; here over 3 epochs,
    # the same 5% of the benchmark's default schedule (64 epochs of 50 iterations)
    Entry(Contender("nnU-Net (SGD), warm-up 3 epochs", "nnUNetTrainer_warmup",
                    attributes=(("warmup_duration_whole_net", 3),)), control=True),
)
# Recipe hypotheses for the Rep3D default trainer (docs/hippocampus.md, "Choosing the default"). Each spells out every
# setting it is about, starting from the recipe the project released first (0.1.0: plain blocks after one strided conv
# per stage, nn.ConvNd's kernel initialisation, AdamW lr 1e-3, weight decay 0.08 on kernels), so that a run stays what
# its label says when the default trainer changes.
RELEASED_NETWORK = (("stage_convs", "one"), ("block_layer_scale", None), ("block_pointwise", False),
                    ("kernel_init", "default"))
RELEASED_OPTIMIZER = (("lr", 1e-3), ("weight_decay", 0.08), ("amsgrad", False), ("large_kernel_lr", None))


def hypothesis(label: str, network: dict | None = None, optimizer: dict | None = None, base: str = "nnUNetTrainerRep3D",
               kernel_size: int | None = None) -> Entry:
    return Entry(Contender(label, base, kernel_size=kernel_size,
                           rep3d=tuple({**dict(RELEASED_NETWORK), **(network or {})}.items()),
                           optim=tuple({**dict(RELEASED_OPTIMIZER), **(optimizer or {})}.items())))


HYPOTHESES = (
    hypothesis("R0 released recipe"),
    hypothesis("H1 modulated kernel init", {"kernel_init": "modulated"}),
    hypothesis("H2 plan convs + residual blocks", {"stage_convs": "plan", "block_layer_scale": 0.0}),
    hypothesis("H3 nnU-Net's AdamW (amsgrad, wd 3e-5)", optimizer={"amsgrad": True, "weight_decay": 3e-5}),
    hypothesis("H4 large kernels at lr 2e-4", optimizer={"large_kernel_lr": 2e-4}),
    hypothesis("H5 H2 + modulated kernel init", {"stage_convs": "plan", "block_layer_scale": 0.0,
                                                 "kernel_init": "modulated"}),
    hypothesis("H6 H2 + nnU-Net's AdamW", {"stage_convs": "plan", "block_layer_scale": 0.0},
               {"amsgrad": True, "weight_decay": 3e-5}),
    hypothesis("H7 H2 + large kernels at lr 2e-4", {"stage_convs": "plan", "block_layer_scale": 0.0},
               {"large_kernel_lr": 2e-4}),
    hypothesis("H8 H2 + pointwise mixing in the blocks", {"stage_convs": "plan", "block_layer_scale": 0.0,
                                                          "block_pointwise": True}),
)
ALL_ENTRIES = CONTENDERS + OPTIONAL + HYPOTHESES
# the slices figure shows the first contender (nnU-Net's default) beside this one
FIGURE_REP3D = "Rep3D (default)"
CSV_FIELDS = ["fold", "trainer", "trainer_class", "epoch", "iteration", "dice_anterior", "dice_posterior",
              "mean_dice", "train_loss", "seconds_per_iteration", "seconds_per_case", "validation_cases",
              "batch_size", "features", "max_iterations", "mirroring", "device", "control"]
SPEED_FIELDS = ["trainer", "seconds_per_iteration", "steps", "batch_size", "features", "device", "threads"]


class BadInput(Exception):
    """A problem with the user's input: one line naming it and the fix, exit code 2."""


class StopRun(Exception):
    """Raised after the probe at ``--stop-at``: the run's checkpoint_latest.pth is written, a rerun resumes it."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SUBSET),
                        help="a folder in the MSD Task04 layout (default: the 25 cases that ship with the package)")
    parser.add_argument("--output", default="hippocampus_output", help="folder for CSV, tables, plots, nnU-Net tree")
    parser.add_argument("--dataset-id", type=int, default=4, help="nnU-Net dataset id of the converted copy")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2], help="folds of nnU-Net's 5-fold split")
    parser.add_argument("--iterations", type=int, default=50, help="training iterations per epoch")
    parser.add_argument("--max-iterations", type=int, default=3200,
                        help="length of every run: nnU-Net's poly decay runs over these (a multiple of --iterations)")
    parser.add_argument("--probes", type=int, nargs="+", default=None,
                        help="iterations after which nnU-Net's validation runs, multiples of --iterations; the last "
                             "iteration always (default: 100, 200, 400, ... up to --max-iterations)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="end every run after the probe at this iteration (a rerun resumes from there)")
    parser.add_argument("--feature-divisor", type=int, default=4,
                        help="every stage's features divided by this, for every trainer (1: nnU-Net's plan)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size for every trainer (0: the plan's)")
    parser.add_argument("--mirroring", action="store_true", help="validate with mirroring (nnU-Net's default; 8x "
                                                                 "the prediction time in 3D)")
    parser.add_argument("--seed", type=int, default=0, help="torch and numpy seed of every run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (CPU: one thread each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (default: 1 with --jobs > 1, else up to 2)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="labels of the contenders to run (default: the six of the comparison); also the "
                             "optional ones: " + "; ".join(e.label for e in OPTIONAL + HYPOTHESES))
    parser.add_argument("--speed-iterations", type=int, default=0,
                        help="time this many training steps of every contender, interleaved in one process on one "
                             "thread (0: skip)")
    parser.add_argument("--plot-only", default=None, metavar="CSV",
                        help="redraw tables and plots from a CSV (of the --only contenders if given)")
    args = parser.parse_args(argv)
    if args.feature_divisor < 1 or args.batch_size < 0 or args.iterations < 1 or args.jobs < 1:
        parser.error("--feature-divisor, --iterations and --jobs must be >= 1 and --batch-size >= 0")
    if not all(0 <= f < 5 for f in args.folds):
        parser.error(f"--folds must be in 0..4 (nnU-Net's 5-fold split), got {args.folds}")
    return args


def schedule(args) -> tuple[int, list[int], int]:
    """(epochs, probe epochs, the epoch after which runs stop) of the arguments. Raises BadInput."""
    if args.max_iterations < args.iterations or args.max_iterations % args.iterations:
        raise BadInput(f"--max-iterations {args.max_iterations} must be a multiple of --iterations "
                       f"{args.iterations}; pass e.g. --max-iterations {args.iterations * 64}")
    epochs = args.max_iterations // args.iterations
    probes = args.probes or [100 * 2 ** k for k in range(int(math.log2(max(args.max_iterations / 100, 1))) + 1)]
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


def selected_entries(args) -> list[Entry]:
    if args.only is None:
        return list(CONTENDERS)
    by_label = {e.label: e for e in ALL_ENTRIES}
    entries = [by_label[label] for label in dict.fromkeys(args.only) if label in by_label]  # in the order given
    unknown = sorted(set(args.only) - set(by_label))
    if unknown:
        raise BadInput(f"--only {unknown} matched no contender; labels: {[e.label for e in ALL_ENTRIES]}")
    return entries


def class_name(entry: Entry) -> str:
    """The trainer class name of a contender; nnU-Net names its output folder after it."""
    return "Bench_" + re.sub(r"[^A-Za-z0-9]+", "_", entry.label).strip("_")


def plans_name(entry: Entry) -> str:
    suffix = "".join(f"_{key}{value}" for key, value in (("w", entry.feature_divisor), ("b", entry.batch_size))
                     if value is not None)
    return PLANS_NAME + suffix


# ---- the data: MSD folder -> nnU-Net's converter and planner -> benchmark plans ------------------------------------
def check_msd_task04(folder: Path) -> dict:
    """The MSD release layout with the Task04 labels; returns its dataset.json. Raises BadInput otherwise."""
    fix = "pass --data a folder in the MSD release layout (Task04_Hippocampus: dataset.json, imagesTr/, labelsTr/)"
    if not folder.is_dir():
        raise BadInput(f"--data {folder} is not a folder; {fix}")
    if not folder.name.startswith("Task"):
        raise BadInput(f"--data {folder}: nnU-Net's MSD converter needs the folder's name to start with 'Task' "
                       f"(e.g. Task04_Hippocampus); {fix}")
    missing = [name for name in ("dataset.json", "imagesTr", "labelsTr") if not (folder / name).exists()]
    if missing:
        raise BadInput(f"--data {folder} lacks {', '.join(missing)}; {fix}")
    try:
        dataset = json.loads((folder / "dataset.json").read_text())
    except json.JSONDecodeError as error:
        raise BadInput(f"--data {folder}: dataset.json is not JSON ({error}); {fix}") from None
    labels = {str(k) for k in dataset.get("labels", {})}
    if labels != {"0", *CLASSES} or len(dataset.get("modality", {})) != 1 or not dataset.get("training"):
        raise BadInput(f"--data {folder}: dataset.json must list one modality, labels 0, 1 (anterior), 2 (posterior) "
                       f"and training cases as MSD Task04 does (labels here: {sorted(labels)}); {fix}")
    absent = [case["image"] for case in dataset["training"] if not (folder / case["image"]).is_file()]
    if absent:
        raise BadInput(f"--data {folder}: {len(absent)} training images listed in dataset.json are missing "
                       f"(first: {absent[0]}); {fix}")
    return dataset


def prepare_dataset(args, entries: list[Entry]) -> str:
    """nnU-Net's converter and planner on --data, then the benchmark plans; returns the dataset's folder name."""
    data = Path(args.data).resolve()
    check_msd_task04(data)
    preprocessed = Path(os.environ["nnUNet_preprocessed"])
    existing = sorted(preprocessed.glob(f"Dataset{args.dataset_id:03d}_*"))
    if not (existing and (existing[0] / "nnUNetPlans.json").is_file() and (existing[0] / "gt_segmentations").is_dir()
            and (existing[0] / "nnUNetPlans_3d_fullres").is_dir()):
        # the converter needs imagesTs/, which copies of the release often lack: it reads a linked copy instead
        source = converter_input(data, Path(args.output).resolve() / "nnunet" / "msd_source")
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "nnUNet_n_proc_DA": "1"}  # the planner hands this to torch.set_num_threads
        processes = os.environ.get("nnUNet_def_n_proc", "2")
        subprocess.run([str(bin_dir / "nnUNetv2_convert_MSD_dataset"), "-i", str(source), "-overwrite_id",
                        str(args.dataset_id), "-np", processes], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(args.dataset_id), "-c",
                        CONFIGURATION, "-np", processes], env=env, check=True, stdout=subprocess.DEVNULL)
        existing = sorted(preprocessed.glob(f"Dataset{args.dataset_id:03d}_*"))
    folder = existing[0]
    for entry in entries:
        write_bench_plans(folder, entry.feature_divisor or args.feature_divisor,
                          args.batch_size if entry.batch_size is None else entry.batch_size, plans_name(entry))
    return folder.name


def write_bench_plans(preprocessed: Path, feature_divisor: int, batch_size: int, name: str = PLANS_NAME) -> dict:
    """nnU-Net's plans with every stage's features divided by ``feature_divisor`` (and the batch size set unless 0),
    saved as ``name``. Returns the 3d_fullres configuration."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = name
    configuration = plans["configurations"][CONFIGURATION]
    kwargs = configuration["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(1, f // feature_divisor) for f in kwargs["features_per_stage"]]
    if batch_size:
        configuration["batch_size"] = batch_size
    path = preprocessed / f"{name}.json"
    text = json.dumps(plans, indent=2)
    if not path.is_file() or path.read_text() != text:  # parallel jobs read it: only write what changed
        path.write_text(text)
    return configuration


# ---- one contender on one fold: a resumable run ----------------------------------------------------------------------
def nnunet_validation(mirroring: bool):
    """A probe for ``convergence.trainer_class``: nnU-Net's own validation of the fold; its predictions are kept in
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
        dice = {name: float(summary["mean"][label]["Dice"]) for label, name in CLASSES.items()}
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


def _budget(args, plans: dict, entry: Entry, trainer_class: type) -> dict:
    """What a run is: a resumed run must match it (schedule, plan and, for our trainers, the recipe)."""
    configuration = plans["configurations"][CONFIGURATION]
    recipe = " ".join(repr(getattr(trainer_class, name)) for name in ("rep3d", "optim") if hasattr(trainer_class, name))
    return {"max_iterations": args.max_iterations, "iterations": args.iterations, "seed": args.seed,
            "batch_size": configuration["batch_size"], "mirroring": args.mirroring,
            "features": "-".join(map(str, configuration["architecture"]["arch_kwargs"]["features_per_stage"])),
            "recipe": recipe or " ".join(map(str, (entry.contender.base, *entry.contender.attributes)))}


def resumable_trainer_class(entry: Entry, args, epochs: int, probe_epochs: list[int], stop_epoch: int,
                            common: dict):
    """The contender's trainer: nnU-Net's validation at the probe epochs, each record appended to ``probes.jsonl``
    as soon as it is made, ``checkpoint_latest.pth`` after every epoch, StopRun after ``stop_epoch``."""
    probe = nnunet_validation(args.mirroring)
    probed = convergence.trainer_class(entry.contender, epochs, args.iterations, probe_epochs, probe=probe,
                                       name=class_name(entry) + "Probed")

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
    budget = _budget(args, plans, entry, convergence.trainer_class(entry.contender, epochs, args.iterations, []))
    directory = run_folder(folder, entry, fold)
    records = read_records(directory / "probes.jsonl")
    stop_iteration = stop_epoch * args.iterations
    if any(int(r["iteration"]) >= stop_iteration for r in records):
        return f"fold {fold}, {entry.label}: done up to {stop_iteration} iterations"
    budget_file = directory / "budget.json"
    if budget_file.is_file() and json.loads(budget_file.read_text()) != budget:
        raise BadInput(f"{directory} holds a run of another budget or recipe ({budget_file.read_text().strip()}); "
                       f"pass the same --max-iterations, --iterations, --seed, --batch-size, --feature-divisor and "
                       f"--mirroring (and the same trainer settings) to resume it, or another --output")
    latest = directory / "checkpoint_latest.pth"
    if records and not latest.is_file():
        raise BadInput(f"{directory} has probe records but no checkpoint_latest.pth to resume from; delete the folder "
                       f"to run {entry.label} on fold {fold} again")
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / "run.lock", "w")
    try:  # two benchmark processes on one output folder must not train the same run at once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return f"fold {fold}, {entry.label}: being trained by another benchmark process, skipped"
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


def gather_rows(folder: str, entries: list[Entry], folds: list[int]) -> list[dict]:
    """Every probe record of the selected runs, with the seconds per iteration nnU-Net logged (shared cores)."""
    rows = []
    for fold in folds:
        for entry in entries:
            for record in read_records(run_folder(folder, entry, fold) / "probes.jsonl"):
                rows.append({k: str(record.get(k, "")) for k in CSV_FIELDS})
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
        cls = convergence.trainer_class(entry.contender, 1, 1, [], name=class_name(entry) + "Speed")
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
    os.environ["nnUNet_results"] = results  # the timing trainers' logs stay out of the benchmark's runs
    return measure_speed(entries, folder, args)


# ---- report ----------------------------------------------------------------------------------------------------------
def _iterations(rows: list[dict]) -> list[int]:
    return sorted({int(r["iteration"]) for r in rows})


def _trainers(rows: list[dict]) -> list[str]:
    order = [e.label for e in ALL_ENTRIES]
    found = list(dict.fromkeys(r["trainer"] for r in rows))
    return sorted(found, key=lambda t: order.index(t) if t in order else len(order))


def dice_at(rows: list[dict], key: str = "mean_dice") -> dict[tuple[str, int, int], float]:
    """{(trainer, fold, iteration): value}."""
    return {(r["trainer"], int(r["fold"]), int(r["iteration"])): float(r[key]) for r in rows}


def complete_folds(rows: list[dict], iteration: int) -> list[int]:
    """The folds on which every contender in ``rows`` has a probe at ``iteration``: means over different folds per
    contender would not compare like with like."""
    trainers = set(r["trainer"] for r in rows)
    folds = sorted({int(r["fold"]) for r in rows})
    have = {(r["trainer"], int(r["fold"])) for r in rows if int(r["iteration"]) == iteration}
    return [f for f in folds if all((t, f) in have for t in trainers)]


def is_control(rows: list[dict], trainer: str) -> bool:
    return any(r["trainer"] == trainer and r.get("control") == "True" for r in rows)


def best_control(values: dict, rows: list[dict], fold: int, iteration: int) -> tuple[str, float] | None:
    """The nnU-Net control with the highest Dice on this fold at this probe, and that Dice."""
    candidates = [(values[t, fold, iteration], t) for t in _trainers(rows)
                  if is_control(rows, t) and (t, fold, iteration) in values]
    return (max(candidates)[1], max(candidates)[0]) if candidates else None


def dice_table(rows: list[dict]) -> list[str]:
    """Mean Dice of both classes at every probe: mean ± std over the folds every contender has at that probe."""
    values = dice_at(rows)
    iterations = _iterations(rows)
    folds = {i: complete_folds(rows, i) for i in iterations}
    lines = ["**mean Dice (anterior and posterior), mean ± std over folds**\n",
             "| trainer | " + " | ".join(f"{i} it ({len(folds[i])} fold{'s' * (len(folds[i]) != 1)})"
                                       for i in iterations) + " |",
             "| --- |" + " --- |" * len(iterations)]
    for trainer in _trainers(rows):
        cells = []
        for i in iterations:
            v = [values[trainer, f, i] for f in folds[i] if (trainer, f, i) in values]
            cells.append("-" if not v else f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else ""))
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def class_table(rows: list[dict]) -> list[str]:
    """Dice per class at the last probe of those with the most complete folds (a longer probe run on fewer folds
    has its means in the Dice table)."""
    iterations = [i for i in _iterations(rows) if complete_folds(rows, i)]
    if not iterations:
        return []
    last = max(iterations, key=lambda i: (len(complete_folds(rows, i)), i))
    folds = complete_folds(rows, last)
    lines = [f"**Dice per class after {last} iterations** (folds {', '.join(map(str, folds))})\n",
             "| trainer | anterior | posterior | mean |", "| --- | --- | --- | --- |"]
    for trainer in _trainers(rows):
        cells = []
        for key in ("dice_anterior", "dice_posterior", "mean_dice"):
            v = [float(r[key]) for r in rows if r["trainer"] == trainer and int(r["iteration"]) == last
                 and int(r["fold"]) in folds]
            cells.append(f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else ""))
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def paired_table(rows: list[dict]) -> list[str]:
    """Each non-control contender's mean Dice minus the best nnU-Net control's on the same fold and probe (paired:
    folds differ more from each other than contenders on one fold): mean over folds, and on how many folds it is at
    least level. Empty without controls."""
    values = dice_at(rows)
    iterations = [i for i in _iterations(rows) if complete_folds(rows, i)]
    controls = [t for t in _trainers(rows) if is_control(rows, t)]
    if not controls or not iterations:
        return []
    lines = [f"**mean Dice minus the best nnU-Net control ({' / '.join(controls)}, whichever is higher) on the same "
             f"fold and probe: mean over folds (at least level on k of n folds)**\n",
             "| trainer | " + " | ".join(f"{i} it" for i in iterations) + " |", "| --- |" + " --- |" * len(iterations)]
    for trainer in _trainers(rows):
        if trainer in controls:
            continue
        cells = []
        for i in iterations:
            differences = [values[trainer, f, i] - best_control(values, rows, f, i)[1]
                           for f in complete_folds(rows, i)]
            cells.append(f"{np.mean(differences):+.3f} ({sum(d >= 0 for d in differences)}/{len(differences)})")
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def plateau_lines(rows: list[dict]) -> list[str]:
    """The best control's gain over each doubling of the budget, per fold: the budget says something once the last
    doubling adds < 0.01 Dice."""
    values = dice_at(rows)
    iterations = _iterations(rows)
    lines = []
    for fold in sorted({int(r["fold"]) for r in rows}):
        gains = []
        for previous, current in zip(iterations, iterations[1:]):
            a, b = best_control(values, rows, fold, previous), best_control(values, rows, fold, current)
            if a and b and current == 2 * previous:
                gains.append(f"{previous} -> {current}: {b[1] - a[1]:+.3f}")
        if gains:
            lines.append(f"- fold {fold}: best control's gain per doubling: " + ", ".join(gains))
    if lines:
        lines = ["**plateau** (the best nnU-Net control's mean Dice gain over each doubling; < 0.01: plateaued)\n",
                 *lines, ""]
    return lines


def speed_table(rows: list[dict], speed: list[dict]) -> list[str]:
    """Seconds per iteration (one process, interleaved, one thread) and Dice at equal training time: each contender's
    Dice at the last probe reached within the time the reference control needs for each of its probes."""
    if not speed:
        return ["Speed: not measured (run with --speed-iterations N).\n"]
    seconds = {r["trainer"]: float(r["seconds_per_iteration"]) for r in speed}
    reference = next((t for t in _trainers(rows) if is_control(rows, t) and t in seconds), None)
    first = speed[0]
    lines = [f"**speed**: median seconds of one training step (nnU-Net's train_step: forward, loss, backward, "
             f"optimizer), {first['steps']} steps each, contenders interleaved in one process, {first['device']}"
             f"{', one thread' if first['device'] == 'cpu' else ''}, batch {first['batch_size']}\n",
             "| trainer | s / iteration | relative to " + (reference or "-") + " |", "| --- | --- | --- |"]
    for trainer in _trainers(rows) + [t for t in seconds if t not in _trainers(rows)]:
        if trainer in seconds:
            ratio = f"{seconds[trainer] / seconds[reference]:.2f}x" if reference else "-"
            lines.append(f"| {trainer} | {seconds[trainer]:.3f} | {ratio} |")
    lines.append("")
    if reference is None:
        return lines
    values = dice_at(rows)
    iterations = [i for i in _iterations(rows) if complete_folds(rows, i)]
    budgets = [i * seconds[reference] for i in iterations]
    lines += [f"**Dice at equal training time**: mean Dice at the last probe each contender reaches within the "
              f"training time {reference} needs for its probes (time = iterations x s / iteration above; - : not "
              f"even the first probe)\n",
              "| trainer | " + " | ".join(f"{b:.0f} s" for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    for trainer in _trainers(rows):
        if trainer not in seconds:
            continue
        cells = []
        for budget in budgets:
            reached = [i for i in iterations if i * seconds[trainer] <= budget * (1 + 1e-9)]
            if not reached:
                cells.append("-")
                continue
            i = reached[-1]
            v = [values[trainer, f, i] for f in complete_folds(rows, i) if (trainer, f, i) in values]
            cells.append(f"{np.mean(v):.3f} ({i} it)")
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def summary_table(rows: list[dict], speed: list[dict] | None = None) -> str:
    """Markdown: the header, Dice at every probe, per class at the last, paired against the best control, plateau,
    speed and Dice at equal training time."""
    folds = sorted({int(r["fold"]) for r in rows})
    first = rows[0]
    header = (f"Fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))} of nnU-Net's 5-fold split; one "
              f"schedule of {first.get('max_iterations') or '?'} iterations per run (nnU-Net's poly decay over all "
              f"of them), probed on the way; batch {first['batch_size']}, features {first['features']}, mirroring "
              f"{'on' if first['mirroring'] == 'True' else 'off'}, {first['device']}. Dice from nnU-Net's validation "
              f"(compute_metrics_on_folder, mean over the fold's validation cases).\n")
    lines = [header, *dice_table(rows), *class_table(rows), *paired_table(rows), *plateau_lines(rows),
             *speed_table(rows, speed or [])]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, speed: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = {r["trainer"]: float(r["seconds_per_iteration"]) for r in speed or []}
    values = dice_at(rows)
    with plt.style.context("default"):  # nnU-Net's progress plots change matplotlib's global style
        panels = 2 if seconds else 1
        figure, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 5), squeeze=False)
        for panel, axis in enumerate(axes[0]):
            for trainer in _trainers(rows):
                if panel == 1 and trainer not in seconds:
                    continue
                iterations = [i for i in _iterations(rows) if complete_folds(rows, i)]
                per_probe = [[values[trainer, f, i] for f in complete_folds(rows, i) if (trainer, f, i) in values]
                             for i in iterations]
                kept = [(i, v) for i, v in zip(iterations, per_probe) if v]
                if not kept:
                    continue
                x = [i * (seconds[trainer] if panel else 1) for i, _ in kept]
                style = "--" if is_control(rows, trainer) else "-"
                axis.plot(x, [np.mean(v) for _, v in kept], style, marker="o", label=trainer)
                axis.fill_between(x, [min(v) for _, v in kept], [max(v) for _, v in kept], alpha=0.12)
            folds = sorted({int(r["fold"]) for r in rows})
            axis.set_xscale("log", base=2)
            axis.set_xlabel("training iteration" if panel == 0 else "training time (s, one CPU thread, measured "
                                                                      "step time x iterations)")
            axis.set_ylabel("validation Dice, mean of both classes")
            axis.set_title(f"mean and min-max over folds {', '.join(map(str, folds))}", fontsize=10)
            axis.set_ylim(0, 1)
            axis.grid(alpha=0.3, which="both")
        axes[0][-1].legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


def _last_validations(rows: list[dict], results: Path, fold: int, shown: tuple) -> tuple[dict, dict] | None:
    """The last probe's row and validation folder of each contender in ``shown`` on ``fold``; None if a row or
    its predictions (nnU-Net's summary.json) are missing, e.g. a tree rebuilt after earlier folds were run."""
    last = {label: max((r for r in rows if r["trainer"] == label and int(r["fold"]) == fold),
                       key=lambda r: int(r["epoch"]), default=None) for label in shown}
    if any(r is None for r in last.values()):
        return None
    entries = {e.label: e for e in ALL_ENTRIES}
    folders = {label: results / f"{r['trainer_class']}__{plans_name(entries[label]) if label in entries else PLANS_NAME}"
                                f"__{CONFIGURATION}" / f"fold_{fold}" / f"validation_epoch{r['epoch']}"
               for label, r in last.items()}
    return (last, folders) if all((f / "summary.json").is_file() for f in folders.values()) else None


def slices_figure(rows: list[dict], results: Path, raw: Path, path: Path, cases: int = 4) -> bool:
    """A few validation cases of the first fold whose predictions are all present, at the last checkpoint: image,
    ground truth, nnU-Net's and Rep3D's predictions, each at the axial slice where the ground truth is largest.
    False if no fold has them all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel
    from matplotlib.colors import ListedColormap

    shown = (CONTENDERS[0].label, FIGURE_REP3D)
    found = [(fold, chosen) for fold in sorted({int(r["fold"]) for r in rows})
             if (chosen := _last_validations(rows, results, fold, shown)) is not None]
    if not found:
        return False
    fold, (last, folders) = found[0]
    summaries = {label: json.loads((f / "summary.json").read_text()) for label, f in folders.items()}
    per_case = {label: {Path(c["prediction_file"]).name.split(".")[0]: c["metrics"] for c in s["metric_per_case"]}
                for label, s in summaries.items()}
    names = sorted(per_case[shown[0]])[:cases]
    colours = ListedColormap([(0, 0, 0, 0), (0.95, 0.3, 0.2, 0.55), (0.2, 0.6, 1.0, 0.55)])
    with plt.style.context("default"):
        figure, axes = plt.subplots(len(names), 4, figsize=(9.5, 2.9 * len(names)), squeeze=False)
        for row, name in zip(axes, names):
            image = np.asarray(nibabel.load(raw / "imagesTr" / f"{name}_0000.nii.gz").dataobj, dtype=np.float32)
            truth = np.asarray(nibabel.load(raw / "labelsTr" / f"{name}.nii.gz").dataobj)
            z = int(np.argmax((truth > 0).sum(axis=(0, 1))))
            panels = [("image", None, None), ("ground truth", truth, None)]
            panels += [(label, np.asarray(nibabel.load(folders[label] / f"{name}.nii.gz").dataobj),
                        per_case[label][name]) for label in shown]
            for axis, (title, labels, metrics) in zip(row, panels):
                axis.imshow(np.rot90(image[:, :, z]), cmap="gray")
                if labels is not None:
                    axis.imshow(np.rot90(labels[:, :, z]), cmap=colours, vmin=0, vmax=2, interpolation="nearest")
                if metrics is not None:
                    title += f"\nDice {metrics['1']['Dice']:.2f} / {metrics['2']['Dice']:.2f}"
                axis.set_title(f"{name}, z={z}: {title}" if title == "image" else title, fontsize=8)
                axis.axis("off")
        figure.suptitle(f"fold {fold} validation, after {last[shown[0]]['iteration']} iterations; red anterior, "
                        f"blue posterior; Dice anterior / posterior", fontsize=9)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
    return True


def write_report(rows: list[dict], speed: list[dict], output: Path) -> None:
    if not rows:
        print("no probe recorded yet: nothing to report")
        return
    convergence.write_report(rows, output, "hippocampus", draw=lambda kept, path: plot(kept, path, speed),
                             tabulate=lambda kept: summary_table(kept, speed))
    nnunet = output / "nnunet"
    raw = sorted((nnunet / "nnUNet_raw").glob("Dataset*_*"))
    results = sorted((nnunet / "nnUNet_results").glob("Dataset*_*"))
    if raw and results and slices_figure(rows, results[0], raw[0], output / "hippocampus_slices.png"):
        print(f"slices: {output / 'hippocampus_slices.png'}")


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in rows)


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


def run_speed(entries: list[Entry], folder: str, args, output: Path) -> list[dict]:
    """``measure_speed`` in a fresh process whose nnU-Net results folder is its own (the timing trainers write logs)."""
    from concurrent.futures import ProcessPoolExecutor

    results = output / "nnunet" / "speed_results"
    results.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_speed_in_child, (entries, folder, args, str(results))).result()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.plot_only:
            csv_path = Path(args.plot_only)
            if not csv_path.is_file():
                raise BadInput(f"--plot-only {csv_path} is not a file; pass the hippocampus.csv of an earlier run")
            speed_path = csv_path.with_name("speed.csv")
            labels = {e.label for e in selected_entries(args)} if args.only else None
            rows = [r for r in read_rows(csv_path) if labels is None or r["trainer"] in labels]
            write_report(rows, read_rows(speed_path) if speed_path.is_file() else [], csv_path.parent)
            return 0
        check_msd_task04(Path(args.data).resolve())
        entries = selected_entries(args)
        schedule(args)
    except BadInput as problem:
        print(f"hippocampus.py: {problem}", file=sys.stderr)
        return 2
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    set_nnunet_paths(output / "nnunet")
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    # before torch loads OpenMP: on a crowded CPU spinning threads are the cost (an nnU-Net epoch of 7 iterations on
    # the shared 2-core machine: 44-75 s with 2 threads spinning, 8-9 s with 1 thread waiting passively)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    folder = prepare_dataset(args, entries)
    # folds outside, so that every contender has the same folds done first
    jobs = [(entry, folder, fold, args) for fold in args.folds for entry in entries]
    try:
        errors = run_jobs(jobs, args.jobs)
    except BadInput as problem:
        print(f"hippocampus.py: {problem}", file=sys.stderr)
        return 2
    # the CSV holds every run in this output folder; the report the selected contenders
    rows = gather_rows(folder, list(ALL_ENTRIES), list(range(5)))
    write_csv(output / "hippocampus.csv", rows, CSV_FIELDS)
    speed_path = output / "speed.csv"
    if args.speed_iterations:
        measured = {r["trainer"]: r for r in (read_rows(speed_path) if speed_path.is_file() else [])}
        measured.update({r["trainer"]: r for r in run_speed(entries, folder, args, output)})
        write_csv(speed_path, list(measured.values()), SPEED_FIELDS)
    labels = {e.label for e in entries}
    write_report([r for r in rows if r["trainer"] in labels],
                 read_rows(speed_path) if speed_path.is_file() else [], output)
    for error in errors:
        print(f"hippocampus.py: {error[len('ERROR: '):]}", file=sys.stderr)
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
