"""Convergence on a task that needs long-range context: nnU-Net vs Rep3D vanilla / fixed prior / LRBM (k=21) / LRBM k=3.

Every trainer runs on the same synthetic dataset, the same plans (nnU-Net's own 3d_fullres plan with the feature
counts scaled down equally for all), the same fold and the same number of iterations. At a few checkpoints (the
paper's Table 7 evaluates at 10k/20k/40k/60k of 60k iterations; here at 1/6, 1/3, 2/3 and 1 of the run) each
trainer predicts its validation cases with nnU-Net's sliding-window predictor (no mirroring, to keep CPU runs short)
and the Dice per class is computed against the preprocessed labels, averaged over cases as nnU-Net does.

Writes ``convergence.csv`` (one row per seed, task, trainer and checkpoint) and ``convergence.png`` (mean Dice vs
iteration, mean and min-max over seeds) into ``--output``. Runs in this process: nnU-Net's paths are set before
nnU-Net is imported, data augmentation runs in-process (no workers: two cores are all a CPU run has).

    python benchmarks/convergence.py --output docs/convergence --seeds 0 1 2           # CPU size, ~12 min per seed
    python benchmarks/convergence.py --device cuda --size 96 --epochs 40 --iterations 50 --base-features 32
    python benchmarks/convergence.py --plot-only docs/convergence/convergence.csv

The same probe on a real dataset (the paper's Table 7 at 10k/20k/40k/60k iterations of one 60k run; nnU-Net's paths
from the environment, plans and trainers by name):

    python benchmarks/convergence.py --dataset 741 --plans Rep3DPaperPlans --device cuda --epochs 240 \
        --iterations 250 --probe-epochs 40 80 160 240 --trainers nnUNetTrainerRep3DPaper_Vanilla \
        nnUNetTrainerRep3DPaper_FixedPrior nnUNetTrainerRep3DPaper --output table7
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

from rep3d_nnunet.compare import Contender, trainer_class
from rep3d_nnunet.compare_report import read_rows

# nnU-Net ids must be unique within one tree: one dataset per (task, seed), id = base + seed
DATASET_ID_BASE = {"long_range": 800, "local": 900}
PLANS_NAME = "nnUNetPlans_bench"
CSV_FIELDS = ["seed", "task", "trainer", "epoch", "iteration", "dice_class_1", "dice_class_2", "mean_dice",
              "train_loss", "seconds", "seconds_per_iteration", "device"]


CONTENDERS = (
    Contender("nnU-Net (PlainConvUNet)", "nnUNetTrainer"),
    Contender("Rep3D vanilla k=21", "nnUNetTrainerRep3DVanilla"),
    Contender("Rep3D fixed prior k=21", "nnUNetTrainerRep3DFixedPrior"),
    Contender("Rep3D LRBM k=21", "nnUNetTrainerRep3D"),
    Contender("Rep3D LRBM k=3", "nnUNetTrainerRep3D", kernel_size=3),
)
# the previous default network's blocks (two at every stage; the default has one per stage from stage 1 on): the
# benchmarks' runs of that network keep them whatever the default is (benchmarks/hippocampus.py too)
PREVIOUS_DEFAULT_BLOCKS = (("blocks_per_stage", 2), ("first_block_stage", 0))
# not run unless named with --only: the previous default, for the design check of docs/hippocampus.md beyond Hippocampus
OPTIONAL = (
    Contender("Rep3D D0 (2 blocks at every stage)", "nnUNetTrainerRep3D", rep3d=PREVIOUS_DEFAULT_BLOCKS),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="convergence_output", help="folder for the CSV, plot and nnU-Net tree")
    parser.add_argument("--tasks", nargs="+", default=["long_range"], choices=sorted(DATASET_ID_BASE))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="dataset and training seeds")
    parser.add_argument("--size", type=int, default=32, help="volume edge in voxels (cubic volumes)")
    parser.add_argument("--num-training", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--probe-epochs", type=int, nargs="+", default=None,
                        help="epochs (1-based) after which validation Dice is measured (default: 1/6, 1/3, 2/3, 1)")
    parser.add_argument("--base-features", type=int, default=8, help="features of the first stage, for every trainer")
    parser.add_argument("--max-features", type=int, default=64)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: up to 2); 1 lets two runs share a 2-core machine without "
                             "oversubscribing it")
    parser.add_argument("--only", nargs="+", default=None, help="labels of the contenders to run (default: all)")
    parser.add_argument("--plot-only", default=None, metavar="CSV", help="redraw the plot and table from a CSV")
    parser.add_argument("--dataset", default=None, help="an existing nnU-Net dataset (name or id) instead of the "
                                                        "synthetic one; nnU-Net's paths come from the environment")
    parser.add_argument("--plans", default=None, help=f"plans identifier (default: {PLANS_NAME}, written for the "
                                                      f"synthetic datasets)")
    parser.add_argument("--trainers", nargs="+", default=None,
                        help="trainer names (nnUNetTrainer or Rep3D variants) instead of the default contenders")
    parser.add_argument("--keep-models", action="store_true", help="keep the trained model folders")
    return parser.parse_args(argv)


def probe_epochs(args) -> list[int]:
    if args.probe_epochs:
        return sorted(set(args.probe_epochs))
    return sorted({max(1, round(args.epochs * f)) for f in (1 / 6, 1 / 3, 2 / 3, 1)})


# ---- nnU-Net tree ----------------------------------------------------------------------------------------------------
def set_nnunet_paths(root: Path) -> dict:
    """nnU-Net reads its paths when first imported: set them before any nnunetv2 import."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(root / name)
        (root / name).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("nnUNet_compile", "false")
    os.environ["nnUNet_n_proc_DA"] = "0"
    return dict(os.environ)


