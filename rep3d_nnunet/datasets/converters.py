"""The Rep3D paper's five benchmarks as nnU-Net v2 raw datasets, with the paper's train/val/test protocol.

======================  ===========================  =====  ====================================================
name                    folder (default id)          chan.  split (paper: Table 6 and appendix A.3)
======================  ===========================  =====  ====================================================
``amos_ct``             Dataset741_AMOS22CT          CT     one fixed split, 160 train / 20 val / 20 test
``amos_mri``            Dataset742_AMOS22MRI         MRI    one fixed split, 22 train / 4 val / 7 test
``kits21``              Dataset743_KiTS21            CT     30 of 300 held out for test, 5-fold CV over the rest
``msd_pancreas``        Dataset744_MSDPancreas       CT     30 of 282 held out for test, 5-fold CV over the rest
``msd_hepatic_vessel``  Dataset745_MSDHepaticVessel  CT     31 of 303 held out for test, 5-fold CV over the rest
======================  ===========================  =====  ====================================================

The ids avoid 701-705, which several nnU-Net-based projects use for their own datasets; any id can be passed.
Source layouts and label handling are described in :mod:`.amos`, :mod:`.kits` and :mod:`.msd`; only labelled cases
are used.

Layout written (nnU-Net v2 raw format; ``labelsTs`` holds the test labels for evaluation, nnU-Net ignores it)::

    raw_root/DatasetXXX_Name/
        dataset.json                 nnU-Net's generate_dataset_json; extra keys rep3d_split, rep3d_conversion
        splits_final.json            the train/val split(s), nnU-Net's format
        imagesTr/ID_0000.nii.gz      labelsTr/ID.nii.gz      training + validation cases
        imagesTs/ID_0000.nii.gz      labelsTs/ID.nii.gz      held-out test cases
    preprocessed_root/DatasetXXX_Name/splits_final.json     (when preprocessed_root is given)

nnU-Net trains fold ``f`` on ``splits_final.json[f]`` from the preprocessed folder; its planner (2.8.1) also copies
the raw folder's copy there if none exists, so the split is used even when the preprocessed folder was unknown at
conversion time. (If the preprocessed folder already holds a *different* split, nnU-Net's planner refuses to plan:
convert with ``preprocessed_root`` and ``overwrite`` to replace it.)

Split protocol (deterministic per seed, default seed 0)
-------------------------------------------------------
1. Case identifiers are sorted and permuted with ``numpy.random.default_rng(seed).permutation``.
2. Counts scale the paper's counts to the number ``n`` of labelled cases found, rounding halves up:
   ``test = round(n * paper_test / paper_total)`` (at least 1), and for the single-split datasets also
   ``val = round(n * paper_val / paper_total)`` (at least 1). With the paper's numbers of cases the paper's counts
   come out exactly (e.g. AMOS CT: 200 -> 160/20/20; MSD Pancreas, whose release has 281 labelled cases rather than
   the paper's 282: 30 test).
3. The first ``test`` permuted cases are the test set. Single split (AMOS): the next ``val`` are the validation
   set, the rest train; ``splits_final.json`` holds one fold. Cross-validation (KiTS, MSD): the remaining cases, in
   permuted order, are cut into 5 contiguous folds (``numpy.array_split``, sizes differ by at most one); fold ``k``
   validates on part ``k`` and trains on the other four.

The paper describes its cross-validation as "80%/10%/10%" and lists e.g. 225/27/30 for MSD Pancreas; five folds over
the 90% that remain after the test hold-out validate on 18% each, so the per-fold counts here are ~72/18/10 of all
cases (the table's 225/27 cannot come from five disjoint folds). The test hold-out matches the paper.

Failure safety: the source is validated completely before anything is written; the dataset is built in a hidden
folder next to the target and renamed into place at the end, so a failure never leaves a half-written dataset (with
``overwrite`` the old one is only removed after that).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import amos, kits, msd
from .layout import FILE_ENDING, SourceDataset, check_int, check_target, copy_cases, move_into_place

DEFAULT_SEED = 0
SPLITS_FILE = "splits_final.json"
CONVERTER_VERSION = 1  # bump when the same source and seed give different files or splits


# ------------------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class DatasetSplit:
    """Held-out test cases and nnU-Net folds, each fold ``(train, val)``; every list sorted."""

    test: tuple[str, ...]
    folds: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]

    @property
    def train_val(self) -> tuple[str, ...]:
        """The cases in imagesTr: every case that is not held out for test."""
        return tuple(sorted(self.folds[0][0] + self.folds[0][1]))

    def splits_final(self) -> list[dict[str, list[str]]]:
        """nnU-Net's ``splits_final.json`` content: one ``{"train": [...], "val": [...]}`` per fold."""
        return [{"train": list(train), "val": list(val)} for train, val in self.folds]


