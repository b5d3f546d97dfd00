"""Dice per class from nnU-Net's own evaluation summaries, per trainer.

Where the numbers come from, per trainer, first found wins::

    $nnUNet_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}/
        crossval_results_folds_0_1_2_3_4/summary.json   nnUNetv2_find_best_configuration (all 5 folds, pooled)
        crossval_results_folds_*/summary.json            the same over other folds (its -f)
        fold_K/validation/summary.json                   one per finished fold: pooled per case here

or one explicit ``summary.json`` per trainer (``--summary``, e.g. a test set scored by nnUNetv2_evaluate_folder).

nnU-Net keys its summaries by label id, or by region for region-based datasets (``"(1, 2)"``); the model folder's
``dataset.json`` (``"labels": {name: id or [ids]}``) names them.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .nnunet_paths import dataset_folder as _dataset_folder
from .nnunet_paths import nnunet_folder

DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_CONFIGURATION = "3d_fullres"
ALL_FOLDS = (0, 1, 2, 3, 4)  # nnU-Net's 5-fold cross-validation
CROSSVAL_FOLDER = "crossval_results_folds_0_1_2_3_4"


def _label_key(key: str | int | Sequence[int]) -> tuple[int, ...]:
    """A label or region as nnU-Net writes it (``"2"``, ``"(1, 2)"``, ``[1, 2]``) -> a tuple of label ids.

    A one-label region and the label itself compare equal, as they select the same voxels.
    """
    if isinstance(key, (list, tuple)):
        return tuple(int(k) for k in key)
    if isinstance(key, int):
        return (key,)
    return tuple(int(k) for k in key.strip().strip("()").split(",") if k.strip())


@dataclass(frozen=True)
class DatasetClass:
    """A foreground class or region of dataset.json and its key in nnU-Net's summaries."""

    name: str
    key: tuple[int, ...]


def dataset_classes(dataset_json: dict) -> list[DatasetClass]:
    """The foreground classes (or regions) of a dataset.json in its order; background and ignore left out."""
    classes = []
    for name, value in dataset_json["labels"].items():
        key = _label_key(value)
        if name == "ignore" or not key or set(key) == {0}:
            continue
        classes.append(DatasetClass(name, key))
    return classes


