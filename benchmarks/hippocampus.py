"""Real anatomy: MSD Task04 Hippocampus, nnU-Net's trainers against the Rep3D trainers on one plan and budget.

Input: any folder in the MSD release layout of Task04 (``dataset.json``, ``imagesTr/``, ``labelsTr/``; labels
1 anterior and 2 posterior hippocampus), converted with nnU-Net's own ``nnUNetv2_convert_MSD_dataset`` and planned
with nnU-Net's default planner (3d_fullres: patch 40 x 56 x 40, batch 7, 4 stages, features 32-256 on the 200
shared cases). For CPU runs every stage's features are divided by ``--feature-divisor`` and the batch may be set
with ``--batch-size``, the same for every trainer (plans ``nnUNetPlans_bench``).

Every contender trains the same folds of nnU-Net's 5-fold split (``splits_final.json``) for the same iterations
(nnU-Net's poly schedule over ``--epochs``). After the probe epochs each runs nnU-Net's own validation
(``perform_actual_validation``: sliding window on the fold's validation cases, export to the original geometry,
``compute_metrics_on_folder``; mirroring off unless ``--mirroring``) and records Dice per class, seconds per
training iteration and seconds per validation case. Folds are the outer loop, so at any moment every contender has
the same folds done; the CSV is rewritten after each (fold, contender) and a rerun skips what it holds.

Writes into ``--output``: ``hippocampus.csv``, ``hippocampus.md`` (tables), ``hippocampus.png`` (Dice vs
iteration) and ``hippocampus_slices.png`` (validation slices: image, ground truth, two contenders' predictions).
The nnU-Net tree (raw, preprocessed, results with every probe's validation predictions) is ``--output``/nnunet.

    nice -n 5 python benchmarks/hippocampus.py --output docs/hippocampus --threads 1         # docs/hippocampus.md
    python benchmarks/hippocampus.py --data /data/Task04_Hippocampus --device cuda --feature-divisor 1 \\
        --batch-size 0 --epochs 1000 --iterations 250 --probe-epochs 250 500 1000 --mirroring   # nnU-Net's own
    python benchmarks/hippocampus.py --plot-only docs/hippocampus/hippocampus.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import convergence  # noqa: E402
from convergence import Contender, read_rows, set_nnunet_paths  # noqa: E402

from rep3d_nnunet.datasets.hippocampus import converter_input  # noqa: E402

DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "Task04_Hippocampus"
PLANS_NAME = convergence.PLANS_NAME
CONFIGURATION = "3d_fullres"
CLASSES = {"1": "anterior", "2": "posterior"}
CONTENDERS = (
    Contender("nnU-Net (SGD)", "nnUNetTrainer"),
    Contender("nnU-Net AdamW 1e-3", "nnUNetTrainerAdam1en3"),
    Contender("Rep3D LRBM k=21", "nnUNetTrainerRep3D"),
    Contender("Rep3D fixed prior k=21", "nnUNetTrainerRep3DFixedPrior"),
    Contender("Rep3D vanilla k=21", "nnUNetTrainerRep3DVanilla"),
    Contender("Rep3D LRBM k=3", "nnUNetTrainerRep3D", kernel_size=3),
    Contender("UX-Net + LRBM k=7", "nnUNetTrainerUXNetLRBM"),
)
# the slices figure shows the first contender (nnU-Net's default) beside this one
FIGURE_REP3D = "Rep3D LRBM k=21"
CSV_FIELDS = ["fold", "trainer", "trainer_class", "epoch", "iteration", "dice_anterior", "dice_posterior",
              "mean_dice", "train_loss", "seconds_per_iteration", "seconds_per_case", "validation_cases",
              "batch_size", "features", "mirroring", "device"]


class BadInput(Exception):
    """A problem with the user's input: one line naming it and the fix, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="a folder in the MSD Task04 layout (default: ../shared/data/Task04_Hippocampus)")
    parser.add_argument("--output", default="hippocampus_output", help="folder for CSV, tables, plots, nnU-Net tree")
    parser.add_argument("--dataset-id", type=int, default=4, help="nnU-Net dataset id of the converted copy")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2], help="folds of nnU-Net's 5-fold split")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of --iterations each (nnU-Net's poly decay "
                                                                "runs over these)")
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--probe-epochs", type=int, nargs="+", default=None,
                        help="epochs (1-based) after which nnU-Net's validation runs, the last epoch always "
                             "(default: 1/4, 1/2 and all of --epochs)")
    parser.add_argument("--feature-divisor", type=int, default=4,
                        help="every stage's features divided by this, for every trainer (1: nnU-Net's plan)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size for every trainer (0: the plan's)")
    parser.add_argument("--mirroring", action="store_true", help="validate with mirroring (nnU-Net's default; 8x "
                                                                 "the prediction time in 3D)")
    parser.add_argument("--seed", type=int, default=0, help="torch and numpy seed of every run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: up to 2)")
    parser.add_argument("--only", nargs="+", default=None, help="labels of the contenders to run (default: all)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoint_final.pth of every run")
    parser.add_argument("--plot-only", default=None, metavar="CSV", help="redraw tables and plots from a CSV")
    args = parser.parse_args(argv)
    if args.feature_divisor < 1 or args.batch_size < 0 or args.epochs < 1 or args.iterations < 1:
        parser.error("--feature-divisor, --epochs and --iterations must be >= 1 and --batch-size >= 0")
    if not all(0 <= f < 5 for f in args.folds):
        parser.error(f"--folds must be in 0..4 (nnU-Net's 5-fold split), got {args.folds}")
    return args