@dataclass(frozen=True)
class SplitProtocol:
    """The paper's split for one benchmark: number of folds and the train/val/test counts of Table 6.

    ``folds == 1`` is a single fixed train/val split (``paper_val`` validation cases); ``folds > 1`` is
    cross-validation over everything but the test set (``paper_val`` is then documentation only).
    """

    folds: int
    paper_train: int
    paper_val: int
    paper_test: int

    @property
    def paper_total(self) -> int:
        return self.paper_train + self.paper_val + self.paper_test

    def describe(self) -> str:
        counts = f"{self.paper_train}/{self.paper_val}/{self.paper_test} (train/val/test) of {self.paper_total}"
        if self.folds == 1:
            return f"single fixed split scaled from the paper's {counts}"
        return (f"test hold-out scaled from the paper's {self.paper_test} of {self.paper_total} (paper: {counts}), "
                f"{self.folds}-fold cross-validation over the rest")

    def counts(self, n: int) -> tuple[int, int]:
        """(test, val) case counts for ``n`` labelled cases; ``val`` is 0 for cross-validation.

        Raises:
            ValueError: ``n`` is too small for at least one training, validation and test case per fold.
        """
        n_test = max(1, _round_half_up(n * self.paper_test / self.paper_total))
        if self.folds == 1:
            n_val = max(1, _round_half_up(n * self.paper_val / self.paper_total))
            if n - n_test - n_val < 1:
                raise ValueError(f"{n} labelled case(s) are too few for a train/val/test split; need at least 3")
            return n_test, n_val
        if n - n_test < self.folds:
            raise ValueError(f"{n} labelled case(s) are too few for a test hold-out plus {self.folds}-fold "
                             f"cross-validation; need at least {self.folds + 1}")
        return n_test, 0

    def split(self, identifiers: Sequence[str], seed: int) -> DatasetSplit:
        """Splits ``identifiers`` as the module docstring describes; the result depends only on the set and seed."""
        ids = sorted(str(i) for i in identifiers)
        if len(set(ids)) != len(ids):
            raise ValueError("case identifiers must be unique")
        n_test, n_val = self.counts(len(ids))
        shuffled = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        test, rest = shuffled[:n_test], shuffled[n_test:]
        if self.folds == 1:
            parts = [rest[:n_val]]
        else:
            parts = [[rest[i] for i in chunk] for chunk in np.array_split(np.arange(len(rest)), self.folds)]
        folds = tuple((tuple(sorted(set(rest) - set(val))), tuple(sorted(val))) for val in parts)
        return DatasetSplit(tuple(sorted(test)), folds)


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even; a documented "halves up" is easier to reproduce elsewhere
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------------------------------- registry


# write(source, assignment identifier -> "Tr"/"Ts", dataset folder, scratch folder, num_processes) -> the
# identifiers whose labels were changed
Writer = Callable[[SourceDataset, Mapping[str, str], Path, Path, int], list[str]]


@dataclass(frozen=True)
class Converter:
    """One benchmark: where its release comes from, how it is read and written, and its split protocol.

    Attributes:
        name: registry key, e.g. ``"amos_ct"``.
        dataset_name: the folder name after ``DatasetXXX_``.
        default_id: the nnU-Net dataset id used when none is given.
        description: one line for listings and the dataset.json.
        channel: the single channel's name in dataset.json (``"CT"`` selects nnU-Net's CT normalisation).
        labels: nnU-Net labels, name -> value, background 0.
        protocol: the paper's split.
        reference: the benchmark's home page.
        release: where the release used here is published.
        locate: validates a source folder and returns its labelled cases; takes ``(source, **options)``.
        write: writes the cases into the dataset folder being built (see :data:`Writer`).
        options: keyword options ``locate`` accepts beyond the source.
    """

    name: str
    dataset_name: str
    default_id: int
    description: str
    channel: str
    labels: Mapping[str, int]
    protocol: SplitProtocol
    reference: str
    release: str
    locate: Callable[..., SourceDataset]
    write: Writer
    options: tuple[str, ...] = ()