def nanmean(values: Sequence[float | None]) -> float:
    """Mean over the values that exist, like nnU-Net's ``np.nanmean`` (Dice is NaN where a case has no such class
    in reference and prediction)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else math.nan


def _load_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rewrite it with nnUNetv2_evaluate_folder") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("mean"), dict):
        raise ValueError(f"{path} is not an nnU-Net summary.json (no 'mean' entry); write one with "
                         "nnUNetv2_evaluate_folder or nnUNetv2_find_best_configuration")
    return summary


def summary_dice(path: str | Path) -> dict[tuple[int, ...], float]:
    """Mean Dice per label (or region) of one nnU-Net ``summary.json``, keyed by label-id tuple."""
    summary = _load_summary(Path(path))
    return {_label_key(k): float(v["Dice"]) for k, v in summary["mean"].items()}


def pooled_dice(paths: Sequence[str | Path]) -> tuple[dict[tuple[int, ...], float], str]:
    """Mean Dice per label over the cases of several fold summaries, and how it was computed.

    Pooled per case (every case of every fold counts once), which is what nnU-Net's cross-validation summary
    computes over the same predictions. If a summary has no per-case metrics, the folds' means are averaged.
    """
    summaries = [_load_summary(Path(p)) for p in paths]
    if all(s.get("metric_per_case") for s in summaries):
        per_label: dict[tuple[int, ...], list] = {}
        for s in summaries:
            for case in s["metric_per_case"]:
                for k, metrics in case["metrics"].items():
                    per_label.setdefault(_label_key(k), []).append(metrics.get("Dice"))
        return {k: nanmean(v) for k, v in per_label.items()}, "pooled per case"
    per_label = {}
    for s in summaries:
        for k, metrics in s["mean"].items():
            per_label.setdefault(_label_key(k), []).append(metrics["Dice"])
    return {k: nanmean(v) for k, v in per_label.items()}, "mean of the folds' means (no per-case metrics)"


@dataclass
class TrainerResult:
    """Dice per label of one trainer and where it came from.

    Attributes:
        trainer: the nnU-Net trainer class name.
        dice: mean Dice per label-id tuple.
        source: what the numbers are, in words (e.g. which folds were used).
        files: the summary.json files read.
        model_folder: the trainer's model folder, where known.
        plans: the plans identifier, where known.
    """

    trainer: str
    dice: dict[tuple[int, ...], float]
    source: str
    files: list[Path] = field(default_factory=list)
    model_folder: Path | None = None
    plans: str | None = None


def results_root(results_dir: str | Path | None = None) -> Path:
    """``results_dir``, else ``$nnUNet_results``.

    Raises:
        ValueError: neither is set.
        FileNotFoundError: the folder does not exist.
    """
    return nnunet_folder("nnUNet_results", results_dir, hint=", or pass --summary with one summary.json per trainer")


def dataset_folder(root: Path, dataset: str | int, variable: str = "nnUNet_results") -> Path:
    """The ``DatasetXXX_Name`` folder of trained models under ``root`` (see ``nnunet_paths.dataset_folder``)."""
    what = "trained models for dataset" if variable == "nnUNet_results" else "dataset"
    return _dataset_folder(root, dataset, variable, what)


def model_folder(root: Path, dataset: str | int, trainer: str, plans: str = DEFAULT_PLANS,
                 configuration: str = DEFAULT_CONFIGURATION) -> Path:
    """``$nnUNet_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}``.

    Raises:
        FileNotFoundError: the folder does not exist; the message lists the model folders of the dataset.
    """
    folder = dataset_folder(root, dataset) / f"{trainer}__{plans}__{configuration}"
    if folder.is_dir():
        return folder
    present = sorted(p.name for p in folder.parent.iterdir() if p.is_dir() and p.name.count("__") == 2)
    raise FileNotFoundError(
        f"no model folder {folder}: {trainer} has not been trained with plans {plans} and configuration "
        f"{configuration} on {folder.parent.name} (model folders there: {', '.join(present) or 'none'}). "
        f"Train the folds (nnUNetv2_train {folder.parent.name} {configuration} FOLD -tr {trainer} -p {plans}), "
        "or pass the -p/-c it was trained with")


def _fold_number(path: Path) -> int | None:
    match = re.fullmatch(r"fold_(\d+)", path.name)
    return int(match.group(1)) if match else None


def _folds(folds: Sequence[int]) -> str:
    return ("fold " if len(folds) == 1 else "folds ") + ", ".join(map(str, folds))


def load_model_result(folder: Path, trainer: str, plans: str | None = None) -> TrainerResult:
    """Dice per label of a trained model folder: the cross-validation summary, else the fold summaries pooled.

    Raises:
        FileNotFoundError: neither exists; the message names the nnU-Net commands that write them.
    """
    crossval = folder / CROSSVAL_FOLDER / "summary.json"
    if crossval.is_file():
        return TrainerResult(trainer, summary_dice(crossval), "5-fold cross-validation (folds 0-4, "
                             f"{CROSSVAL_FOLDER}/summary.json)", [crossval], folder, plans)
    # nnUNetv2_find_best_configuration -f <folds> names its folder after the folds; take the one with the most
    others = sorted(folder.glob("crossval_results_folds_*/summary.json"),
                    key=lambda p: (-len(p.parent.name.split("_")), p.parent.name))
    if others:
        folds = others[0].parent.name[len("crossval_results_folds_"):].replace("_", ", ")
        return TrainerResult(trainer, summary_dice(others[0]), f"cross-validation over folds {folds} "
                             f"({others[0].parent.name}/summary.json)", [others[0]], folder, plans)
    fold_files = sorted((f / "validation" / "summary.json" for f in folder.iterdir() if _fold_number(f) is not None),
                        key=lambda p: _fold_number(p.parent.parent))
    fold_files = [p for p in fold_files if p.is_file()]  # fold_all is left out: it validates on its training data
    if fold_files:
        used = [_fold_number(p.parent.parent) for p in fold_files]
        dice, how = pooled_dice(fold_files)
        missing = [f for f in ALL_FOLDS if f not in used]
        source = f"{_folds(used)} (fold_K/validation/summary.json, {how})"
        if missing:
            source += f"; {_folds(missing)} {'has' if len(missing) == 1 else 'have'} no validation summary"
        return TrainerResult(trainer, dice, source, fold_files, folder, plans)
    dataset, (plans_part, configuration) = folder.parent.name, folder.name.split("__")[1:]
    raise FileNotFoundError(
        f"no evaluation summary for {trainer} in {folder}: run nnUNetv2_find_best_configuration {dataset} "
        f"-c {configuration} -tr {trainer} -p {plans_part} once all 5 folds are trained (writes "
        f"{CROSSVAL_FOLDER}/summary.json), or train the folds (nnUNetv2_train {dataset} {configuration} FOLD "
        f"-tr {trainer} -p {plans_part}; each finished fold writes fold_FOLD/validation/summary.json, and --val "
        "re-runs the validation of a trained fold)")


def load_summary_result(path: str | Path, trainer: str, plans: str | None = None) -> TrainerResult:
    """Dice per label of an explicit ``summary.json`` (or a folder holding one) for ``trainer``.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary file {path} for {trainer}: pass the summary.json that "
                                "nnUNetv2_evaluate_folder (-o) or nnUNetv2_find_best_configuration wrote")
    return TrainerResult(trainer, summary_dice(path), f"summary {path}", [path], None, plans)


def find_dataset_json(results: Sequence[TrainerResult], dataset: str | int, root: Path | None) -> Path | None:
    """The first dataset.json beside the results, else in nnU-Net's raw or preprocessed folder."""
    candidates = []
    for r in results:
        if r.model_folder is not None:
            candidates.append(r.model_folder / "dataset.json")
        candidates += [f.parent / "dataset.json" for f in r.files]
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        base = os.environ.get(variable)
        if base and Path(base).is_dir():
            try:
                candidates.append(dataset_folder(Path(base), dataset, variable) / "dataset.json")
            except (FileNotFoundError, ValueError):
                pass
    return next((c for c in candidates if c.is_file()), None)