def prepare_dataset(root: Path, task: str, seed: int, args) -> str:
    """Synthetic dataset, nnU-Net's planning and preprocessing, and the shared benchmark plans; returns its name."""
    from rep3d_nnunet.datasets.synthetic import generate_synthetic_dataset

    if not 0 <= seed < 100:
        raise ValueError(f"seeds must be in 0..99 (dataset ids are {DATASET_ID_BASE} + seed), got {seed}")
    dataset_id = DATASET_ID_BASE[task] + seed
    name = f"Rep3DConv{task.title().replace('_', '')}S{seed}"
    raw = Path(os.environ["nnUNet_raw"])
    folder = f"Dataset{dataset_id:03d}_{name}"
    if not (Path(os.environ["nnUNet_preprocessed"]) / folder / f"{PLANS_NAME}.json").is_file():
        generate_synthetic_dataset(raw, dataset_id, task=task, num_training=args.num_training, num_test=0,
                                   size=(args.size,) * 3, seed=seed, dataset_name=name, overwrite=True)
        env = {**os.environ, "nnUNet_n_proc_DA": "1"}  # the planner hands this to torch.set_num_threads
        subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                        "-c", "3d_fullres", "-np", "2"], env=env, check=True, stdout=subprocess.DEVNULL)
        write_bench_plans(Path(os.environ["nnUNet_preprocessed"]) / folder, args.base_features, args.max_features)
    return folder


def existing_dataset(name_or_id: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(int(name_or_id) if name_or_id.isdigit() else name_or_id)


def write_bench_plans(preprocessed: Path, base_features: int, max_features: int) -> None:
    """nnU-Net's plans with every stage's features scaled down the same way; all contenders train on these."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS_NAME
    for configuration in plans["configurations"].values():
        kwargs = configuration.get("architecture", {}).get("arch_kwargs")
        if kwargs and "features_per_stage" in kwargs:
            kwargs["features_per_stage"] = [min(max_features, base_features * 2 ** i)
                                            for i in range(len(kwargs["features_per_stage"]))]
    (preprocessed / f"{PLANS_NAME}.json").write_text(json.dumps(plans, indent=2))


# ---- trainers with a validation probe --------------------------------------------------------------------------------
def validation_dice(trainer) -> dict:
    """Dice per foreground class on the fold's validation cases (sliding window, no mirroring), mean over cases."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__, None)
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys)
    per_case = []
    with torch.no_grad():
        for key in dataset.identifiers:
            data, seg, _, _ = dataset.load_case(key)
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:])))
            prediction = logits.argmax(0).cpu().numpy()
            per_case.append(dice_per_class(prediction, np.asarray(seg[:])[0], (1, 2)))
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.network.train()
    dice = np.nanmean(np.array(per_case), axis=0)
    return {"dice_class_1": float(dice[0]), "dice_class_2": float(dice[1]), "mean_dice": float(np.mean(dice))}


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, classes) -> list[float]:
    """Dice per class; NaN where the class is absent from both (nnU-Net's convention), so it is left out of means."""
    values = []
    for c in classes:
        p, r = prediction == c, reference == c
        denominator = p.sum() + r.sum()
        values.append(float("nan") if denominator == 0 else 2.0 * np.logical_and(p, r).sum() / denominator)
    return values


def run_contender(contender: Contender, folder: str, seed: int, task: str, args) -> list[dict]:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / folder
    plans = load_json(str(preprocessed / f"{args.plans or PLANS_NAME}.json"))
    plans["continue_training"] = False  # nnUNetTrainer pops this key, which nnU-Net's run_training adds
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    name = f"{contender.base}Bench" + (f"K{contender.kernel_size}" if contender.kernel_size else "")
    cls = trainer_class(contender, args.epochs, args.iterations, probe_epochs(args),
                        lambda trainer, _: validation_dice(trainer), name)
    torch.manual_seed(seed)
    np.random.seed(seed)
    trainer = cls(plans, "3d_fullres", args.fold, dataset_json, torch.device(args.device))
    started = time.time()
    trainer.run_training()
    seconds = time.time() - started
    if not args.keep_models:
        shutil.rmtree(trainer.output_folder_base, ignore_errors=True)  # checkpoints are not needed, disk is
    rows = []
    for record in trainer.probe_records:
        rows.append({"seed": seed, "task": task, "trainer": contender.label, "seconds": round(seconds, 1),
                     "seconds_per_iteration": round(seconds / (args.epochs * args.iterations), 3),
                     "device": args.device, **record})
    return rows


