"""Low-data transfer on synthetic data: linear probing, full fine-tuning, a standard adapter and dual-kernel adapters.

The DKA paper's claim, at the smallest fractions: DKA > linear probing > standard adapter. The protocol here:

1. source: nnU-Net's default network (PlainConvUNet, the plan's features scaled to 8-64 as in
   ``benchmarks/convergence.py``) pretrained once with nnU-Net's own ``nnUNetTrainer_5epochs`` (5 x 250 iterations)
   on the synthetic *local* task (24 cases: bright blobs are class 1, dark ones class 2);
2. target: the synthetic *long_range* task (a different rule: every blob looks alike and its class is the polarity of
   a marker plate at least 16 voxels away), 20 cases, on the source's plans (``nnUNetv2_move_plans_between_datasets``,
   ``nnUNetv2_preprocess``), split with ``rep3d-nnunet split``'s protocol: a fixed test set of 5 cases, fold 0
   training on 1, 2 or 4 of the other cases;
3. every method fine-tunes fold 0 from the source checkpoint through nnU-Net's ``-pretrained_weights`` path for the
   same number of iterations (default 18 x 25 = 450, batch 2), with the paper's rates (adapters 1e-3, head and
   full fine-tuning 1e-4); nnU-Net does not transfer the segmentation layers, so every head starts from scratch;
   Dice per class on the 5 held-out test cases (sliding window, no mirroring).

Writes ``transfer.csv`` (resumable), ``transfer.md`` (mean ± std over seeds) and ``transfer.png`` into --output.

    python benchmarks/transfer.py --output docs/transfer --seeds 0 1 2          # CPU size
    python benchmarks/transfer.py --plot-only docs/transfer/transfer.csv
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
from convergence import dice_per_class, read_rows, set_nnunet_paths, write_bench_plans  # noqa: E402

SOURCE_ID, TARGET_ID = 850, 851
SOURCE_NAME, TARGET_NAME = "Rep3DTransferSourceLocal", "Rep3DTransferTargetLongRange"
PLANS = "nnUNetPlans_bench"
SOURCE_TRAINER = "nnUNetTrainer_5epochs"  # nnU-Net's own: the fine-tuning finds it by the name in the checkpoint
# label -> (fine-tuning method of rep3d_nnunet.variants, head); the trainer name follows from both
METHODS = {
    "linear probing": ("nnUNetTrainerDKA_LinearProbe", "seg_layers"),
    "full fine-tuning": ("nnUNetTrainerDKA_FullFinetune", "seg_layers"),
    "standard adapter": ("nnUNetTrainerDKA_Adapter", "seg_layers"),
    "DKA (dual)": ("nnUNetTrainerDKA", "seg_layers"),
    "DKA large only": ("nnUNetTrainerDKA_Large", "seg_layers"),
    "DKA small only": ("nnUNetTrainerDKA_Small", "seg_layers"),
    "DKA (dual), decoder head": ("nnUNetTrainerDKA", "decoder"),
    "linear probing, decoder head": ("nnUNetTrainerDKA_LinearProbe", "decoder"),
}
# controls outside the paper's rates: is linear probing low because a head at 1e-4 barely moves in this budget?
HEAD_LR = {"linear probing, head lr 1e-3": 1e-3}
METHODS["linear probing, head lr 1e-3"] = ("nnUNetTrainerDKA_LinearProbe", "seg_layers")
CSV_FIELDS = ["seed", "training_cases", "method", "trainer", "dice_class_1", "dice_class_2", "mean_dice",
              "seconds", "seconds_per_iteration", "device"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="transfer_output", help="folder for the CSV, table, plot, nnU-Net tree")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the training samples and runs")
    parser.add_argument("--cases", type=int, nargs="+", default=[1, 2, 4], help="target training cases per run")
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--iterations", type=int, default=25, help="fine-tuning iterations per epoch")
    parser.add_argument("--size", type=int, default=32, help="volume edge in voxels")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: up to 2)")
    parser.add_argument("--keep-models", action="store_true", help="keep the fine-tuned model folders (for pictures)")
    parser.add_argument("--plot-only", default=None, metavar="CSV", help="redraw table and plot from a CSV")
    return parser.parse_args(argv)


def _console(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(command: list[str], env: dict | None = None) -> None:
    subprocess.run([_console(command[0]), *command[1:]], env=env or dict(os.environ), check=True,
                   stdout=subprocess.DEVNULL)


def _folder(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def prepare(args) -> Path:
    """Source and target datasets, the shared plans, the pretrained source; returns the source checkpoint."""
    from rep3d_nnunet.datasets.synthetic import generate_synthetic_dataset

    raw, preprocessed, results = (Path(os.environ[n]) for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    planning_env = {**os.environ, "nnUNet_n_proc_DA": "1"}  # the planner hands this to torch.set_num_threads
    source_folder, target_folder = _folder(SOURCE_ID, SOURCE_NAME), _folder(TARGET_ID, TARGET_NAME)
    if not (preprocessed / source_folder / f"{PLANS}.json").is_file():
        generate_synthetic_dataset(raw, SOURCE_ID, task="local", num_training=24, num_test=0, size=(args.size,) * 3,
                                   seed=100, dataset_name=SOURCE_NAME, overwrite=True)
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(SOURCE_ID), "-c", "3d_fullres", "-np", "2"], planning_env)
        write_bench_plans(preprocessed / source_folder, 8, 64)
    if not list((preprocessed / target_folder).glob("*_3d_fullres")):  # the preprocessed data, the last step
        generate_synthetic_dataset(raw, TARGET_ID, task="long_range", num_training=20, num_test=0,
                                   size=(args.size,) * 3, seed=200, dataset_name=TARGET_NAME, overwrite=True)
        # nnU-Net's transfer recipe: the target's own fingerprint and plans first, then the source's plans moved over
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(TARGET_ID), "-c", "3d_fullres", "-np", "2", "--no_pp"],
             planning_env)
        _run(["nnUNetv2_move_plans_between_datasets", "-s", str(SOURCE_ID), "-t", str(TARGET_ID), "-sp", PLANS,
              "-tp", PLANS], planning_env)
        _run(["nnUNetv2_preprocess", "-d", str(TARGET_ID), "-plans_name", PLANS, "-c", "3d_fullres", "-np", "2"],
             planning_env)
    checkpoint = results / source_folder / f"{SOURCE_TRAINER}__{PLANS}__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        print(f"pretraining the source: nnUNetv2_train {SOURCE_ID} 3d_fullres 0 -tr {SOURCE_TRAINER} -p {PLANS}",
              flush=True)
        started = time.time()
        _run(["nnUNetv2_train", str(SOURCE_ID), "3d_fullres", "0", "-tr", SOURCE_TRAINER, "-p", PLANS, "-device",
              args.device])
        print(f"  ({time.time() - started:.0f} s)", flush=True)
    return checkpoint


def write_target_split(training_cases: int, seed: int) -> list[str]:
    """``rep3d-nnunet split``'s protocol with ``training_cases`` per fold; returns the test cases."""
    from rep3d_nnunet.splits import LOWDATA_FILE, write_split

    # 20 cases: 5 test, 15 in the folds; a fraction of the 15 that rounds to the wanted count
    write_split(TARGET_ID, fraction=training_cases / 15, seed=seed, test_fraction=0.25, force=True)
    lowdata = json.loads((Path(os.environ["nnUNet_preprocessed"]) / _folder(TARGET_ID, TARGET_NAME)
                          / LOWDATA_FILE).read_text())
    assert lowdata["training_cases_per_fold"] == training_cases, lowdata
    return lowdata["test"]


