"""Predicting cases the way ``nnUNetv2_predict`` does: nnU-Net's PlainConvUNet vs Rep3D, exported and as trained.

Every variant goes through ``nnUNetPredictor.predict_logits_from_preprocessed_data``, the call ``nnUNetv2_predict``
makes per case: for each fold it loads that fold's weights into the network (``load_state_dict``, also with one
fold), then runs the sliding window (Gaussian weighting, tile step 0.5) with or without mirroring (8 flips in 3D),
and averages the folds. Variants:

    nnunet         PlainConvUNet as nnUNetTrainer builds it from the plan
    rep3d-folded   the Rep3D network (k=21, LRBM) folded as ``rep3d-nnunet export`` writes it
    rep3d-trained  the Rep3D network as the training folder holds it (generators and masks, eval mode)

each with 1 and 5 folds (distinct weights per fold; the Rep3D generators' gains moved off 0, as after training).
One process, variants interleaved, one warm-up case each, medians; every call's time is printed too. The masks that
the trained Rep3D network computes are counted: at most one per block and fold for the whole run.

    python benchmarks/bench_predict.py --plans benchmarks/plans/Dataset004_Hippocampus_nnUNetPlans.json
    python benchmarks/bench_predict.py --patch 48                          # nnU-Net's default plan for 48^3
    python benchmarks/bench_predict.py --device cuda --patch 128 --folds 1 5

With ``--plans`` the case has the configuration's median image size (``--case`` overrides it); with ``--patch`` it
is one patch.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_network import NUM_CLASSES, default_plan  # noqa: E402

VARIANTS = ("nnunet", "rep3d-folded", "rep3d-trained")
# The plans nnU-Net 2.8.1's default planner writes for MSD Task04 Hippocampus (200 training cases): a real plan
HIPPOCAMPUS_PLANS = Path(__file__).resolve().parent / "plans" / "Dataset004_Hippocampus_nnUNetPlans.json"
TRAINERS = {"nnunet": "nnUNetTrainer", "rep3d-folded": "nnUNetTrainerRep3D", "rep3d-trained": "nnUNetTrainerRep3D"}


def _dotted(value):
    return f"{value.__module__}.{value.__qualname__}" if isinstance(value, type) else value


def plans_for_patch(patch: int, max_features: int = 320) -> dict:
    """An nnU-Net plans dict whose 3d_fullres is nnU-Net's default topology for an isotropic ``patch``."""
    plan = default_plan(patch, max_features)
    arch = {key: _dotted(value) for key, value in plan["arch"].items()}
    patch_size = [int(p) for p in plan["patch_size"]]
    configuration = {
        "patch_size": patch_size, "spacing": [1.0] * 3, "median_image_size_in_voxels": patch_size,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    }
    return {"dataset_name": f"default_{patch}", "plans_name": "nnUNetPlans",
            "configurations": {"3d_fullres": configuration}}


def _moved(state: dict, seed: int) -> dict:
    """Another fold's weights: every float tensor moved, so folds differ and LRBM masks differ from the prior."""
    generator = torch.Generator().manual_seed(seed)
    moved = copy.deepcopy(state)
    for value in moved.values():
        if value.is_floating_point():
            value.add_(0.05 * torch.randn(value.shape, generator=generator))
    return moved


def fold_weights(variant: str, plans_manager, configuration_manager, folds: int) -> tuple[torch.nn.Module, list]:
    """The network nnU-Net's predictor builds for ``variant`` and one state dict per fold."""
    from rep3d_nnunet.export import fold
    from rep3d_nnunet.nnunet_compat import find_trainer_class

    trainer = find_trainer_class(TRAINERS[variant])

    def build():
        torch.manual_seed(0)
        return trainer.build_network_architecture(plans_manager, configuration_manager, 1, NUM_CLASSES, False)

    network = build()
    states = [_moved(network.state_dict(), seed) for seed in range(folds)]
    if variant == "rep3d-folded":  # each fold folded as the export folds it
        folded = []
        for state in states:
            source = build()
            source.load_state_dict(state)
            folded.append(fold(source).state_dict())
        network, states = fold(build()), folded
    return network.eval(), states


