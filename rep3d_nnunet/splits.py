"""Low-data splits (the DKA paper's protocol): a fixed held-out test set, then 5 folds whose training parts hold a
fraction of the remaining cases.

``rep3d-nnunet split -d ID --fraction F --seed S`` writes nnU-Net's ``splits_final.json`` (read by nnUNetv2_train for
``FOLD`` 0-4) into the preprocessed dataset and ``lowdata_split.json`` beside it (the test cases, the fraction, the
seeds). The test set depends on ``--test-seed`` only, so runs with different fractions and seeds are evaluated on the
same held-out cases; the remaining cases are divided into 5 validation parts (fixed by ``--test-seed`` as well), and
each fold's training part is a seeded sample of ``round(F * remaining)`` cases (at least one) from the cases outside
its validation part. An existing split is never replaced without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

SPLITS_FILE = "splits_final.json"
LOWDATA_FILE = "lowdata_split.json"


@dataclass(frozen=True)
class LowDataSplit:
    """The test cases, and per fold the training and validation cases."""

    test: list[str]
    folds: list[dict[str, list[str]]]
    fraction: float
    seed: int
    test_seed: int


def training_cases(raw_dataset: Path) -> list[str]:
    """Case identifiers of a raw dataset (its labelsTr files, nnU-Net's file ending from dataset.json), sorted."""
    dataset_json = json.loads((raw_dataset / "dataset.json").read_text())
    ending = dataset_json.get("file_ending", ".nii.gz")
    labels = raw_dataset / "labelsTr"
    cases = sorted(p.name[: -len(ending)] for p in labels.glob(f"*{ending}") if not p.name.startswith("."))
    if not cases:
        raise FileNotFoundError(f"{labels} holds no labelled cases (*{ending}); is {raw_dataset} an nnU-Net raw "
                                f"dataset?")
    return cases


def make_split(cases: list[str], fraction: float, seed: int = 0, test_fraction: float = 0.2, folds: int = 5,
               test_seed: int = 0) -> LowDataSplit:
    """The low-data split of ``cases`` (see the module docstring).

    Raises:
        ValueError: a fraction outside (0, 1], a test fraction outside [0, 1), too few cases for the test set and
            the folds, or a fraction asking for more training cases than a fold has outside its validation part.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction} leaves no training case: give a fraction in (0, 1], e.g. 0.1 for 10% "
                         f"of the cases outside the test set.")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"--test-fraction {test_fraction} must be in [0, 1).")
    if folds < 2:
        raise ValueError(f"--folds {folds}: nnU-Net's cross-validation needs at least 2 folds.")
    order = sorted(cases)
    random.Random(test_seed).shuffle(order)
    num_test = round(test_fraction * len(order))
    test, remaining = sorted(order[:num_test]), order[num_test:]
    if len(remaining) < folds + 1:
        raise ValueError(f"The dataset has {len(cases)} cases; after {num_test} test cases {len(remaining)} remain, "
                         f"fewer than {folds + 1} ({folds} validation parts and a training case). Use fewer --folds or "
                         f"a smaller --test-fraction.")
    validation_parts = [sorted(remaining[i::folds]) for i in range(folds)]
    wanted = max(1, round(fraction * len(remaining)))
    smallest_pool = len(remaining) - max(len(v) for v in validation_parts)
    if wanted > smallest_pool:
        raise ValueError(f"--fraction {fraction} asks for {wanted} training cases, but a fold has {smallest_pool} "
                         f"outside its validation part; use --fraction <= {smallest_pool / len(remaining):.2f}.")
    split_folds = []
    for k, validation in enumerate(validation_parts):
        pool = sorted(c for c in remaining if c not in validation)
        sample = random.Random(f"{seed}-{k}").sample(pool, wanted)
        split_folds.append({"train": sorted(sample), "val": validation})
    return LowDataSplit(test, split_folds, fraction, seed, test_seed)


def write_split(dataset_id: int | str, fraction: float, seed: int = 0, test_fraction: float = 0.2, folds: int = 5,
                test_seed: int = 0, force: bool = False) -> Path:
    """Writes ``splits_final.json`` and ``lowdata_split.json`` into the preprocessed dataset; returns the former.

    Raises:
        ValueError, FileNotFoundError: nnU-Net's folders unset, an unknown dataset, a dataset not planned yet.
        FileExistsError: a split exists and ``force`` is not set.
    """
    from .nnunet_paths import preprocessed_dataset, raw_dataset

    raw = raw_dataset(dataset_id)
    preprocessed = preprocessed_dataset(dataset_id)
    target = preprocessed / SPLITS_FILE
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to replace it (nnU-Net's folds 0-4 would change, and "
                              f"with them what every model of this dataset was validated on).")
    split = make_split(training_cases(raw), fraction, seed, test_fraction, folds, test_seed)
    target.write_text(json.dumps(split.folds, indent=2))
    (preprocessed / LOWDATA_FILE).write_text(json.dumps({
        "fraction": split.fraction, "seed": split.seed, "test_seed": split.test_seed, "test": split.test,
        "training_cases_per_fold": len(split.folds[0]["train"]),
    }, indent=2))
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet split``."""
    parser.add_argument("-d", "--dataset-id", required=True, help="nnU-Net dataset id or DatasetXXX_Name")
    parser.add_argument("--fraction", type=float, required=True,
                        help="fraction of the cases outside the test set that each fold trains on (at least one case)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training samples (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="held-out test cases, a fraction of all cases (default 0.2)")
    parser.add_argument("--test-seed", type=int, default=0,
                        help="seed of the test set and the validation parts, fixed across fractions (default 0)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5, as nnU-Net)")
    parser.add_argument("--force", action="store_true", help="replace an existing splits_final.json")


def run_from_args(args: argparse.Namespace) -> str:
    target = write_split(args.dataset_id, args.fraction, args.seed, args.test_fraction, args.folds, args.test_seed,
                         args.force)
    summary = json.loads((target.parent / LOWDATA_FILE).read_text())
    return (f"Wrote {target}: {args.folds} folds of {summary['training_cases_per_fold']} training case(s) each; "
            f"{len(summary['test'])} held-out test cases in {target.parent / LOWDATA_FILE}")