def probe_epochs(args) -> list[int]:
    if args.probe_epochs:
        if not all(1 <= e <= args.epochs for e in args.probe_epochs):
            raise BadInput(f"--probe-epochs must be within 1..{args.epochs} (--epochs), got {args.probe_epochs}")
        return sorted(set(args.probe_epochs) | {args.epochs})  # the last: a resumed run checks its budget by it
    return sorted({max(1, round(args.epochs * f)) for f in (1 / 4, 1 / 2, 1)})


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


def prepare_dataset(args) -> str:
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
    write_bench_plans(folder, args.feature_divisor, args.batch_size)
    return folder.name


def write_bench_plans(preprocessed: Path, feature_divisor: int, batch_size: int) -> dict:
    """nnU-Net's plans with every stage's features divided by ``feature_divisor`` (and the batch size set unless 0);
    every contender trains on these. Returns the 3d_fullres configuration."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS_NAME
    configuration = plans["configurations"][CONFIGURATION]
    kwargs = configuration["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(1, f // feature_divisor) for f in kwargs["features_per_stage"]]
    if batch_size:
        configuration["batch_size"] = batch_size
    (preprocessed / f"{PLANS_NAME}.json").write_text(json.dumps(plans, indent=2))
    return configuration


def plans_batch_size(folder: str) -> int:
    plans = json.loads((Path(os.environ["nnUNet_preprocessed"]) / folder / f"{PLANS_NAME}.json").read_text())
    return plans["configurations"][CONFIGURATION]["batch_size"]


# ---- one contender on one fold ---------------------------------------------------------------------------------------
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


def run_contender(contender: Contender, folder: str, fold: int, args) -> list[dict]:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / folder
    plans = load_json(str(preprocessed / f"{PLANS_NAME}.json"))
    plans["continue_training"] = False  # nnUNetTrainer pops this key, which nnU-Net's run_training adds
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    cls = convergence.trainer_class(contender, args.epochs, args.iterations, probe_epochs(args),
                                    probe=nnunet_validation(args.mirroring))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    trainer = cls(plans, CONFIGURATION, fold, dataset_json, torch.device(args.device))
    trainer.run_training()
    # training time only: nnU-Net's epoch timestamps span the training and its 2 per-epoch validation iterations,
    # not the progress plot, checkpointing or the probes that follow them
    train_seconds = float(np.sum(np.subtract(trainer.logger.get_value("epoch_end_timestamps", None),
                                             trainer.logger.get_value("epoch_start_timestamps", None))))
    if not args.keep_checkpoints:
        for checkpoint in Path(trainer.output_folder).glob("checkpoint_*.pth"):
            checkpoint.unlink()
    configuration = plans["configurations"][CONFIGURATION]
    common = {"fold": fold, "trainer": contender.label, "trainer_class": cls.__name__,
              "seconds_per_iteration": round(train_seconds / (args.epochs * args.iterations), 3),
              "batch_size": configuration["batch_size"],
              "features": "-".join(map(str, configuration["architecture"]["arch_kwargs"]["features_per_stage"])),
              "mirroring": args.mirroring, "device": args.device}
    return [{**common, **record} for record in trainer.probe_records]


# ---- report ----------------------------------------------------------------------------------------------------------
def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([float(r[key]) for r in rows]))


PAIRED_REFERENCE = "nnU-Net AdamW 1e-3"  # the same optimizer family as the Rep3D trainers: isolates the network


def paired_table(rows: list[dict], folds: list[int], trainers: list[str]) -> list[str]:
    """Markdown lines: each contender's mean Dice minus the reference's on the same fold, at the last checkpoint (a
    paired comparison: folds differ more from each other than contenders on one fold). Empty with fewer than two
    folds or without the reference."""
    last = max(int(r["iteration"]) for r in rows)
    final = {(r["trainer"], int(r["fold"])): float(r["mean_dice"]) for r in rows if int(r["iteration"]) == last}
    if len(folds) < 2 or not all((PAIRED_REFERENCE, f) in final for f in folds):
        return []
    lines = [f"**mean Dice minus {PAIRED_REFERENCE} on the same fold, after {last} iterations**\n",
             "| trainer | " + " | ".join(f"fold {f}" for f in folds) + " | mean | ahead on |",
             "| --- | " + " | ".join("---" for _ in folds) + " | --- | --- |"]
    for trainer in trainers:
        if trainer == PAIRED_REFERENCE or not all((trainer, f) in final for f in folds):
            continue
        differences = [final[trainer, f] - final[PAIRED_REFERENCE, f] for f in folds]
        lines.append(f"| {trainer} | " + " | ".join(f"{d:+.3f}" for d in differences)
                     + f" | {np.mean(differences):+.3f} | {sum(d > 0 for d in differences)} of {len(folds)} folds |")
    return lines + [""]


def summary_table(rows: list[dict]) -> str:
    """Markdown: one table per checkpoint (Dice per class and mean, mean ± std over folds), then speed."""
    trainers = list(dict.fromkeys(r["trainer"] for r in rows))
    folds = sorted({int(r["fold"]) for r in rows})
    first = rows[0]
    spread = ", mean ± std over folds" if len(folds) > 1 else ""
    lines = [f"Fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))} of nnU-Net's 5-fold split; batch "
             f"{first['batch_size']}, features {first['features']}, mirroring "
             f"{'on' if first['mirroring'] == 'True' else 'off'}, {first['device']}. Dice from nnU-Net's validation "
             f"(compute_metrics_on_folder, mean over the fold's validation cases){spread}.\n"]
    for iteration in sorted({int(r["iteration"]) for r in rows}):
        lines += [f"**after {iteration} iterations**\n", "| trainer | folds | anterior | posterior | mean |",
                  "| --- | --- | --- | --- | --- |"]
        for trainer in trainers:
            selected = [r for r in rows if r["trainer"] == trainer and int(r["iteration"]) == iteration]
            if not selected:
                lines.append(f"| {trainer} | 0 | - | - | - |")
                continue
            cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}" for v in
                     ([float(r[k]) for r in selected] for k in ("dice_anterior", "dice_posterior", "mean_dice"))]
            lines.append(f"| {trainer} | {len(selected)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += paired_table(rows, folds, trainers)
    lines += ["**speed** (training: seconds per iteration, mean over folds; validation: seconds per case, mean over "
              "probes and folds)\n", "| trainer | s / iteration | s / case |", "| --- | --- | --- |"]
    for trainer in trainers:
        selected = [r for r in rows if r["trainer"] == trainer]
        lines.append(f"| {trainer} | {_mean(selected, 'seconds_per_iteration'):.2f} | "
                     f"{_mean(selected, 'seconds_per_case'):.2f} |")
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # nnU-Net's progress plots change matplotlib's global style
        figure, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        for axis, key, title in zip(axes, ("dice_anterior", "dice_posterior", "mean_dice"),
                                    ("anterior", "posterior", "mean of both")):
            for trainer in dict.fromkeys(r["trainer"] for r in rows):
                iterations = sorted({int(r["iteration"]) for r in rows if r["trainer"] == trainer})
                values = [[float(r[key]) for r in rows if r["trainer"] == trainer and int(r["iteration"]) == i]
                          for i in iterations]
                axis.plot(iterations, [np.mean(v) for v in values], marker="o", label=trainer)
                axis.fill_between(iterations, [min(v) for v in values], [max(v) for v in values], alpha=0.12)
            folds = sorted({int(r["fold"]) for r in rows})
            over = f"mean, min-max over folds {', '.join(map(str, folds))}" if len(folds) > 1 else f"fold {folds[0]}"
            axis.set_title(f"validation Dice, {title} ({over})", fontsize=10)
            axis.set_xlabel("training iteration")
            axis.set_ylim(0, 1)
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("validation Dice")
        axes[-1].legend(fontsize=8, loc="best")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


def _last_validations(rows: list[dict], results: Path, fold: int, shown: tuple) -> tuple[dict, dict] | None:
    """The last checkpoint's row and validation folder of each contender in ``shown`` on ``fold``; None if a row or
    its predictions (nnU-Net's summary.json) are missing, e.g. a tree rebuilt after earlier folds were run."""
    last = {label: max((r for r in rows if r["trainer"] == label and int(r["fold"]) == fold),
                       key=lambda r: int(r["epoch"]), default=None) for label in shown}
    if any(r is None for r in last.values()):
        return None
    folders = {label: results / f"{r['trainer_class']}__{PLANS_NAME}__{CONFIGURATION}" / f"fold_{fold}" /
               f"validation_epoch{r['epoch']}" for label, r in last.items()}
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


def complete_folds(rows: list[dict]) -> tuple[list[dict], str]:
    """The rows of the folds that every contender in ``rows`` has finished, and a line naming the folds left out:
    means over different folds per contender would not compare like with like."""
    trainers = set(r["trainer"] for r in rows)
    left_out = []
    for fold in sorted({int(r["fold"]) for r in rows}):
        done = {r["trainer"] for r in rows if int(r["fold"]) == fold}
        if done != trainers:
            left_out.append(f"fold {fold} ({len(done)} of {len(trainers)} contenders done)")
    kept = [r for r in rows if not any(f"fold {r['fold']} " in entry for entry in left_out)]
    return kept, ("Left out of the tables and plots, unfinished: " + ", ".join(left_out) + ".\n") if left_out else ""


def write_report(rows: list[dict], output: Path) -> None:
    rows, note = complete_folds(rows)
    if not rows:
        print("no fold is finished by every contender yet: nothing to report")
        return
    convergence.write_report(rows, output, "hippocampus", draw=plot,
                             tabulate=lambda kept: note + summary_table(kept))
    nnunet = output / "nnunet"
    raw = sorted((nnunet / "nnUNet_raw").glob("Dataset*_*"))
    results = sorted((nnunet / "nnUNet_results").glob("Dataset*_*"))
    if raw and results and slices_figure(rows, results[0], raw[0], output / "hippocampus_slices.png"):
        print(f"slices: {output / 'hippocampus_slices.png'}")


def write_rows(csv_path: Path, rows: list[dict]) -> None:
    with open(csv_path, "w", newline="") as f:  # rewritten after each run: a long benchmark can resume
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.plot_only:
            csv_path = Path(args.plot_only)
            if not csv_path.is_file():
                raise BadInput(f"--plot-only {csv_path} is not a file; pass the hippocampus.csv of an earlier run")
            write_report(read_rows(csv_path), csv_path.parent)
            return 0
        check_msd_task04(Path(args.data).resolve())
        contenders = [c for c in CONTENDERS if args.only is None or c.label in args.only]
        if not contenders:
            raise BadInput(f"--only matched no contender; labels: {[c.label for c in CONTENDERS]}")
        probe_epochs(args)
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
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    folder = prepare_dataset(args)
    csv_path = output / "hippocampus.csv"
    rows = read_rows(csv_path) if csv_path.is_file() else []
    budgets = {(int(r["iteration"]), r["batch_size"]) for r in rows if int(r["epoch"]) == args.epochs}
    if rows and budgets != {(args.epochs * args.iterations, str(plans_batch_size(folder)))}:
        print(f"hippocampus.py: {csv_path} holds runs of another budget (iterations, batch: {sorted(budgets)}); pass "
              f"the same --epochs, --iterations and --batch-size to resume it, or another --output", file=sys.stderr)
        return 2
    done = {(int(r["fold"]), r["trainer"]) for r in rows}
    for fold in args.folds:  # folds outside, so that every contender has the same folds done at any moment
        for contender in contenders:
            if (fold, contender.label) in done:
                print(f"fold {fold}, {contender.label}: already in {csv_path}, skipped")
                continue
            print(f"fold {fold}, {contender.label}", flush=True)
            new_rows = run_contender(contender, folder, fold, args)
            rows += [{k: str(v) for k, v in r.items()} for r in new_rows]
            write_rows(csv_path, rows)
    write_report(rows, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