def _copy(source: SourceDataset, assignment: Mapping[str, str], folder: Path, work: Path,
          num_processes: int) -> list[str]:
    return copy_cases(source.cases, assignment, folder)


def _copy_amos_mri(source: SourceDataset, assignment: Mapping[str, str], folder: Path, work: Path,
                   num_processes: int) -> list[str]:
    return copy_cases(source.cases, assignment, folder, write_label=amos.write_mri_label)


def _msd_writer(task: msd.MsdTask) -> Writer:
    def write(source: SourceDataset, assignment: Mapping[str, str], folder: Path, work: Path,
              num_processes: int) -> list[str]:
        msd.write_msd(source, task, assignment, folder, work, num_processes)
        return []
    return write


def _locate_amos_ct(source: Path, include_validation: bool = False) -> SourceDataset:
    return amos.locate_amos(source, "CT", include_validation)


def _locate_amos_mri(source: Path, include_validation: bool = False) -> SourceDataset:
    return amos.locate_amos(source, "MRI", include_validation)


def _locate_msd(task: msd.MsdTask) -> Callable[[Path], SourceDataset]:
    return lambda source: msd.locate_msd(source, task)


_FIVE_FOLD = 5
CONVERTERS: dict[str, Converter] = {c.name: c for c in (
    Converter("amos_ct", "AMOS22CT", 741,
              "AMOS22 CT, 15 abdominal organs; one fixed split 160/20/20 (train/val/test) as in the Rep3D paper",
              "CT", amos.CT_LABELS, SplitProtocol(1, 160, 20, 20), amos.REFERENCE, amos.RELEASE,
              _locate_amos_ct, _copy, ("include_validation",)),
    Converter("amos_mri", "AMOS22MRI", 742,
              "AMOS22 MRI (case id > 500), 13 abdominal organs; one fixed split 22/4/7 as in the Rep3D paper",
              "MRI", amos.MRI_LABELS, SplitProtocol(1, 22, 4, 7), amos.REFERENCE, amos.RELEASE,
              _locate_amos_mri, _copy_amos_mri, ("include_validation",)),
    Converter("kits21", "KiTS21", 743,
              "KiTS21 CT, kidney/tumor/cyst; 10% test hold-out, 5-fold cross-validation over the rest",
              "CT", kits.LABELS, SplitProtocol(_FIVE_FOLD, 240, 30, 30), kits.REFERENCE, kits.RELEASE,
              kits.locate_kits21, _copy),
    Converter("msd_pancreas", "MSDPancreas", 744,
              "MSD Task07 Pancreas CT, pancreas/tumor; 10% labelled test hold-out, 5-fold cross-validation",
              "CT", msd.PANCREAS.labels, SplitProtocol(_FIVE_FOLD, 225, 27, 30), msd.REFERENCE, msd.REFERENCE,
              _locate_msd(msd.PANCREAS), _msd_writer(msd.PANCREAS)),
    Converter("msd_hepatic_vessel", "MSDHepaticVessel", 745,
              "MSD Task08 HepaticVessel CT, vessel/tumor; 10% labelled test hold-out, 5-fold cross-validation",
              "CT", msd.HEPATIC_VESSEL.labels, SplitProtocol(_FIVE_FOLD, 242, 30, 31), msd.REFERENCE, msd.REFERENCE,
              _locate_msd(msd.HEPATIC_VESSEL), _msd_writer(msd.HEPATIC_VESSEL)),
)}


def get_converter(name: str) -> Converter:
    """The registered converter called ``name``; the error lists the valid names."""
    try:
        return CONVERTERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(CONVERTERS)}") from None


# ----------------------------------------------------------------------------------------------------- public API


