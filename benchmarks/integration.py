"""nnU-Net's own integration protocol (``nnunetv2/tests/integration_tests``) with any trainer, e.g. a Rep3D one.

Usage: ``benchmarks/integration.sh TRAINER [--data PATH] [--workdir DIR] [--max-features N] [--jobs 2]``
(``python benchmarks/integration.py`` takes the same arguments). It runs, in a fresh nnU-Net tree, the steps of
nnU-Net's ``prepare_integration_tests.sh`` and ``run_integration_test.sh`` for Dataset999_IntegrationTest_Hippocampus,
with TRAINER where nnU-Net uses ``nnUNetTrainer_5epochs``:

1. ``nnUNetv2_convert_MSD_dataset`` of an MSD Task04_Hippocampus folder (Dataset004), every ``--test-every``-th case
   moved to imagesTs/labelsTs (the MSD release's test images have no labels; these give the final prediction
   something to predict and a Dice to report);
2. nnU-Net's ``Dataset999_IntegrationTest_Hippocampus`` (a copy of Dataset004), ``nnUNetv2_plan_and_preprocess
   --no_pp``, nnU-Net's ``add_lowres_and_cascade`` (3d_lowres and 3d_cascade_fullres), ``nnUNetv2_preprocess -c 2d
   3d_lowres 3d_fullres``; optionally features capped at ``--max-features`` in every configuration (CPU-sized);
3. ``nnUNetv2_train 999 {3d_fullres,2d,3d_lowres,3d_cascade_fullres} {0..4} -tr TRAINER --npz``;
4. nnU-Net's ``run_integration_test_bestconfig_inference.py``: ``find_best_configuration`` over the four
   configurations with ensembling, prediction of imagesTs with the selected model(s) (folds 0 and 3), ensembling,
   postprocessing. That script hard-codes ``nnUNetTrainer_5epochs`` and a CUDA predictor, and predicts a selected
   cascade without the lowres segmentations it needs (nnU-Net's predictor then stops with an assertion), so
   :func:`best_configuration_inference` is that script with the trainer as an argument, the device chosen by
   availability, and the cascade fed by a prediction of its previous stage; everything else is the same calls;
5. nnU-Net's evaluation of the postprocessed predictions against labelsTs.

Every command is printed before it runs; any failure stops the run with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE_ID, DATASET_ID = 4, 999  # nnU-Net's integration dataset is a copy of Dataset004_Hippocampus
DATASET_NAME = "Dataset999_IntegrationTest_Hippocampus"
# run_integration_test.sh trains 3d_fullres, 2d, 3d_lowres, cascade. The cascade trains on the lowres validation's
# next-stage segmentations of every case, so it needs all five lowres folds; the other 15 folds are independent and
# share one queue (--jobs at a time), the cascade's five follow
CONFIGURATIONS = ("3d_fullres", "3d_lowres", "3d_cascade_fullres", "2d")
TRAINING_PHASES = (("3d_fullres", "3d_lowres", "2d"), ("3d_cascade_fullres",))
FOLDS = (0, 1, 2, 3, 4)
PREDICTION_FOLDS = (0, 3)  # as in nnU-Net's bestconfig script


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _run(command: list[str], env: dict) -> None:
    print("\n$ " + " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, env=env, check=True)
    print(f"  ({time.time() - started:.0f} s)", flush=True)


def _run_parallel(commands: list[list[str]], env: dict, jobs: int) -> None:
    """Runs independent commands, ``jobs`` at a time and each started as soon as a slot is free (a fold that finishes
    early does not wait for its partner), one OpenMP thread each (see tests/nnunet_helpers.run_in_pairs for why the
    passive wait policy matters on two cores); prints a command's output when it fails and stops the others."""
    if jobs == 1:
        for command in commands:
            _run(command, env)
        return
    parallel_env = {**env, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    waiting, running = list(commands), []
    while waiting or running:
        while waiting and len(running) < jobs:
            command = waiting.pop(0)
            print("\n$ " + " ".join(command) + " &", flush=True)
            output = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill and stall the command
            running.append((command, subprocess.Popen(command, env=parallel_env, stdout=output,
                                                      stderr=subprocess.STDOUT, text=True), output, time.time()))
        time.sleep(1)
        for entry in [e for e in running if e[1].poll() is not None]:
            running.remove(entry)
            command, process, output, started = entry
            if process.returncode != 0:
                output.seek(0)
                print(output.read()[-8000:], flush=True)
                for _, other, _, _ in running:
                    other.terminate()
                raise subprocess.CalledProcessError(process.returncode, command)
            output.close()
            print(f"  ({time.time() - started:.0f} s: {' '.join(command[1:5])})", flush=True)


def default_data() -> Path:
    """The 25 cases that ship with the package (a download of the whole task goes in with --data)."""
    from rep3d_nnunet.datasets.hippocampus import SUBSET

    return SUBSET


def environment(workdir: Path, device: str) -> dict:
    from rep3d_nnunet.environment import export_lines

    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(workdir / name)
        (workdir / name).mkdir(parents=True, exist_ok=True)
    env["nnUNet_extTrainer"] = export_lines(env)[0].split("=", 1)[1]
    env.setdefault("nnUNet_def_n_proc", "1" if device == "cpu" else str(min(os.cpu_count() or 1, 8)))
    env.setdefault("nnUNet_compile", "false")
    if device == "cpu":  # see rep3d_nnunet.demo.demo_environment: spin-waiting threads stall on a shared CPU
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def cap_features(plans_file: Path, max_features: int) -> None:
    """Caps features_per_stage at ``max_features`` in every configuration that has them (CPU-sized networks)."""
    plans = json.loads(plans_file.read_text())
    for configuration in plans["configurations"].values():
        kwargs = configuration.get("architecture", {}).get("arch_kwargs", {})
        if "features_per_stage" in kwargs:
            kwargs["features_per_stage"] = [min(f, max_features) for f in kwargs["features_per_stage"]]
    plans_file.write_text(json.dumps(plans, indent=4))


def best_configuration_inference(trainer: str, device: str) -> dict:
    """nnU-Net's run_integration_test_bestconfig_inference.py for ``trainer`` (see the module docstring for the three
    differences). Returns find_best_configuration's result."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_pickle
    from nnunetv2.ensembling.ensemble import ensemble_folders
    from nnunetv2.evaluation.find_best_configuration import (
        dumb_trainer_config_plans_to_trained_models_dict,
        find_best_configuration,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_raw, nnUNet_results
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    source_dir = join(nnUNet_raw, DATASET_NAME, "imagesTs")
    target_dir_base = join(nnUNet_results, DATASET_NAME)
    models = dumb_trainer_config_plans_to_trained_models_dict([trainer], list(CONFIGURATIONS), ["nnUNetPlans"])
    ret = find_best_configuration(DATASET_ID, models, allow_ensembling=True, num_processes=8, overwrite=True,
                                  folds=FOLDS, strict=True)
    has_ensemble = len(ret["best_model_or_ensemble"]["selected_model_or_models"]) > 1

    def predict(configuration: str, output_dir: str, save_probabilities: bool) -> None:
        predictor = nnUNetPredictor(verbose=False, allow_tqdm=False, device=torch.device(device))
        predictor.initialize_from_trained_model_folder(
            get_output_folder(DATASET_ID, trainer, "nnUNetPlans", configuration), PREDICTION_FOLDS)
        previous = predictor.configuration_manager.previous_stage_name
        previous_dir = None
        if previous is not None:  # the cascade: the previous stage's segmentations are its second input
            previous_dir = join(target_dir_base, f"pred_{previous}_for_{configuration}")
            predict(previous, previous_dir, False)
        predictor.predict_from_files(source_dir, output_dir, save_probabilities, overwrite=True,
                                     folder_with_segs_from_prev_stage=previous_dir)

    output_folders = []
    for model in ret["best_model_or_ensemble"]["selected_model_or_models"]:
        output_dir = join(target_dir_base, f"pred_{model['configuration']}")
        predict(model["configuration"], output_dir, has_ensemble)
        output_folders.append(output_dir)
    if has_ensemble:
        ensemble_folders(output_folders, join(target_dir_base, "ensemble_predictions"), save_merged_probabilities=False)
        folder_for_pp = join(target_dir_base, "ensemble_predictions")
    else:
        folder_for_pp = output_folders[0]
    pp_fns, pp_fn_kwargs = load_pickle(ret["best_model_or_ensemble"]["postprocessing_file"])
    apply_postprocessing_to_folder(folder_for_pp, join(target_dir_base, "ensemble_predictions_postprocessed"), pp_fns,
                                   pp_fn_kwargs, plans_file_or_dict=ret["best_model_or_ensemble"]["some_plans_file"])
    return ret


def check_trainer(trainer: str) -> None:
    """The trainer must be one nnU-Net can find (ours through nnUNet_extTrainer, or nnU-Net's own)."""
    from rep3d_nnunet.model_folder import find_trainer_class

    find_trainer_class(trainer)


def run_protocol(args: argparse.Namespace) -> None:
    from rep3d_nnunet.datasets.hippocampus import converter_input, move_held_out_cases
    from rep3d_nnunet.datasets.msd import HIPPOCAMPUS, locate_msd

    started = time.time()
    data = Path(args.data) if args.data else default_data()
    source = locate_msd(data, HIPPOCAMPUS)  # one clear error for a folder that is not MSD Task04
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rep3d_integration_"))
    workdir.mkdir(parents=True, exist_ok=True)
    prepared_marker = workdir / "prepared.json"
    resuming = args.resume and prepared_marker.is_file()
    if any(workdir.iterdir()) and not resuming:
        raise FileExistsError(f"{workdir} is not empty (and holds no prepared run to --resume). Fix: pass a new or "
                              f"empty --workdir (or none: a temporary one)")
    env = environment(workdir, device)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc"):
        os.environ[name] = env[name]  # for step 4, in this process: nnunetv2.paths reads them when first imported
    check_trainer(args.trainer)
    print(f"nnU-Net's integration protocol with {args.trainer} on {device}: {len(source.cases[::args.every])} cases "
          f"from {source.root}, working in {workdir}")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc"):
        print(f"  export {name}={env[name]}")
    n = env["nnUNet_def_n_proc"]
    python = sys.executable

    used = len(source.cases[::args.every])
    if resuming:
        test = json.loads(prepared_marker.read_text())["test_cases"]
        print(f"\n# 1.-2. resumed: {workdir} holds the converted, planned and preprocessed dataset")
    else:
        print("\n# 1. nnU-Net's MSD converter; held-out test cases")
        converter_folder = converter_input(source.root, workdir / "msd_source", args.every)
        print(f"  {converter_folder}: {source.root}'s imagesTr and labelsTr"
              + (f" (every {args.every}th case: {used} of {len(source.cases)})" if args.every > 1 else "")
              + ", an empty imagesTs (the converter needs it)")
        _run([_bin("nnUNetv2_convert_MSD_dataset"), "-i", str(converter_folder), "-overwrite_id", str(SOURCE_ID),
              "-np", n], env)
        test = move_held_out_cases(workdir / "nnUNet_raw" / f"Dataset{SOURCE_ID:03d}_Hippocampus", args.test_every)
        print(f"  moved every {args.test_every}th case to imagesTs/labelsTs: {len(test)} test cases "
              f"({', '.join(test[:4])}{', ...' if len(test) > 4 else ''})")

        print("\n# 2. nnU-Net's integration dataset, planning, 3d_lowres + cascade, preprocessing")
        _run([python, "-m", "nnunetv2.dataset_conversion.datasets_for_integration_tests."
                            "Dataset999_IntegrationTest_Hippocampus"], env)
        _run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "--no_pp", "-npfp", n], env)
        _run([python, "-m", "nnunetv2.tests.integration_tests.add_lowres_and_cascade", "-d", str(DATASET_ID)], env)
        plans_file = workdir / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json"
        if args.max_features:
            cap_features(plans_file, args.max_features)
            print(f"  features capped at {args.max_features} in every configuration of {plans_file.name} (CPU-sized)")
        _run([_bin("nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "3d_lowres", "3d_fullres",
              "-np", n, n, n], env)

        prepared_marker.write_text(json.dumps({"test_cases": test}))

    print(f"\n# 3. {len(CONFIGURATIONS)} configurations x {len(FOLDS)} folds with {args.trainer} (--npz)")
    train_env = {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0")} if device == "cpu" else env
    for phase in TRAINING_PHASES:
        commands = []
        for configuration, fold in [(c, f) for c in phase for f in FOLDS]:
            fold_folder = workdir / "nnUNet_results" / DATASET_NAME / f"{args.trainer}__nnUNetPlans__{configuration}" \
                / f"fold_{fold}"
            if (fold_folder / "validation" / "summary.json").is_file():
                print(f"  {configuration} fold {fold}: trained and validated earlier")
                continue
            # a fold stopped during its final validation validates again from its final checkpoint
            validate_only = ["--val"] if (fold_folder / "checkpoint_final.pth").is_file() else []
            commands.append([_bin("nnUNetv2_train"), str(DATASET_ID), configuration, str(fold), "-tr", args.trainer,
                             "--npz", "-device", device, *validate_only])
        _run_parallel(commands, train_env, args.jobs)

    print("\n# 4. find_best_configuration (ensembling allowed), prediction of imagesTs with the best, postprocessing")
    results = workdir / "nnUNet_results" / DATASET_NAME
    raw = workdir / "nnUNet_raw" / DATASET_NAME
    summary = results / "ensemble_predictions_postprocessed" / "summary.json"
    if resuming and step_4_done(results, test):
        result = json.loads((results / "inference_information.json").read_text())
        print(f"  resumed: {results} holds find_best_configuration's choice and the postprocessed predictions of "
              f"every test case")
    else:
        print(f"$ {python} -c 'best_configuration_inference({args.trainer!r}, {device!r})'  "
              f"(nnU-Net's run_integration_test_bestconfig_inference.py for this trainer)", flush=True)
        step_started = time.time()
        result = best_configuration_inference(args.trainer, device)
        print(f"  ({time.time() - step_started:.0f} s)")

    print("\n# 5. nnU-Net's evaluation of the postprocessed test predictions")
    _run([_bin("nnUNetv2_evaluate_folder"), str(raw / "labelsTs"), str(summary.parent), "-djfile",
          str(raw / "dataset.json"), "-pfile", result["best_model_or_ensemble"]["some_plans_file"], "-o", str(summary),
          "-np", n], env)

    print(f"\nResult ({args.trainer}, {used - len(test)} training cases x 5 folds, {len(test)} test cases, {device}):")
    print(result_lines(result, json.loads(summary.read_text())))
    print(f"Wall time: {time.time() - started:.0f} s. Everything is in {workdir}.")


def step_4_done(results: Path, test_cases: list[str]) -> bool:
    """Whether a stopped run got through step 4: find_best_configuration's choice is saved and every test case has
    its postprocessed segmentation (the folder is written last)."""
    postprocessed = results / "ensemble_predictions_postprocessed"
    return (results / "inference_information.json").is_file() and all(
        (postprocessed / f"{case}.nii.gz").is_file() for case in test_cases)


def model_label(identifier: str) -> str:
    """find_best_configuration's model identifiers, by configuration: ``T__P__3d_lowres`` -> ``3d_lowres``,
    ``ensemble___T__P__3d_lowres___T__P__2d___0_1_2_3_4`` -> ``3d_lowres + 2d``."""
    if identifier.startswith("ensemble___"):
        return " + ".join(member.split("__")[-1] for member in identifier.split("___")[1:-1])
    return identifier.split("__")[-1]


def result_lines(result: dict, test_summary: dict) -> str:
    """What the protocol printed last: cross-validation Dice of every model and ensemble (find_best_configuration's
    foreground mean over the 5 folds' validation cases), the selection, and the test Dice after postprocessing."""
    best = result["best_model_or_ensemble"]
    selected = " + ".join(m["configuration"] for m in best["selected_model_or_models"])
    ranked = sorted(result["all_results"].items(), key=lambda item: -item[1])
    return "\n".join([
        "  cross-validation Dice (foreground mean): " + ", ".join(f"{model_label(k)} {v:.3f}" for k, v in ranked),
        f"  selected: {selected}; cross-validation Dice {best['result_on_crossval_pre_pp']:.3f} before, "
        f"{best['result_on_crossval_post_pp']:.3f} after postprocessing",
        "  test Dice (postprocessed): " + ", ".join(
            f"class {label} {values['Dice']:.3f}" for label, values in test_summary["mean"].items())
        + f", mean {test_summary['foreground_mean']['Dice']:.3f}"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/integration.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("trainer", help="trainer name, e.g. nnUNetTrainerRep3D_1epoch_5iterations (CPU smoke run)")
    parser.add_argument("--data", help="an MSD Task04_Hippocampus folder, e.g. the whole download (default: the 25 "
                                       "cases in rep3d_nnunet/data/Task04_Hippocampus)")
    parser.add_argument("--workdir", help="an empty folder for the nnU-Net tree (default: a new temporary folder)")
    parser.add_argument("--max-features", type=int, default=0,
                        help="cap features per stage in every configuration (default: the plan's, as nnU-Net's)")
    parser.add_argument("--every", type=int, default=1,
                        help="use every Nth case of --data only (sorted; default 1: all), for shorter runs")
    parser.add_argument("--test-every", type=int, default=10,
                        help="every Nth case becomes a held-out test case (default 10)")
    parser.add_argument("--jobs", type=int, default=1, help="folds trained at once (default 1)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run in --workdir: folds validated earlier are kept, folds with a "
                             "final checkpoint are validated again (nnUNetv2_train --val), the rest trained; step 4 "
                             "is kept when its postprocessed test predictions are complete")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.max_features < 0 or args.test_every < 2 or args.jobs < 1 or args.every < 1:
            raise ValueError("--max-features must be >= 0, --test-every >= 2, --jobs >= 1 and --every >= 1")
        run_protocol(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"integration: error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"integration: error: {Path(error.cmd[0]).name} exited with status {error.returncode}; its output is "
              "above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
