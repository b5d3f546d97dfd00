"""The Rep3D paper's results tables, filled from nnU-Net's own evaluation summaries (``rep3d-nnunet table``).

The measured rows come from ``nnunet_results`` (per trainer, the model folder's cross-validation or fold summaries,
or one explicit ``summary.json`` per trainer with ``--summary``); the published rows from ``paper_results``
(``data/paper_results.json``). Columns follow the chosen paper table where the names match (case-insensitive, with
the aliases in ``data/paper_results.json``, e.g. ``postcava`` -> IVC), and the paper's published rows follow ours,
marked ``paper``.
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
from pathlib import Path
from typing import Any, Sequence

from .nnunet_results import (
    DEFAULT_CONFIGURATION,
    DEFAULT_PLANS,
    DatasetClass,
    TrainerResult,
    dataset_classes,
    find_dataset_json,
    load_model_result,
    load_summary_result,
    model_folder,
    nanmean,
    results_root,
)
from .paper_results import (
    NO_PAPER_TABLE,
    PaperColumn,
    PaperTable,
    load_paper_results,
    load_paper_tables,
    normalise_name,
    paper_table,
)

DICE_KINDS = ("class", "mean", "dice")
MEASURED, PAPER = "measured", "paper"


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
                row.append(nanmean(list(class_dice.values())))
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
    renamed = [f"{c.name} -> {name}" for name, c in matched.items() if normalise_name(c.name) != normalise_name(name)]
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
    dataset_json = find_dataset_json(results, dataset, root)
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