def convert_dataset(name: str, source: str | Path, raw_root: str | Path, dataset_id: int | None = None,
                    preprocessed_root: str | Path | None = None, seed: int = DEFAULT_SEED, overwrite: bool = False,
                    include_validation: bool = False, num_processes: int | None = None) -> Path:
    """Converts a downloaded benchmark release into ``raw_root/DatasetXXX_Name`` and returns that folder.

    Args:
        name: one of :data:`CONVERTERS` (``amos_ct``, ``amos_mri``, ``kits21``, ``msd_pancreas``,
            ``msd_hepatic_vessel``).
        source: the downloaded release (layouts in :mod:`.amos`, :mod:`.kits`, :mod:`.msd`).
        raw_root: nnU-Net's raw folder (``$nnUNet_raw``).
        dataset_id: nnU-Net dataset id, 0-999; default the converter's (741-745).
        preprocessed_root: nnU-Net's preprocessed folder (``$nnUNet_preprocessed``); if given, the split is also
            written to ``preprocessed_root/DatasetXXX_Name/splits_final.json``, where nnU-Net's trainer reads it.
        seed: seed of the split (module docstring); the converted cases do not depend on it.
        overwrite: replace an existing dataset of the same folder name (and a different split file).
        include_validation: AMOS only: also use the labelled validation cases (imagesVa/labelsVa).
        num_processes: worker processes for nnU-Net's MSD converter (default nnU-Net's default); others ignore it.

    Returns:
        The dataset folder.

    Raises:
        ValueError: an unknown name, a bad argument, a source that is not the expected dataset, or too few cases.
        FileNotFoundError: the source lacks a file or folder of the expected layout (the message names it).
        FileExistsError: the target exists (without ``overwrite``), or the id is taken by another dataset.
    """
    converter = get_converter(name)
    dataset_id = converter.default_id if dataset_id is None else dataset_id
    check_int("dataset_id", dataset_id, 0, 999)  # nnU-Net names datasets with three digits
    check_int("seed", seed, 0)  # numpy's SeedSequence takes non-negative integers only
    if num_processes is not None:
        check_int("num_processes", num_processes, 1)
    options = {"include_validation": True} if include_validation else {}
    unsupported = sorted(set(options) - set(converter.options))
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} is not an option of {name!r} (only AMOS has a validation set)")

    data = converter.locate(Path(source).expanduser(), **options)  # validates the whole source; writes nothing
    split = converter.protocol.split([case.identifier for case in data.cases], seed)
    raw_root = Path(raw_root).expanduser()
    target = raw_root / f"Dataset{dataset_id:03d}_{converter.dataset_name}"
    check_target(raw_root, target, dataset_id, overwrite)
    splits_target = _check_preprocessed(preprocessed_root, target.name, dataset_id, split, overwrite)
    if num_processes is None:
        from nnunetv2.configuration import default_num_processes
        num_processes = max(1, min(default_num_processes, len(data.cases)))

    raw_root.mkdir(parents=True, exist_ok=True)
    staging = raw_root / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # a plain mkdir (not mkdtemp) so the final folder gets the user's umask, not 0700
    try:
        folder, work = staging / target.name, staging / "work"
        folder.mkdir()
        work.mkdir()
        assignment = {**{i: "Tr" for i in split.train_val}, **{i: "Ts" for i in split.test}}
        relabelled = converter.write(data, assignment, folder, work, num_processes)
        _write_dataset_json(folder, converter, data, split, seed, relabelled)
        _write_json(folder / SPLITS_FILE, split.splits_final())
        move_into_place(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if splits_target is not None:
        # after the dataset is in place: should this fail, nnU-Net's planner still copies the raw folder's split
        splits_target.mkdir(parents=True, exist_ok=True)
        _write_json(splits_target / SPLITS_FILE, split.splits_final())
    return target


def dataset_split(name: str, identifiers: Sequence[str], seed: int = DEFAULT_SEED) -> DatasetSplit:
    """The split ``convert_dataset`` would write for these case identifiers, without touching any file."""
    check_int("seed", seed, 0)
    return get_converter(name).protocol.split(identifiers, seed)


# ------------------------------------------------------------------------------------------------------ CLI glue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the arguments of the ``convert`` subcommand; :func:`run_from_args` consumes them."""
    listing = "; ".join(f"{c.name}: {c.description} (default id {c.default_id})" for c in CONVERTERS.values())
    listing = listing.replace("%", "%%")  # argparse formats help strings with %
    parser.add_argument("name", choices=list(CONVERTERS), metavar="NAME", help=f"benchmark to convert: {listing}")
    parser.add_argument("source", metavar="SOURCE",
                        help="the downloaded release: the amos22 folder (with dataset.json, imagesTr/, labelsTr/), "
                             "the kits21/data folder (case_XXXXX/), or the MSD TaskXX_Name folder")
    parser.add_argument("-d", "--dataset-id", type=int, default=None, help="nnU-Net dataset id (default per dataset)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"split seed (default {DEFAULT_SEED})")
    parser.add_argument("--include-validation", action="store_true",
                        help="AMOS only: also use the labelled validation cases (imagesVa/labelsVa)")
    parser.add_argument("-np", "--num-processes", type=int, default=None,
                        help="MSD only: worker processes for nnU-Net's MSD converter")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same folder")
    parser.add_argument("--raw-dir", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("--preprocessed-dir", default=None,
                        help="nnU-Net preprocessed folder for splits_final.json (default: $nnUNet_preprocessed; if "
                             "neither is set, nnU-Net's planner copies the split from the raw folder)")


def run_from_args(args: argparse.Namespace) -> Path:
    """Converts the dataset described by parsed :func:`add_arguments` arguments and returns its folder."""
    from ..nnunet_paths import nnunet_folder

    raw_dir = nnunet_folder("nnUNet_raw", args.raw_dir, hint=", or pass --raw-dir", must_exist=False)
    preprocessed_dir = args.preprocessed_dir or os.environ.get("nnUNet_preprocessed") or None
    return convert_dataset(args.name, args.source, raw_dir, dataset_id=args.dataset_id,
                           preprocessed_root=preprocessed_dir, seed=args.seed, overwrite=args.overwrite,
                           include_validation=args.include_validation, num_processes=args.num_processes)


# ------------------------------------------------------------------------------------------------------ writing


def _check_preprocessed(preprocessed_root: str | Path | None, folder_name: str, dataset_id: int,
                        split: DatasetSplit, overwrite: bool) -> Path | None:
    """The preprocessed dataset folder to write the split into, after refusing id clashes and foreign splits."""
    if preprocessed_root is None:
        return None
    root = Path(preprocessed_root).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"preprocessed_root {root} exists and is not a folder")
    if root.is_dir():
        clashes = sorted(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder_name)
        if clashes:
            raise FileExistsError(f"dataset id {dataset_id} is already used by {clashes[0]} in {root}; nnU-Net "
                                  f"resolves ids by prefix, so pick another id")
    existing = root / folder_name / SPLITS_FILE
    if existing.is_file() and not overwrite and _read_json_or_none(existing) != split.splits_final():
        raise FileExistsError(f"{existing} already holds a different split; pass overwrite=True (--overwrite) to "
                              f"replace it, or use the seed it was made with")
    return root / folder_name


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _write_json(path: Path, content) -> None:
    """Writes through a temporary file and a rename, so readers never see a half-written file."""
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        partial.write_text(json.dumps(content, indent=4) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_dataset_json(folder: Path, converter: Converter, data: SourceDataset, split: DatasetSplit, seed: int,
                        relabelled: list[str]) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    protocol = converter.protocol
    rep3d_split = {
        "protocol": protocol.describe(),
        "seed": seed,
        "folds": protocol.folds,
        "num_train_val": len(split.train_val),
        "num_test": len(split.test),
        "paper_counts": {"train": protocol.paper_train, "val": protocol.paper_val, "test": protocol.paper_test},
        "rule": "identifiers sorted, then numpy.random.default_rng(seed).permutation; first "
                "round_half_up(n * paper_test / paper_total) cases are the test set (imagesTs/labelsTs); "
                + ("next round_half_up(n * paper_val / paper_total) are validation, the rest train"
                   if protocol.folds == 1 else
                   f"the rest, in permuted order, is cut into {protocol.folds} folds by numpy.array_split")
                + f"; folds in {SPLITS_FILE}",
        "test_cases": list(split.test),
    }
    if protocol.folds == 1:
        rep3d_split.update(num_train=len(split.folds[0][0]), num_val=len(split.folds[0][1]))
    conversion = {"converter": converter.name, "converter_version": CONVERTER_VERSION}
    if relabelled:
        conversion["relabelled_to_background"] = {
            "cases": relabelled, "why": "label values above the dataset's labels (AMOS MRI: 14 bladder and "
                                        "15 prostate/uterus are not MRI organs)"}
    generate_dataset_json(
        str(folder), {"0": converter.channel}, dict(converter.labels), len(split.train_val), FILE_ENDING,
        dataset_name=folder.name, reference=converter.reference, release=data.info.get("release", converter.release),
        description=converter.description,
        license=data.info.get("licence", f"as stated by the release, {converter.release}"),
        converted_by="rep3d_nnunet.datasets.converters", numTest=len(split.test),
        rep3d_split=rep3d_split, rep3d_conversion=conversion,
    )
