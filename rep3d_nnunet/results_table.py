"""The Rep3D paper's results tables, filled from nnU-Net's own evaluation summaries (``rep3d-nnunet table``).

Where the numbers come from, per trainer, first found wins::

    $nnUNet_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}/
        crossval_results_folds_0_1_2_3_4/summary.json   nnUNetv2_find_best_configuration (all 5 folds, pooled)
        crossval_results_folds_*/summary.json            the same over other folds (its -f)
        fold_K/validation/summary.json                   one per finished fold: pooled per case here

or one explicit ``summary.json`` per trainer (``--summary``, e.g. a test set scored by nnUNetv2_evaluate_folder).

nnU-Net keys its summaries by label id, or by region for region-based datasets (``"(1, 2)"``); the model folder's
``dataset.json`` (``"labels": {name: id or [ids]}``) names them. Columns follow the chosen paper table where the
names match (case-insensitive, with the aliases in ``data/paper_results.json``, e.g. ``postcava`` -> IVC), and the
paper's published rows follow ours, marked ``paper``. The paper's numbers live in that JSON only: its means are
the paper's as printed, never recomputed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from .nnunet_paths import dataset_folder as _dataset_folder
from .nnunet_paths import nnunet_folder

DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_CONFIGURATION = "3d_fullres"
NO_PAPER_TABLE = "none"
ALL_FOLDS = (0, 1, 2, 3, 4)  # nnU-Net's 5-fold cross-validation
CROSSVAL_FOLDER = "crossval_results_folds_0_1_2_3_4"
DICE_KINDS = ("class", "mean", "dice")
MEASURED, PAPER = "measured", "paper"


# ---------------------------------------------------------------------------------------------------- paper data


def _normalise_name(name: str) -> str:
    """``'Gall. Bladder'``, ``'gall_bladder'`` -> ``'gall bladder'``: case and punctuation never decide a match."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", name.lower()).split())


@dataclass(frozen=True)
class PaperColumn:
    """One column of a paper table.

    Attributes:
        name: the header as printed (``"R.Kid"``).
        kind: ``class`` (Dice of one class), ``mean`` (the paper's average Dice), ``dice`` (another Dice, e.g. at a
            checkpoint or of a benchmark), ``hours`` or ``info`` (a setting or size, printed as is).
        class_name: the class in words (``"right kidney"``), for ``class`` columns.
        aliases: other label names that mean this class in nnU-Net datasets (``"postcava"`` for IVC).
        dataset: the benchmark key of a per-benchmark column (Table 10).
    """

    name: str
    kind: str
    class_name: str | None = None
    aliases: tuple[str, ...] = ()
    dataset: str | None = None

    def matches(self, label_name: str) -> bool:
        """Whether a dataset.json label name denotes this column's class."""
        if self.kind != "class":
            return False
        wanted = _normalise_name(label_name)
        return wanted in {_normalise_name(n) for n in (self.name, self.class_name or "", *self.aliases)}


@dataclass(frozen=True)
class PaperRow:
    """One published row: a method, one value per column (None where the paper prints '-' or '×')."""

    method: str
    values: tuple[Any, ...]
    trainers: tuple[str, ...] = ()
    plans: tuple[str, ...] = ()
    significant: tuple[str, ...] = ()

    def reproduced_by(self, trainer: str, plans: str | None) -> bool:
        """Whether ``trainer`` (trained with ``plans``; None: unknown) is listed as reproducing this row."""
        return trainer in self.trainers and (not self.plans or plans is None or plans in self.plans)


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper (Table 1 is split per benchmark, Table 2 per modality)."""

    id: str
    paper_table: str
    caption: str
    dataset: str | None
    mean_column: str | None
    columns: tuple[PaperColumn, ...]
    rows: tuple[PaperRow, ...]
    notes: tuple[str, ...] = ()

    @property
    def class_columns(self) -> tuple[PaperColumn, ...]:
        return tuple(c for c in self.columns if c.kind == "class")

    def value(self, row: PaperRow, column: str) -> Any:
        return row.values[[c.name for c in self.columns].index(column)]

    def row_reproduced_by(self, trainer: str, plans: str | None) -> PaperRow | None:
        """The first row whose trainer mapping lists ``trainer``, or None."""
        return next((r for r in self.rows if r.reproduced_by(trainer, plans)), None)


def paper_results_path() -> Path:
    """The package's ``data/paper_results.json``."""
    return Path(str(_paper_results_resource()))


