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

The machinery is ``rep3d-nnunet compare`` (``rep3d_nnunet/compare.py``: plans, resumable runs, step times, the
report); this script adds the MSD conversion, the contenders of docs/hippocampus.md (with nnU-Net's ResEnc M preset,
the compute-matched control) and the slices figure.

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
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from convergence import PREVIOUS_DEFAULT_BLOCKS, set_nnunet_paths  # noqa: E402

from rep3d_nnunet import compare_report  # noqa: E402
from rep3d_nnunet.compare import (  # noqa: E402
    CONFIGURATION,
    CONTENDERS as COMPARE_CONTENDERS,
    BadInput,
    Contender,
    Entry,
    add_arguments,
    check_arguments,
    compare,
    plans_name,
)
from rep3d_nnunet.datasets.hippocampus import SUBSET, converter_input  # noqa: E402

PLANS_NAME = "nnUNetPlans_bench"
CLASSES = {"1": "anterior", "2": "posterior"}
RESENC_M = COMPARE_CONTENDERS["resenc_m"]
CONTENDERS = (
    COMPARE_CONTENDERS["nnunet_sgd"],
    COMPARE_CONTENDERS["nnunet_adamw"],
    COMPARE_CONTENDERS["rep3d"],
    # the paper's ordering (docs/hippocampus.md) was measured on the previous default network: two blocks at every stage
    Entry(Contender("Rep3D fixed prior k=21", "nnUNetTrainerRep3DFixedPrior", rep3d=PREVIOUS_DEFAULT_BLOCKS)),
    Entry(Contender("Rep3D vanilla k=21", "nnUNetTrainerRep3DVanilla", rep3d=PREVIOUS_DEFAULT_BLOCKS)),
    Entry(Contender("Rep3D LRBM k=3", "nnUNetTrainerRep3D", kernel_size=3, rep3d=PREVIOUS_DEFAULT_BLOCKS)),
    RESENC_M,  # nnU-Net's residual-encoder preset at the same divisor and batch: the compute-matched control
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
                    ("kernel_init", "default"), *PREVIOUS_DEFAULT_BLOCKS)
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
# Cheaper Rep3D designs (docs/hippocampus.md, "Worth its cost"): the default network with fewer large-kernel blocks
# where the voxels are. Stage 0 holds most of them and its two 21^3 convolutions cost ~40% of nnU-Net's whole step
# (docs/performance.md); on this plan a 21^3 kernel at stage 1 (20 x 28 x 20) is as wide as two of its three axes.
DESIGNS = (
    Entry(Contender("Rep3D D0: 2 blocks per stage at every stage (the previous default)", "nnUNetTrainerRep3D",
                    rep3d=PREVIOUS_DEFAULT_BLOCKS)),
    Entry(Contender("Rep3D D1: 1 block per stage from stage 1", "nnUNetTrainerRep3D",
                    rep3d=(("blocks_per_stage", 1), ("first_block_stage", 1)))),
    Entry(Contender("Rep3D D2: 2 blocks per stage from stage 2", "nnUNetTrainerRep3D",
                    rep3d=(("blocks_per_stage", 2), ("first_block_stage", 2)))),
    Entry(Contender("Rep3D D3: 2 blocks per stage from stage 1", "nnUNetTrainerRep3D",
                    rep3d=(("blocks_per_stage", 2), ("first_block_stage", 1)))),
)
ALL_ENTRIES = CONTENDERS + OPTIONAL + HYPOTHESES + DESIGNS
# the order of the tables: nnU-Net's controls first, then the contenders as listed
DISPLAY_ORDER = [e.label for e in sorted(ALL_ENTRIES, key=lambda e: e not in CONTENDERS[:2] + (RESENC_M,))]
# the slices figure shows the first contender (nnU-Net's default) beside this one
FIGURE_REP3D = "Rep3D (default)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SUBSET),
                        help="a folder in the MSD Task04 layout (default: the 25 cases that ship with the package)")
    # the flags of rep3d-nnunet compare, with this benchmark's CPU defaults (features / 4, batch 2, 3 folds)
    add_arguments(parser, dict(dataset_id=4, output="hippocampus_output", folds=[0, 1, 2], iterations=50,
                               max_iterations=3200, feature_divisor=4, batch_size=2, speed_iterations=0, device="cpu"),
                  contenders=False)
    parser.add_argument("--only", nargs="+", default=None,
                        help="labels of the contenders to run (default: the seven of the comparison); also the "
                             "optional ones: " + "; ".join(e.label for e in OPTIONAL + HYPOTHESES + DESIGNS))
    parser.add_argument("--plot-only", default=None, metavar="CSV",
                        help="redraw tables and plots from a CSV (of the --only contenders if given)")
    return parser.parse_args(argv)


