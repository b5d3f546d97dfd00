"""``rep3d-nnunet`` subcommands. Parsing only: each command calls one function of the library."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from typing import NamedTuple


def _cmd_env(args) -> int:
    from .environment import export_lines, remove_external_trainer_module, sync_external_trainer_module, undo_lines

    # stdout is for the shell (eval "$(rep3d-nnunet env)"); notes and errors go to stderr
    try:
        if args.undo:
            print("\n".join(undo_lines()))
            if remove_external_trainer_module():
                print("rep3d-nnunet env: removed the trainer lookup module from nnU-Net's package.", file=sys.stderr)
            return 0
        print("\n".join(export_lines()))
        note = sync_external_trainer_module()
    except (PermissionError, FileExistsError) as error:
        print(f"rep3d-nnunet env: error: {error}", file=sys.stderr)
        return 2
    if note:
        print(f"rep3d-nnunet env: {note}", file=sys.stderr)
    return 0


def _cmd_doctor(args) -> int:
    from .environment import diagnose, report

    text, status = report(diagnose())
    print(text)
    return status


def _cmd_trainers(args) -> int:
    from .variants import METHODS, SCHEDULES, trainer_names

    if args.all:
        print("\n".join(trainer_names()))
        return 0
    for name, method in METHODS.items():
        print(f"{name}: {method.description}")
    print("Schedule suffixes (nnU-Net style): " + ", ".join(s for s in SCHEDULES if s))
    print(f"({len(trainer_names())} trainer names in all: rep3d-nnunet trainers --all)")
    return 0


class _LibraryCommand(NamedTuple):
    """A subcommand whose arguments and run function live in a library module, imported only when it is used."""

    help: str
    module: str
    add_arguments: str = "add_arguments"
    run: str = "run_from_args"


# The run function's return value is printed unless it is None or an exit status.
_LIBRARY_COMMANDS = {
    "plan": _LibraryCommand("Rep3D-aware planning (patch/batch from the Rep3D memory estimate) and preprocessing; "
                            "writes plans usable as -p Rep3DPlans", ".planning"),
    "export": _LibraryCommand("fold a trained model folder (all folds, all checkpoints) into a deployable nnU-Net "
                              "model folder", ".export"),
    "synthetic": _LibraryCommand("write a synthetic nnU-Net raw dataset", ".datasets.synthetic"),
    "convert": _LibraryCommand("convert a paper benchmark (AMOS22 CT/MRI, KiTS21, MSD Pancreas, MSD Hepatic Vessel) "
                               "into nnU-Net's raw format with the paper's split", ".datasets.converters"),
    "predict": _LibraryCommand("nnU-Net's predictor for model folders planned with --preset (other model folders "
                               "work with nnUNetv2_predict too)", ".inference"),
    "table": _LibraryCommand("the paper's table layout from nnU-Net's cross-validation summaries, with the paper's "
                             "published numbers beside them", ".results_table"),
    "masks": _LibraryCommand("PNGs of the modulation masks M (and the prior P) of a model folder", ".masks",
                             "add_masks_arguments", "run_masks"),
    "erf": _LibraryCommand("effective receptive field of a model folder, trained vs initialisation", ".erf",
                           "add_erf_arguments", "run_erf"),
    "split": _LibraryCommand("low-data splits_final.json: a fixed held-out test set and 5 folds whose training "
                             "parts hold a fraction of the other cases (the DKA paper's protocol)", ".splits"),
    "demo": _LibraryCommand("end to end on real MRI (MSD Hippocampus) or a synthetic task: convert, plan, train, "
                            "export, predict, evaluate, one table and one picture",
                            ".demo"),
    "compare": _LibraryCommand("does Rep3D pay on this dataset? nnU-Net's trainers (SGD, AdamW, ResEnc M) against the "
                               "default Rep3D trainer on your folds and budget: Dice per iteration and at equal "
                               "training time, resumable", ".compare"),
}


def _run_library_command(spec: _LibraryCommand, args) -> int:
    result = getattr(importlib.import_module(spec.module, __package__), spec.run)(args)
    if result is not None and not isinstance(result, int):
        print(result)
    return result if isinstance(result, int) else 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``command`` one whose other library subcommands have no arguments (and whose
    modules are not imported)."""
    parser = argparse.ArgumentParser(prog="rep3d-nnunet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    env = commands.add_parser("env", help="print the export line that registers the Rep3D trainers with nnU-Net "
                                          "(use: eval \"$(rep3d-nnunet env)\"); on nnU-Net < 2.8 also install the "
                                          "lookup module it needs")
    env.add_argument("--undo", action="store_true", help="print the line that unregisters them and remove the lookup "
                                                         "module (use: eval \"$(rep3d-nnunet env --undo)\")")
    env.set_defaults(run=_cmd_env)
    commands.add_parser("doctor", help="check the setup and say what is wrong in plain words").set_defaults(run=_cmd_doctor)
    trainers = commands.add_parser("trainers", help="list the Rep3D trainer variants")
    trainers.add_argument("--all", action="store_true", help="every trainer name, methods x schedule suffixes")
    trainers.set_defaults(run=_cmd_trainers)

    for name, spec in _LIBRARY_COMMANDS.items():
        sub = commands.add_parser(name, help=spec.help)
        sub.set_defaults(run=functools.partial(_run_library_command, spec))
        if command in (None, name):  # other modules stay unimported: `rep3d-nnunet env` must be quick
            getattr(importlib.import_module(spec.module, __package__), spec.add_arguments)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in _LIBRARY_COMMANDS else "").parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError) as error:
        print(f"rep3d-nnunet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
