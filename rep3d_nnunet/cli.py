"""``rep3d-nnunet`` subcommands. Parsing only: each command calls one function of the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_env(args) -> int:
    from .environment import export_lines

    print("\n".join(export_lines()))
    return 0


def _cmd_doctor(args) -> int:
    from .environment import diagnose, report

    text, status = report(diagnose())
    print(text)
    return status


def _cmd_trainers(args) -> int:
    from .variants import METHODS, SCHEDULES

    for name, method in METHODS.items():
        print(f"{name}: {method.description}")
    print("Schedule suffixes (nnU-Net style): " + ", ".join(s for s in SCHEDULES if s))
    return 0


def _cmd_plan(args) -> int:
    from .planning import plan_and_preprocess

    plan_and_preprocess(args.dataset_id, args.gpu_memory_gb, args.plans_name, args.configurations,
                        args.base_features, args.max_features, args.num_processes, not args.no_preprocess,
                        preset=args.preset)
    return 0


def _cmd_export(args) -> int:
    from .export import export_model_folder

    output = Path(args.output) if args.output else _default_export_folder(Path(args.model_folder))
    reports = export_model_folder(args.model_folder, output)
    for r in reports:
        print(f"{r.path}: {r.parameters_before:,} parameters -> {r.parameters_after:,} after folding "
              f"(logits differ by {r.max_relative_logit_difference:.1e} relative)")
    print(f"Exported {len(reports)} checkpoint(s) to {output}")
    return 0


def _default_export_folder(model_folder: Path) -> Path:
    """``Trainer__Plans__config`` -> ``Trainer__Plans_folded__config`` beside it, so nnU-Net commands address it
    with ``-p Plans_folded``."""
    parts = model_folder.resolve().name.split("__")
    if len(parts) != 3:
        raise ValueError(f"Cannot derive an output name from {model_folder}; pass --output.")
    trainer, plans, configuration = parts
    return model_folder.resolve().with_name(f"{trainer}__{plans}_folded__{configuration}")


def _cmd_synthetic(args) -> int:
    from .datasets.synthetic import run_from_args

    print(run_from_args(args))
    return 0


def _cmd_convert(args) -> int:
    from .datasets.converters import run_from_args

    print(run_from_args(args))
    return 0


def _cmd_predict(args) -> int:
    from .inference import run_from_args

    run_from_args(args)
    return 0


def _cmd_table(args) -> int:
    from .results_table import run_from_args

    print(run_from_args(args))
    return 0


def _cmd_masks(args) -> int:
    from .inspection import run_masks

    run_masks(args)
    return 0


def _cmd_erf(args) -> int:
    from .inspection import run_erf

    run_erf(args)
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo

    run_demo(DemoSettings(workdir=Path(args.workdir), dataset_id=args.dataset_id, trainer=args.trainer,
                          device=args.device))
    return 0


def _paper_presets() -> list[str]:
    from .preprocessing import PAPER_PRESETS

    return list(PAPER_PRESETS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rep3d-nnunet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("env", help="print the export line that registers the Rep3D trainers with nnU-Net "
                                    "(use: eval \"$(rep3d-nnunet env)\")").set_defaults(run=_cmd_env)
    commands.add_parser("doctor", help="check the setup and say what is wrong in plain words").set_defaults(run=_cmd_doctor)
    commands.add_parser("trainers", help="list the Rep3D trainer variants").set_defaults(run=_cmd_trainers)

    plan = commands.add_parser("plan", help="Rep3D-aware planning (patch/batch from the Rep3D memory estimate) "
                                            "and preprocessing; writes plans usable as -p Rep3DPlans")
    plan.add_argument("-d", "--dataset-id", type=int, required=True)
    plan.add_argument("--gpu-memory-gb", type=float, default=8.0, help="GPU memory target (default 8, like nnU-Net)")
    plan.add_argument("--plans-name", default=None, help="default: Rep3DPlans, or Rep3DPaperPlans with --preset")
    plan.add_argument("-c", "--configurations", nargs="+", default=None,
                      help="default: 2d 3d_fullres, or 3d_fullres with --preset")
    plan.add_argument("--preset", default=None, choices=_paper_presets(),
                      help="the paper's preprocessing for this benchmark: spacing, intensity window and percentile "
                           "min-max normalization, 96^3 patches, batch 2, the paper's network (appendix A.2)")
    plan.add_argument("--base-features", type=int, default=32, help="features of the first stage (nnU-Net: 32)")
    plan.add_argument("--max-features", type=int, default=None, help="cap on features per stage")
    plan.add_argument("-np", "--num-processes", type=int, default=2)
    plan.add_argument("--no-preprocess", action="store_true", help="write the plans only")
    plan.set_defaults(run=_cmd_plan)

    export = commands.add_parser("export", help="fold a trained model folder (all folds, all checkpoints) into a "
                                                "deployable nnU-Net model folder")
    export.add_argument("model_folder")
    export.add_argument("-o", "--output", default=None,
                        help="new model folder (default: beside the input, plans part suffixed _folded)")
    export.set_defaults(run=_cmd_export)

    from .datasets.synthetic import add_arguments

    synthetic = commands.add_parser("synthetic", help="write a synthetic nnU-Net raw dataset")
    add_arguments(synthetic)
    synthetic.set_defaults(run=_cmd_synthetic)

    from .datasets.converters import add_arguments as add_convert_arguments

    convert = commands.add_parser("convert", help="convert a paper benchmark (AMOS22 CT/MRI, KiTS21, MSD Pancreas, "
                                                  "MSD Hepatic Vessel) into nnU-Net's raw format with the paper's split")
    add_convert_arguments(convert)
    convert.set_defaults(run=_cmd_convert)

    from .inference import add_arguments as add_predict_arguments

    predict = commands.add_parser("predict", help="nnU-Net's predictor for model folders planned with --preset "
                                                  "(other model folders work with nnUNetv2_predict too)")
    add_predict_arguments(predict)
    predict.set_defaults(run=_cmd_predict)

    from .results_table import add_arguments as add_table_arguments

    table = commands.add_parser("table", help="the paper's table layout from nnU-Net's cross-validation summaries, "
                                              "with the paper's published numbers beside them")
    add_table_arguments(table)
    table.set_defaults(run=_cmd_table)

    from .inspection import add_erf_arguments, add_masks_arguments

    masks = commands.add_parser("masks", help="PNGs of the modulation masks M (and the prior P) of a model folder")
    add_masks_arguments(masks)
    masks.set_defaults(run=_cmd_masks)
    erf = commands.add_parser("erf", help="effective receptive field of a model folder, trained vs initialisation")
    add_erf_arguments(erf)
    erf.set_defaults(run=_cmd_erf)

    demo = commands.add_parser("demo", help="end to end on a synthetic dataset: convert, plan, train, export, "
                                            "predict, evaluate")
    demo.add_argument("--workdir", default="rep3d_demo")
    demo.add_argument("--dataset-id", type=int, default=990)
    demo.add_argument("--trainer", default="nnUNetTrainerRep3D_quick")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"rep3d-nnunet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