def selected_entries(args) -> list[Entry]:
    if args.only is None:
        return list(CONTENDERS)
    by_label = {e.label: e for e in ALL_ENTRIES}
    entries = [by_label[label] for label in dict.fromkeys(args.only) if label in by_label]  # in the order given
    unknown = sorted(set(args.only) - set(by_label))
    if unknown:
        raise BadInput(f"--only {unknown} matched no contender; labels: {[e.label for e in ALL_ENTRIES]}")
    return entries


# ---- the data: MSD folder -> nnU-Net's converter (compare plans it) ------------------------------------------------
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

def convert(args) -> None:
    """nnU-Net's MSD converter on --data, unless the dataset is already converted and preprocessed."""
    data = Path(args.data).resolve()
    check_msd_task04(data)
    existing = sorted(Path(os.environ["nnUNet_preprocessed"]).glob(f"Dataset{args.dataset_id:03d}_*"))
    if existing and (existing[0] / "nnUNetPlans.json").is_file() and (existing[0] / "gt_segmentations").is_dir() \
            and (existing[0] / "nnUNetPlans_3d_fullres").is_dir():
        return
    # the converter needs imagesTs/, which copies of the release often lack: it reads a linked copy instead
    source = converter_input(data, Path(args.output).resolve() / "nnunet" / "msd_source")
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_convert_MSD_dataset"), "-i", str(source),
                    "-overwrite_id", str(args.dataset_id), "-np", os.environ.get("nnUNet_def_n_proc", "2")],
                   check=True, stdout=subprocess.DEVNULL)
    for stale in existing:  # a half-planned earlier copy: rep3d-nnunet compare plans it again
        (stale / "nnUNetPlans.json").unlink(missing_ok=True)


# ---- report ----------------------------------------------------------------------------------------------------------
def in_display_order(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: DISPLAY_ORDER.index(r["trainer"]) if r["trainer"] in DISPLAY_ORDER
                  else len(DISPLAY_ORDER))


def summary_table(rows: list[dict], speed: list[dict] | None = None) -> str:
    """The tables of rep3d-nnunet compare, contenders in this benchmark's order."""
    return compare_report.summary_table(in_display_order(rows), speed)


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
    print(compare_report.write_report(in_display_order(rows), speed, output, "hippocampus"))
    nnunet = output / "nnunet"
    raw = sorted((nnunet / "nnUNet_raw").glob("Dataset*_*"))
    results = sorted((nnunet / "nnUNet_results").glob("Dataset*_*"))
    if raw and results and slices_figure(rows, results[0], raw[0], output / "hippocampus_slices.png"):
        print(f"slices: {output / 'hippocampus_slices.png'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.plot_only:
            csv_path = Path(args.plot_only)
            if not csv_path.is_file():
                raise BadInput(f"--plot-only {csv_path} is not a file; pass the hippocampus.csv of an earlier run")
            speed_path = csv_path.with_name("speed.csv")
            labels = {e.label for e in selected_entries(args)} if args.only else None
            rows = [r for r in compare_report.read_rows(csv_path) if labels is None or r["trainer"] in labels]
            write_report(rows, compare_report.read_rows(speed_path) if speed_path.is_file() else [], csv_path.parent)
            return 0
        check_msd_task04(Path(args.data).resolve())
        entries = selected_entries(args)
        check_arguments(args)
    except BadInput as problem:
        print(f"hippocampus.py: {problem}", file=sys.stderr)
        return 2
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    set_nnunet_paths(output / "nnunet")
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    convert(args)
    try:  # the CSV holds every run in this output folder; the report the selected contenders
        return compare(args, entries, output, "hippocampus", recorded=list(ALL_ENTRIES),
                       report=lambda rows, speed, folder: write_report(rows, speed, folder), prog="hippocampus.py")
    except BadInput as problem:
        print(f"hippocampus.py: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
