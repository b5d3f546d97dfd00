"""The Rep3D paper's published results tables, as shipped in ``data/paper_results.json``.

Each table keeps the paper's columns (per-class Dice, the paper's mean, settings and sizes) and its rows (one per
method), with the nnU-Net trainers that reproduce a row. A column matches a dataset.json label by name
(case-insensitive, with the aliases in the JSON, e.g. ``postcava`` -> IVC). The paper's numbers live in that JSON
only: its means are the paper's as printed, never recomputed. ``results_table`` lays them beside measured rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

NO_PAPER_TABLE = "none"


def normalise_name(name: str) -> str:
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
        wanted = normalise_name(label_name)
        return wanted in {normalise_name(n) for n in (self.name, self.class_name or "", *self.aliases)}


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