def benchmark_trainer(name: str, epochs: int, iterations: int, head_lr: float | None = None):
    """The method's trainer with the run length (and, for a control, the head's rate) set, one validation batch per
    epoch and no final validation (the held-out test cases are evaluated instead)."""
    from rep3d_nnunet.variants import make_trainer_class

    base = make_trainer_class(name)

    class Timed(base):
        num_epochs_override = epochs
        iterations_per_epoch_override = iterations
        val_iterations_per_epoch_override = 1
        optim = base.optim if head_lr is None else base.optim.replace(head_lr=head_lr)

        def perform_actual_validation(self, save_probabilities: bool = False):
            pass

    Timed.__name__ = name
    return Timed


def test_dice(trainer, test_cases: list[str]) -> list[float]:
    """Mean Dice per class (1, 2) over the test cases, from the preprocessed data (no mirroring)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    network = trainer.network
    network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__, None)
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, test_cases)
    per_case = []
    with torch.no_grad():
        for key in dataset.identifiers:
            data, seg, _, _ = dataset.load_case(key)
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:])))
            per_case.append(dice_per_class(logits.argmax(0).cpu().numpy(), np.asarray(seg[:])[0], (1, 2)))
    return [float(v) for v in np.nanmean(np.array(per_case), axis=0)]


def run_method(label: str, training_cases: int, seed: int, source: Path, test_cases: list[str], args) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from rep3d_nnunet.variants import finetuning_trainer

    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / _folder(TARGET_ID, TARGET_NAME)
    plans = load_json(str(preprocessed / f"{PLANS}.json"))
    plans["continue_training"] = False  # nnUNetTrainer pops this key, which nnU-Net's run_training adds
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    torch.manual_seed(seed)
    np.random.seed(seed)
    trainer_name = finetuning_trainer(*METHODS[label])
    trainer = benchmark_trainer(trainer_name, args.epochs, args.iterations, HEAD_LR.get(label))(
        plans, "3d_fullres", 0, dataset_json, torch.device(args.device))
    started = time.time()
    maybe_load_checkpoint(trainer, False, False, str(source))  # nnUNetv2_train's -pretrained_weights path
    trainer.run_training()
    seconds = time.time() - started
    dice = test_dice(trainer, test_cases)
    if not args.keep_models:  # nnU-Net wrote checkpoint_final.pth; the numbers are all we need, disk is not free
        shutil.rmtree(trainer.output_folder_base, ignore_errors=True)
    return {"seed": seed, "training_cases": training_cases, "method": label, "trainer": trainer_name,
            "dice_class_1": round(dice[0], 4), "dice_class_2": round(dice[1], 4),
            "mean_dice": round(float(np.mean(dice)), 4), "seconds": round(seconds, 1),
            "seconds_per_iteration": round(seconds / (args.epochs * args.iterations), 3), "device": args.device}


# ---- report ----------------------------------------------------------------------------------------------------------
def summary_table(rows: list[dict]) -> str:
    seeds = sorted({int(r["seed"]) for r in rows})
    counts = sorted({int(r["training_cases"]) for r in rows})
    lines = [f"Mean Dice over classes 1 and 2 on the 5 held-out target cases, mean ± std over seeds "
             f"{', '.join(map(str, seeds))} [min, max]\n",
             "| method | " + " | ".join(f"{n} case{'s' if n > 1 else ''}" for n in counts) + " | median s / it |",
             "| --- |" + " --- |" * (len(counts) + 1)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for n in counts:
            values = [float(r["mean_dice"]) for r in rows if r["method"] == method and int(r["training_cases"]) == n]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f} [{min(values):.3f}, {max(values):.3f}]"
                         if values else "-")
        # the median: a run that shared the cores with another job must not move it
        speed = np.median([float(r["seconds_per_iteration"]) for r in rows if r["method"] == method])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {speed:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # nnU-Net's progress plots change matplotlib's global style
        figure, axis = plt.subplots(figsize=(7, 4.5))
        counts = sorted({int(r["training_cases"]) for r in rows})
        for method in dict.fromkeys(r["method"] for r in rows):
            values = [[float(r["mean_dice"]) for r in rows if r["method"] == method and int(r["training_cases"]) == n]
                      for n in counts]
            present = [(n, v) for n, v in zip(counts, values) if v]
            axis.errorbar([n for n, _ in present], [np.mean(v) for _, v in present],
                          yerr=[np.std(v) for _, v in present], marker="o", capsize=3, label=method)
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(n) for n in counts])
        axis.set_xlabel("target training cases")
        axis.set_ylabel("mean Dice on held-out cases")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        axis.set_title("Fine-tuning a pretrained nnU-Net (local task) on the long-range task")
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


def write_report(rows: list[dict], output: Path) -> None:
    convergence.write_report(rows, output, "transfer", draw=plot, tabulate=summary_table)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        path = Path(args.plot_only)
        write_report(read_rows(path), path.parent)
        return 0
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    set_nnunet_paths(output / "nnunet")
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    source = prepare(args)
    csv_path = output / "transfer.csv"
    rows = read_rows(csv_path) if csv_path.is_file() else []
    done = {(int(r["seed"]), int(r["training_cases"]), r["method"]) for r in rows}
    for seed in args.seeds:
        for cases in args.cases:
            test_cases = write_target_split(cases, seed)
            for label in args.methods:
                if (seed, cases, label) in done:
                    continue
                print(f"seed {seed}, {cases} case(s), {label}", flush=True)
                row = run_method(label, cases, seed, source, test_cases, args)
                print(f"  mean Dice {row['mean_dice']:.3f} ({row['dice_class_1']:.3f}, {row['dice_class_2']:.3f}), "
                      f"{row['seconds']:.0f} s", flush=True)
                rows.append({k: str(v) for k, v in row.items()})
                with open(csv_path, "w", newline="") as f:  # rewritten after each run: a long run can resume
                    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                    writer.writeheader()
                    writer.writerows(rows)
    write_report(rows, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
