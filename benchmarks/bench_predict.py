"""Sliding-window prediction of one case with nnU-Net's predictor: folded Rep3D vs nnU-Net's PlainConvUNet.

Both networks come from the plan nnU-Net's default planner would write for the patch (``bench_network.default_plan``);
the Rep3D network (k=21, LRBM) is folded as ``rep3d-nnunet export`` folds it, and its unfolded eval form (the
trained model nnU-Net validates with, masks cached) runs too. Each goes through
``nnUNetPredictor.predict_sliding_window_return_logits``: Gaussian weighting, tile step 0.5, with and without
mirroring (8 flips in 3D), on the same random case. One process, variants interleaved, one warm-up call each,
medians; every call's time is printed too, so that a spread between identical calls shows.

    python benchmarks/bench_predict.py                           # CPU, 48^3 patch, 72x72x72 case
    python benchmarks/bench_predict.py --device cuda --patch 128 --case 256 256 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_network import NUM_CLASSES, build, default_plan  # noqa: E402

from rep3d_nnunet.export import fold  # noqa: E402

VARIANTS = ("nnunet", "rep3d-folded", "rep3d-trained")


def inference_network(name: str, plan: dict) -> torch.nn.Module:
    """The network as nnU-Net's predictor holds it: no deep supervision, eval mode; ``rep3d-folded`` folded."""
    network = build("nnunet" if name == "nnunet" else "rep3d", plan)
    network.decoder.deep_supervision = False
    network.eval()
    return fold(network) if name == "rep3d-folded" else network


def make_predictor(network: torch.nn.Module, plan: dict, device: torch.device, mirroring: bool):
    """nnU-Net's predictor around ``network`` with nnU-Net's defaults, initialised as nnUNetTrainer does it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

    configuration = {"patch_size": plan["patch_size"], "spacing": [1.0] * len(plan["patch_size"]),
                     "architecture": {"network_class_name": "built above", "arch_kwargs": {}}}
    plans_manager = PlansManager({"dataset_name": "bench", "plans_name": "bench",
                                  "configurations": {"3d_fullres": configuration}})
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=True, device=device, verbose=False, allow_tqdm=False)
    dataset_json = {"labels": {"background": 0, **{f"class{i}": i for i in range(1, NUM_CLASSES)}}}
    predictor.manual_initialization(network.to(device), plans_manager, ConfigurationManager(configuration), None,
                                    dataset_json, "bench", (0, 1, 2))
    return predictor


def measure(plan: dict, case_shape, device: torch.device, repeats: int, variants=VARIANTS) -> dict:
    """{(variant, mirroring): [seconds per call]} for one random case, interleaved, after one warm-up call each."""
    case = torch.randn(1, *case_shape, generator=torch.Generator().manual_seed(0))
    predictors = {}
    for name in variants:
        network = inference_network(name, plan)
        for mirroring in (False, True):
            predictors[(name, mirroring)] = make_predictor(network, plan, device, mirroring)
    times = {key: [] for key in predictors}
    with torch.inference_mode():  # as nnU-Net's predictor runs
        for key, predictor in predictors.items():
            predictor.predict_sliding_window_return_logits(case)
        for _ in range(repeats):
            for key, predictor in predictors.items():
                started = time.perf_counter()
                predictor.predict_sliding_window_return_logits(case)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[key].append(time.perf_counter() - started)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", type=int, default=48, help="isotropic patch of the plan (default 48)")
    parser.add_argument("--case", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="case shape (default: 1.5 patches per axis, 2 x 2 x 2 windows at tile step 0.5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    plan = default_plan(args.patch)
    case_shape = args.case or [p * 3 // 2 for p in plan["patch_size"]]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, patch {plan['patch_size']}, "
          f"case {case_shape}, features {plan['arch']['features_per_stage']}")
    times = measure(plan, case_shape, device, max(args.repeats, 1), args.variants)
    base = {m: statistics.median(times[("nnunet", m)]) for m in (False, True) if ("nnunet", m) in times}
    print("\n| network | mirroring | seconds per case (median) | x nnU-Net | every call (s) |")
    print("| --- | --- | --- | --- | --- |")
    for (name, mirroring), samples in times.items():
        median = statistics.median(samples)
        ratio = f"{median / base[mirroring]:.2f}" if mirroring in base else "-"
        calls = ", ".join(f"{s:.2f}" for s in samples)
        print(f"| {name} | {'on' if mirroring else 'off'} | {median:.3g} | {ratio} | {calls} |")


if __name__ == "__main__":
    main()
