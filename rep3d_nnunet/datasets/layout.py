"""Reading downloaded benchmark releases: labelled cases, file pairing and the layout errors the converters share.

A release is read, never written: every function here only lists folders and reads small JSON files, so a converter
can validate its source completely before anything is written. Errors name the missing or unexpected path, what
layout was expected and how to fix the call.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

FILE_ENDING = ".nii.gz"


@dataclass(frozen=True)
class LabelledCase:
    """One labelled source case: its nnU-Net identifier, its single-channel image file and its label file."""

    identifier: str
    image: Path
    label: Path


@dataclass(frozen=True)
class SourceDataset:
    """A validated release: the folder holding its layout, its labelled cases (sorted by identifier) and metadata.

    ``info`` holds values for the converted dataset.json (``licence``, ``release``, ``reference``) read from the
    release where it states them.
    """

    root: Path
    cases: tuple[LabelledCase, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    def by_identifier(self) -> dict[str, LabelledCase]:
        return {case.identifier: case for case in self.cases}


# Writes one label file from a source label file; returns True if the labels were changed on the way.
LabelWriter = Callable[[Path, Path], bool]


def is_hidden(name: str) -> bool:
    """Names nnU-Net's converters skip too: dot files, including macOS resource forks (``._amos_0001.nii.gz``)."""
    return name.startswith((".", "_"))


def preview(names: Iterable[str], limit: int = 5) -> str:
    """``a, b, c and 4 more``: enough names to find the problem without flooding the message."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def require(path: Path, kind: str, layout: str, fix: str) -> None:
    """Raises FileNotFoundError naming ``path`` unless it exists as a ``kind`` (``"folder"`` or ``"file"``)."""
    present = path.is_dir() if kind == "folder" else path.is_file()
    if not present:
        problem = "is not a folder" if kind == "folder" and path.exists() else "not found"
        raise FileNotFoundError(f"{path} {problem}: expected {layout}. Fix: {fix}")


def load_json(path: Path, layout: str, fix: str) -> dict:
    """The JSON object in ``path``; errors say which file is missing or unreadable."""
    require(path, "file", layout, fix)
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); expected {layout}. Fix: {fix}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}, not an object; expected {layout}. Fix: {fix}")
    return content


def nifti_files(folder: Path) -> dict[str, Path]:
    """Identifier -> path for every visible ``*.nii.gz`` file directly in ``folder`` (identifier = name - ending)."""
    return {p.name[: -len(FILE_ENDING)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(FILE_ENDING) and not is_hidden(p.name) and p.is_file()}


def pair_folders(images: Path, labels: Path, fix: str) -> list[LabelledCase]:
    """Pairs ``images/ID.nii.gz`` with ``labels/ID.nii.gz``; every file must have its partner.

    Args:
        images: folder of single-channel images named ``ID.nii.gz``.
        labels: folder of label maps named like their images.
        fix: the advice appended to the error.

    Returns:
        The labelled cases sorted by identifier.

    Raises:
        FileNotFoundError: an image lacks its label or a label its image (an incomplete download or extraction).
    """
    image_files, label_files = nifti_files(images), nifti_files(labels)
    without_label = sorted(set(image_files) - set(label_files))
    without_image = sorted(set(label_files) - set(image_files))
    if without_label or without_image:
        problems = []
        if without_label:
            problems.append(f"{len(without_label)} image(s) in {images} have no label in {labels} "
                            f"({preview(without_label)})")
        if without_image:
            problems.append(f"{len(without_image)} label(s) in {labels} have no image in {images} "
                            f"({preview(without_image)})")
        raise FileNotFoundError("; ".join(problems) + f". Every case needs both files. Fix: {fix}")
    return [LabelledCase(i, image_files[i], label_files[i]) for i in sorted(image_files)]


def check_listed_cases(dataset_json: Mapping[str, Any], key: str, present: Iterable[str], json_path: Path,
                       fix: str) -> None:
    """Raises if ``dataset_json[key]`` (MSD-style ``[{"image": ..., "label": ...}]``) lists cases not on disk.

    The release's own list catches a truncated extraction that left images and labels consistently incomplete,
    which file pairing alone cannot see. Malformed entries are left to the pairing check.
    """
    entries = dataset_json.get(key)
    if not isinstance(entries, list):
        return
    listed = {Path(e["label"]).name[: -len(FILE_ENDING)] for e in entries
              if isinstance(e, dict) and isinstance(e.get("label"), str) and e["label"].endswith(FILE_ENDING)}
    missing = sorted(listed - set(present))
    if missing:
        raise FileNotFoundError(f"{json_path} lists {len(listed)} cases under {key!r} but {len(missing)} of them are "
                                f"not on disk ({preview(missing)}): the download or extraction looks incomplete. "
                                f"Fix: {fix}")


def copy_label(source: Path, target: Path) -> bool:
    """The default :data:`LabelWriter`: a byte-for-byte copy (geometry and values exactly as released)."""
    shutil.copyfile(source, target)
    return False


def copy_cases(cases: Sequence[LabelledCase], assignment: Mapping[str, str], folder: Path,
               write_label: LabelWriter = copy_label) -> list[str]:
    """Writes cases into an nnU-Net raw folder: images copied byte for byte, labels through ``write_label``.

    Args:
        cases: the cases to write.
        assignment: identifier -> ``"Tr"`` or ``"Ts"``; a case goes to ``images{X}/ID_0000.nii.gz`` and
            ``labels{X}/ID.nii.gz``.
        folder: the dataset folder being built.
        write_label: writes one label file; returns True if it changed the labels.

    Returns:
        Identifiers whose labels ``write_label`` changed, sorted.
    """
    changed = []
    for case in cases:
        part = assignment[case.identifier]
        images, labels = folder / f"images{part}", folder / f"labels{part}"
        images.mkdir(exist_ok=True)
        labels.mkdir(exist_ok=True)
        shutil.copyfile(case.image, images / f"{case.identifier}_0000{FILE_ENDING}")
        if write_label(case.label, labels / f"{case.identifier}{FILE_ENDING}"):
            changed.append(case.identifier)
    return sorted(changed)


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def check_target(raw_root: Path, target: Path, dataset_id: int, overwrite: bool) -> None:
    """Refuses to clobber a dataset unless asked, and never touches another dataset holding the same id."""
    if raw_root.exists() and not raw_root.is_dir():
        raise ValueError(f"raw_root {raw_root} exists and is not a folder")
    if raw_root.is_dir():
        # nnU-Net resolves ids by prefix; two folders with one id make every later nnU-Net command fail
        clashes = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != target.name)
        if clashes:
            raise FileExistsError(f"dataset id {dataset_id} is already used by {clashes[0]} in {raw_root}; "
                                  f"pick another id")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it or pick "
                              f"another dataset id")


def move_into_place(staging: Path, target: Path) -> None:
    """Renames the finished staging folder to ``target``, replacing an old dataset only once the new one exists."""
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)  # put the old dataset back rather than leave none
        raise
    shutil.rmtree(retired, ignore_errors=True)