# ---- report ----------------------------------------------------------------------------------------------------------
def summary_table(rows: list[dict]) -> str:
    """Markdown: mean Dice (mean ± std over seeds, [min, max]) per task, trainer and iteration."""
    lines = []
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        iterations = sorted({int(r["iteration"]) for r in task_rows})
        trainers = list(dict.fromkeys(r["trainer"] for r in task_rows))
        seeds = sorted({int(r["seed"]) for r in task_rows})
        lines.append(f"**{task}** (seeds {', '.join(map(str, seeds))}; mean Dice over classes 1 and 2, "
                     f"mean ± std over seeds [min, max])\n")
        lines.append("| trainer | " + " | ".join(f"{i} it" for i in iterations) + " | s / it |")
        lines.append("| --- |" + " --- |" * (len(iterations) + 1))
        for trainer in trainers:
            cells = []
            for iteration in iterations:
                values = [float(r["mean_dice"]) for r in task_rows
                          if r["trainer"] == trainer and int(r["iteration"]) == iteration]
                cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f} [{min(values):.3f}, {max(values):.3f}]"
                             if values else "-")
            speed = np.mean([float(r["seconds_per_iteration"]) for r in task_rows if r["trainer"] == trainer])
            lines.append(f"| {trainer} | " + " | ".join(cells) + f" | {speed:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nnU-Net's progress plots call seaborn.set(font_scale=2.5), which changes matplotlib's global style
    with plt.style.context("default"):
        _draw(plt, rows, path)


def _draw(plt, rows: list[dict], path: Path) -> None:
    tasks = sorted({r["task"] for r in rows})
    figure, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        for trainer in dict.fromkeys(r["trainer"] for r in task_rows):
            iterations = sorted({int(r["iteration"]) for r in task_rows if r["trainer"] == trainer})
            values = [[float(r["mean_dice"]) for r in task_rows
                       if r["trainer"] == trainer and int(r["iteration"]) == i] for i in iterations]
            mean = [np.mean(v) for v in values]
            axis.plot(iterations, mean, marker="o", label=trainer)
            axis.fill_between(iterations, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        seeds = sorted({r["seed"] for r in task_rows})
        axis.set_title(f"{task}: validation Dice (mean, min-max over {len(seeds)} seed(s))")
        axis.set_xlabel("training iteration")
        axis.set_ylabel("mean Dice (classes 1, 2)")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(rows: list[dict], output: Path, stem: str = "convergence", draw=None, tabulate=None) -> None:
    """``stem``.png, ``stem``.md (and the table on stdout); other benchmarks pass their own ``draw`` and ``tabulate``."""
    (draw or plot)(rows, output / f"{stem}.png")
    table = (tabulate or summary_table)(rows)
    (output / f"{stem}.md").write_text(table)
    print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        csv_path = Path(args.plot_only)
        write_report(read_rows(csv_path), csv_path.parent)
        return 0
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    if args.dataset is None:
        set_nnunet_paths(output / "nnunet")
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    if args.trainers:
        contenders = [Contender(name, name) for name in args.trainers]
    else:
        contenders = list(CONTENDERS) if args.only is None else \
            [c for c in CONTENDERS + OPTIONAL if c.label in args.only]
    if not contenders:
        raise SystemExit(f"--only matched no contender; labels: {[c.label for c in CONTENDERS + OPTIONAL]}")
    csv_path = output / "convergence.csv"
    rows = read_rows(csv_path) if csv_path.is_file() else []
    done = {(int(r["seed"]), r["task"], r["trainer"]) for r in rows}
    for seed in args.seeds:
        for task in ([args.dataset] if args.dataset else args.tasks):
            folder = existing_dataset(args.dataset) if args.dataset else prepare_dataset(output / "nnunet", task, seed,
                                                                                         args)
            for contender in contenders:
                if (seed, task, contender.label) in done:
                    print(f"seed {seed}, {task}, {contender.label}: already in {csv_path}, skipped")
                    continue
                print(f"seed {seed}, {task}, {contender.label}", flush=True)
                new_rows = run_contender(contender, folder, seed, task, args)
                rows += [{k: str(v) for k, v in r.items()} for r in new_rows]
                with open(csv_path, "w", newline="") as f:  # rewritten after each trainer: a long run can resume
                    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                    writer.writeheader()
                    writer.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    write_report(rows, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