def make_predictor(network, plans_manager, configuration_manager, states: list, device, mirroring: bool):
    """nnU-Net's predictor around ``network``, initialised as nnUNetTrainer does it for its validation."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                allow_tqdm=False)
    dataset_json = {"labels": {"background": 0, **{f"class{i}": i for i in range(1, NUM_CLASSES)}}}
    predictor.manual_initialization(network.to(device), plans_manager, configuration_manager, states, dataset_json,
                                    "bench", (0, 1, 2))
    return predictor


class MaskCounter:
    """Counts LRBM/prior mask computations (``KernelModulation.forward``) while active."""

    def __enter__(self):
        from rep3d_nnunet.modulation import KernelModulation

        self.count, self._original, self._cls = 0, KernelModulation.forward, KernelModulation

        def counting(module, *args, **kwargs):
            self.count += 1
            return self._original(module, *args, **kwargs)

        KernelModulation.forward = counting
        return self

    def __exit__(self, *exc):
        self._cls.forward = self._original


def measure(plans: dict, configuration: str, case_shape, device, repeats: int, variants, fold_counts, mirrorings,
            clock=time.perf_counter) -> tuple[dict, dict]:
    """({(variant, folds, mirroring): [seconds per case]}, {(variant, folds): masks computed}), interleaved.

    ``clock`` is wall time by default; ``time.process_time`` (with one torch thread) measures the CPU work alone,
    which other processes on a shared machine do not inflate as they inflate wall time.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    case = torch.randn(1, *case_shape, generator=torch.Generator().manual_seed(0))
    predictors = {}
    for variant in variants:
        for folds in fold_counts:
            network, states = fold_weights(variant, plans_manager, configuration_manager, folds)
            for mirroring in mirrorings:
                predictors[(variant, folds, mirroring)] = make_predictor(
                    network, plans_manager, configuration_manager, states, device, mirroring)
    times = {key: [] for key in predictors}
    masks = {}
    for key, predictor in predictors.items():  # warm-up: one case each
        with MaskCounter() as counter:
            predictor.predict_logits_from_preprocessed_data(case)
        masks[key[:2]] = masks.get(key[:2], 0) + counter.count
    for _ in range(repeats):
        for key, predictor in predictors.items():
            with MaskCounter() as counter:
                started = clock()
                predictor.predict_logits_from_preprocessed_data(case)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[key].append(clock() - started)
            masks[key[:2]] += counter.count
    return times, masks


def report(times: dict, masks: dict) -> str:
    lines = ["| network | folds | mirroring | seconds per case (median) | x nnU-Net | x export | masks computed | "
             "every call (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (variant, folds, mirroring), samples in times.items():
        median = statistics.median(samples)
        ratios = []
        for reference in ("nnunet", "rep3d-folded"):
            key = (reference, folds, mirroring)
            ratios.append(f"{median / statistics.median(times[key]):.2f}" if key in times else "-")
        calls = ", ".join(f"{s:.2f}" for s in samples)
        lines.append(f"| {variant} | {folds} | {'on' if mirroring else 'off'} | {median:.3g} | {ratios[0]} | "
                     f"{ratios[1]} | {masks[(variant, folds)]} | {calls} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--plans", type=Path, help="an nnU-Net plans file (e.g. nnUNetPlans.json of a dataset)")
    source.add_argument("--patch", type=int, default=48, help="nnU-Net's default plan for this isotropic patch "
                                                              "(default 48; ignored with --plans)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="configuration of --plans")
    parser.add_argument("--case", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"), help="case shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 5], help="fold counts to compare (default 1 5)")
    parser.add_argument("--mirroring", choices=("on", "off", "both"), default="on",
                        help="test-time mirroring (nnU-Net's default: on)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default), or CPU time of this process on one torch thread (for a CPU shared "
                             "with other jobs: their load does not count)")
    args = parser.parse_args(argv)
    if args.plans is not None:
        try:
            plans = json.loads(args.plans.read_text())
            configuration = plans["configurations"][args.configuration]
        except (OSError, json.JSONDecodeError, KeyError) as error:
            parser.error(f"--plans {args.plans}: not an nnU-Net plans file with configuration "
                         f"{args.configuration!r} ({type(error).__name__}: {error})")
        case_shape = args.case or [round(s) for s in configuration.get("median_image_size_in_voxels",
                                                                        configuration["patch_size"])]
    else:
        plans = plans_for_patch(args.patch)
        case_shape = args.case or plans["configurations"]["3d_fullres"]["patch_size"]
    if args.repeats < 1 or min(args.folds) < 1:
        parser.error("--repeats and --folds must be at least 1")
    device = torch.device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error("--clock cpu measures CPU runs only")
        torch.set_num_threads(1)
    mirrorings = {"on": [True], "off": [False], "both": [False, True]}[args.mirroring]
    arch = plans["configurations"][args.configuration]["architecture"]["arch_kwargs"]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, plans "
          f"{args.plans or f'default {args.patch}^3'}, patch {plans['configurations'][args.configuration]['patch_size']}"
          f", case {list(case_shape)}, features {arch['features_per_stage']}", flush=True)
    times, masks = measure(plans, args.configuration, case_shape, device, args.repeats, args.variants, args.folds,
                           mirrorings, time.process_time if args.clock == "cpu" else time.perf_counter)
    print("\n" + report(times, masks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