def _paper_results_resource():
    # one joinpath per level: Traversable.joinpath takes a single name before Python 3.11
    return resources.files("rep3d_nnunet").joinpath("data").joinpath("paper_results.json")


@lru_cache(maxsize=1)
def load_paper_results() -> dict:
    """The raw JSON document (source, notes, benchmarks, tables)."""
    return json.loads(_paper_results_resource().read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def load_paper_tables() -> dict[str, PaperTable]:
    """Every paper table by id, in the JSON's order."""
    tables = {}
    for t in load_paper_results()["tables"]:
        columns = tuple(PaperColumn(c["name"], c["kind"], c.get("class"), tuple(c.get("aliases", ())), c.get("dataset"))
                        for c in t["columns"])
        rows = tuple(PaperRow(r["method"], tuple(r["values"]), tuple(r.get("trainers", ())), tuple(r.get("plans", ())),
                              tuple(r.get("significant", ()))) for r in t["rows"])
        tables[t["id"]] = PaperTable(t["id"], t["paper_table"], t["caption"], t["dataset"], t["mean_column"], columns,
                                     rows, tuple(t.get("notes", ())))
    return tables


def paper_table(table_id: str) -> PaperTable:
    """The paper table with this id (case-insensitive).

    Raises:
        ValueError: unknown id; the message lists the valid ones.
    """
    tables = load_paper_tables()
    for known in tables:
        if known.lower() == table_id.strip().lower():
            return tables[known]
    raise ValueError(f"unknown paper table {table_id!r}; valid ids: {', '.join(tables)} "
                     f"(or {NO_PAPER_TABLE!r} for no paper rows)")


# ------------------------------------------------------------------------------------------------ nnU-Net results


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


def _nanmean(values: Sequence[float | None]) -> float:
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
        return {k: _nanmean(v) for k, v in per_label.items()}, "pooled per case"
    per_label = {}
    for s in summaries:
        for k, metrics in s["mean"].items():
            per_label.setdefault(_label_key(k), []).append(metrics["Dice"])
    return {k: _nanmean(v) for k, v in per_label.items()}, "mean of the folds' means (no per-case metrics)"


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


def _find_dataset_json(results: Sequence[TrainerResult], dataset: str | int, root: Path | None) -> Path | None:
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


# ----------------------------------------------------------------------------------------------------- the table


def _format(value: Any, kind: str, missing: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if kind in DICE_KINDS:
        return f"{value:.3f}"  # the paper's precision
    return str(value)


@dataclass
class _Column:
    header: str
    kind: str
    paper: PaperColumn | None = None  # where the paper rows take their value from
    dataset_class: DatasetClass | None = None  # where the measured rows take theirs from


@dataclass
class ResultsTable:
    """A paper-layout table: measured rows (one per trainer) then the paper's rows.

    Attributes:
        title: one line saying what the numbers are.
        header: column headers, starting with ``Source`` and ``Method``.
        rows: one list of cells per row; cells are numbers (Dice), strings (settings) or None.
        kinds: the kind of each column (see :class:`PaperColumn`), ``text`` for Source and Method.
        significant: per row, the headers of cells the paper marks with * (p < 0.01).
        notes: provenance of every measured row, class matching, the paper's caveats.
    """

    title: str
    header: list[str]
    rows: list[list[Any]]
    kinds: list[str]
    significant: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def formatted_rows(self, missing: str = "-", mark_significant: bool = False) -> list[list[str]]:
        """Every row as strings: Dice with 3 decimals, ``missing`` where there is no value, * where the paper has one
        if ``mark_significant``."""
        out = []
        for i, row in enumerate(self.rows):
            marked = self.significant[i] if i < len(self.significant) else ()
            cells = [_format(v, k, missing) for v, k in zip(row, self.kinds)]
            if mark_significant:
                cells = [c + "*" if h in marked and c != missing else c for c, h in zip(cells, self.header)]
            out.append(cells)
        return out

    def to_markdown(self) -> str:
        """The table as Markdown, paper values marked * as the paper does, then the notes."""
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [f"### {self.title}", "", line(self.header),
                 "|" + "|".join("---" if k == "text" else "---:" for k in self.kinds) + "|"]
        lines += [line(r) for r in self.formatted_rows("-", mark_significant=True)]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """The table as CSV text (3-decimal Dice, empty cells where there is no value)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.formatted_rows(""))
        return buffer.getvalue()

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            handle.write(self.to_csv())
        return path


def match_classes(classes: Sequence[DatasetClass], table: PaperTable) -> dict[str, DatasetClass]:
    """Paper class column name -> the dataset class it denotes; each class and column is used once."""
    matched: dict[str, DatasetClass] = {}
    for column in table.class_columns:
        for c in classes:
            if c not in matched.values() and column.matches(c.name):
                matched[column.name] = c
                break
    return matched


def pick_paper_table(classes: Sequence[DatasetClass]) -> tuple[PaperTable | None, str]:
    """The paper table whose class columns name most of the dataset's classes (at least half), and why.

    Among equals, the table with fewer reported classes the dataset lacks wins (AMOS MRI's 13 organs: the MRI table,
    whose bladder and prostate are '-', not the CT one), then the table listed first in the JSON (main results
    before ablations).
    """
    best, best_count, best_score = None, 0, (0, 0)
    for table in load_paper_tables().values():
        matched = match_classes(classes, table)
        lacking = [c for c in table.class_columns
                   if c.name not in matched and any(table.value(r, c.name) is not None for r in table.rows)]
        score = (len(matched), -len(lacking))
        if len(matched) > 0 and (best is None or score > best_score):
            best, best_count, best_score = table, len(matched), score
    if best is None or 2 * best_count < len(classes):
        return None, ("no paper table names most of this dataset's classes, so no paper rows are shown; choose "
                      f"one with --paper-table ({', '.join(load_paper_tables())})")
    return best, (f"paper table {best.id} picked because {best_count} of the dataset's {len(classes)} classes match "
                  "its columns; choose another with --paper-table ID or none with --paper-table none")


def _layout(classes: Sequence[DatasetClass], table: PaperTable | None) -> list[_Column]:
    """Columns: the paper's order, our unmatched classes just before the mean, then the mean."""
    if table is None:
        return [_Column(c.name, "class", None, c) for c in classes] + [_Column("Mean", "mean")]
    matched = match_classes(classes, table)
    unmatched = [_Column(c.name, "class", None, c) for c in classes if c not in matched.values()]
    columns: list[_Column] = []
    for column in table.columns:
        if column.kind == "class":
            values = [table.value(r, column.name) for r in table.rows]
            # a paper class our dataset lacks and the paper never reports ('-' throughout) is only noise
            if column.name in matched or any(v is not None for v in values):
                columns.append(_Column(column.name, "class", column, matched.get(column.name)))
        elif column.kind == "mean":
            columns += unmatched + [_Column(column.name, "mean", column)]
        else:
            columns.append(_Column(column.name, column.kind, column))
    if table.mean_column is None:
        columns = unmatched + [_Column("Mean", "mean")] + columns
    return columns


def build_results_table(results: Sequence[TrainerResult], classes: Sequence[DatasetClass], title: str,
                        table: PaperTable | None = None, notes: Sequence[str] = ()) -> ResultsTable:
    """Lays out measured rows (one per trainer) and the paper table's rows in the paper's column order.

    Args:
        results: Dice per label of each trainer.
        classes: the dataset's foreground classes (names and summary keys), in dataset.json order.
        title: the table's heading.
        table: the paper table for the column order and the reference rows; None for measured rows only.
        notes: notes to put first (e.g. how the paper table was chosen).

    Returns:
        The table; measured rows carry per-class Dice and their mean over the dataset's classes.
    """
    columns = _layout(classes, table)
    header = ["Source", "Method"] + [c.header for c in columns]
    kinds = ["text", "text"] + [c.kind for c in columns]
    rows, significant, all_notes = [], [], list(notes)
    for result in results:
        class_dice = {c.key: result.dice.get(c.key, math.nan) for c in classes}
        row: list[Any] = [MEASURED, result.trainer]
        for column in columns:
            if column.dataset_class is not None:
                row.append(class_dice[column.dataset_class.key])
            elif column.kind == "mean":
                row.append(_nanmean(list(class_dice.values())))
            else:
                row.append(None)
        rows.append(row)
        significant.append(())
        reproduces = table.row_reproduced_by(result.trainer, result.plans) if table else None
        all_notes.append(f"{result.trainer}: {result.source}"
                         + (f"; reproduces the paper's row '{reproduces.method}'" if reproduces else ""))
        absent = [c.name for c in classes if c.key not in result.dice]
        if absent:
            all_notes.append(f"{result.trainer}: its summary has no Dice for {', '.join(absent)}")
    if table is not None:
        for paper_row in table.rows:
            row = [PAPER, paper_row.method]
            for column in columns:
                row.append(table.value(paper_row, column.paper.name) if column.paper is not None else None)
            rows.append(row)
            significant.append(tuple(c.header for c in columns
                                     if c.paper is not None and c.paper.name in paper_row.significant))
        all_notes += _matching_notes(classes, table)
        all_notes.append(f"paper: {table.caption}")
        benchmark = load_paper_results()["benchmarks"].get(table.dataset or "")
        if benchmark is not None:
            all_notes.append(f"paper protocol: {benchmark['name']}, {benchmark['evaluation']}; the measured rows "
                             "come from the summaries named above")
        all_notes += [f"paper: {n}" for n in table.notes]
        if table.mean_column is not None:
            all_notes.append(f"{table.mean_column} of measured rows: mean Dice over the dataset's classes; of paper "
                             "rows: as printed in the paper")
    else:
        all_notes.append("Mean: mean Dice over the dataset's classes")
    return ResultsTable(title, header, rows, kinds, significant, all_notes)


def _matching_notes(classes: Sequence[DatasetClass], table: PaperTable) -> list[str]:
    matched = match_classes(classes, table)
    notes = []
    renamed = [f"{c.name} -> {name}" for name, c in matched.items() if _normalise_name(c.name) != _normalise_name(name)]
    if renamed:
        notes.append("classes matched to the paper's columns: " + ", ".join(renamed))
    extra = [c.name for c in classes if c not in matched.values()]
    if extra and table.class_columns:
        notes.append(f"not in paper {table.id}: {', '.join(extra)} (kept in dataset order, counted in our mean)")
    lacking = [c.name for c in table.class_columns if c.name not in matched]
    if lacking:
        notes.append(f"paper classes this dataset lacks: {', '.join(lacking)} (paper values only)")
    return notes


def results_table(dataset: str | int, trainers: Sequence[str], plans: str = DEFAULT_PLANS,
                  configuration: str = DEFAULT_CONFIGURATION, paper_table_id: str | None = None,
                  summaries: Sequence[str | Path] | None = None,
                  results_dir: str | Path | None = None) -> ResultsTable:
    """Reads each trainer's nnU-Net results and lays them out beside a paper table.

    Args:
        dataset: dataset id (``4``, ``"004"``) or full name (``"Dataset004_Hippocampus"``).
        trainers: nnU-Net trainer class names, one row each.
        plans: plans identifier of the model folders (``-p``).
        configuration: nnU-Net configuration of the model folders (``-c``).
        paper_table_id: a table id of ``data/paper_results.json``; ``"none"`` for no paper rows; None to pick the
            table whose classes match the dataset's.
        summaries: one ``summary.json`` (or folder holding one) per trainer, in the same order, instead of the
            model folders' summaries (e.g. test-set evaluations).
        results_dir: nnU-Net results folder; default ``$nnUNet_results``.

    Returns:
        The table.

    Raises:
        ValueError: unknown paper table, ``nnUNet_results`` unset, mismatched ``summaries``, malformed summaries.
        FileNotFoundError: a model folder or summary is missing (the message names the nnU-Net command to run).
    """
    if not trainers:
        raise ValueError("no trainers given: pass -tr TRAINER [TRAINER ...]")
    chosen = None
    if paper_table_id is not None and paper_table_id.strip().lower() != NO_PAPER_TABLE:
        chosen = paper_table(paper_table_id)  # fail on a typo before reading any result
    if summaries:
        if len(summaries) != len(trainers):
            raise ValueError(f"--summary got {len(summaries)} path(s) for {len(trainers)} trainer(s): pass one "
                             "summary.json per trainer, in the order of -tr")
        value = results_dir if results_dir is not None else os.environ.get("nnUNet_results")
        root = Path(value) if value and Path(value).is_dir() else None  # only to find dataset.json
        results = [load_summary_result(s, t, plans) for s, t in zip(summaries, trainers)]
        if root is not None:
            for r in results:
                try:
                    r.model_folder = model_folder(root, dataset, r.trainer, plans, configuration)
                except (FileNotFoundError, ValueError):
                    pass
        evaluation = "explicit summaries"
    else:
        root = results_root(results_dir)
        results = [load_model_result(model_folder(root, dataset, t, plans, configuration), t, plans) for t in trainers]
        evaluation = "nnU-Net cross-validation"
    dataset_json = _find_dataset_json(results, dataset, root)
    notes = []
    if dataset_json is not None:
        classes = dataset_classes(json.loads(dataset_json.read_text()))
        known = {c.key for c in classes}
        for r in results:  # labels the summaries have but dataset.json does not name (should not happen)
            for key in r.dice:
                if key not in known:
                    classes.append(DatasetClass(f"label {', '.join(map(str, key))}", key))
                    known.add(key)
    else:
        keys = list(dict.fromkeys(k for r in results for k in r.dice))
        classes = [DatasetClass(f"label {', '.join(map(str, k))}", k) for k in keys]
        notes.append("no dataset.json found beside the results or in nnUNet_raw: classes are named by label id")
    if paper_table_id is None:
        chosen, why = pick_paper_table(classes)
        notes.append(why)
    folders = [r.model_folder for r in results if r.model_folder is not None]
    name = folders[0].parent.name if folders else str(dataset)
    if not folders and dataset_json is not None and re.match(r"Dataset\d{3}_", dataset_json.parent.name):
        name = dataset_json.parent.name  # found in nnUNet_raw / nnUNet_preprocessed
    title = f"Dice on {name} ({plans}, {configuration}; {evaluation})"
    if chosen is not None:
        title += f" vs. the paper's {chosen.paper_table} ({chosen.id})"
    return build_results_table(results, classes, title, chosen, notes)


# ------------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the flags of the ``table`` subcommand; :func:`run_from_args` consumes them."""
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_Name)")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, metavar="TRAINER",
                        help="trainer class names, one row each (e.g. nnUNetTrainer nnUNetTrainerRep3D)")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS, help=f"plans identifier (default {DEFAULT_PLANS})")
    parser.add_argument("-c", "--configuration", default=DEFAULT_CONFIGURATION,
                        help=f"nnU-Net configuration (default {DEFAULT_CONFIGURATION})")
    parser.add_argument("--paper-table", default=None, metavar="TABLE_ID",
                        help="paper table for column order and reference rows, e.g. table1_kits, table2_amos_ct, "
                             "table3 (an unknown id lists them all), or none; default: the table naming the "
                             "dataset's classes")
    parser.add_argument("--summary", nargs="+", default=None, metavar="PATH",
                        help="one summary.json per trainer (order of -tr) instead of the model folders' "
                             "cross-validation, e.g. a test set scored by nnUNetv2_evaluate_folder")
    parser.add_argument("--csv", default=None, metavar="OUT.csv", help="also write the table as CSV")
    parser.add_argument("--results-dir", default=None, help="nnU-Net results folder (default: $nnUNet_results)")


def run_from_args(args: argparse.Namespace) -> str:
    """Builds the table described by parsed :func:`add_arguments` flags; writes the CSV if asked; returns Markdown."""
    table = results_table(args.dataset, args.trainers, args.plans, args.configuration, args.paper_table,
                          args.summary, args.results_dir)
    text = table.to_markdown()
    if args.csv:
        text += f"\nCSV written to {table.write_csv(args.csv)}\n"
    return text
