"""torch.compile on the Rep3D networks, per trainer family: graphs and graph breaks, compile time, recompiles.

For each family (the networks of nnUNetTrainerRep3D, ...FixedPrior, ...Vanilla, ...CSLA, nnUNetTrainerUXNetLRBM) on
nnU-Net's default 3D plan for the patch: ``torch._dynamo.explain`` of a training forward and of an eval (no_grad)
forward; then ``torch.compile`` (inductor) of a deep-supervised training step: the first step's time (compilation
of forward and backward), the compiled and eager step times (medians), and the graphs compiled in total after a
second batch size and a train -> eval -> train cycle (nnU-Net's epoch loop). One process, families in turn.

    python benchmarks/bench_compile.py                               # CPU, 32^3, batch 2
    python benchmarks/bench_compile.py --device cuda --patch 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_network import NUM_CLASSES, default_plan  # noqa: E402

from rep3d_nnunet.architecture import Rep3DUNet  # noqa: E402
from rep3d_nnunet.config import rep3d_architecture  # noqa: E402
from rep3d_nnunet.variants import make_trainer_class  # noqa: E402

FAMILIES = {"lrbm": "nnUNetTrainerRep3D", "fixed": "nnUNetTrainerRep3DFixedPrior",
            "vanilla": "nnUNetTrainerRep3DVanilla", "csla": "nnUNetTrainerRep3DCSLA",
            "uxnet_lrbm": "nnUNetTrainerUXNetLRBM"}


def build(family: str, plan: dict) -> torch.nn.Module:
    settings = make_trainer_class(FAMILIES[family]).rep3d
    kwargs, _ = rep3d_architecture("PlainConvUNet", plan["arch"], plan["patch_size"], [1.0] * 3, settings)
    network = Rep3DUNet(1, num_classes=NUM_CLASSES, deep_supervision=True, **kwargs)
    network.apply(Rep3DUNet.initialize)
    return network


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(module: torch.nn.Module, x: torch.Tensor) -> None:
    outputs = module(x)
    sum(o.float().square().mean() for o in outputs).backward()


def measure(family: str, plan: dict, device: torch.device, batch: int, repeats: int, skip_compile: bool) -> dict:
    network = build(family, plan).to(device)
    x = torch.randn(batch, 1, *plan["patch_size"], device=device)
    result = {}
    for mode in ("train", "eval"):
        getattr(network, mode)()
        torch._dynamo.reset()
        started = time.perf_counter()
        with torch.set_grad_enabled(mode == "train"):
            explanation = torch._dynamo.explain(network)(x)
        result[f"{mode}_graphs"], result[f"{mode}_breaks"] = explanation.graph_count, explanation.graph_break_count
        result[f"{mode}_explain_s"] = time.perf_counter() - started
    torch._dynamo.reset()
    network.train()
    eager = []
    for _ in range(repeats + 1):
        _sync(device)
        started = time.perf_counter()
        step(network, x)
        _sync(device)
        eager.append(time.perf_counter() - started)
    result["eager_s"] = statistics.median(eager[1:])
    if skip_compile:
        return result
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(network, backend=counter)
    started = time.perf_counter()
    step(compiled, x)
    _sync(device)
    result["first_compiled_step_s"] = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        step(compiled, x)
        _sync(device)
        times.append(time.perf_counter() - started)
    result["compiled_s"] = statistics.median(times)
    result["graphs_first_step"] = counter.frame_count
    step(compiled, torch.randn(batch + 1, 1, *plan["patch_size"], device=device))  # a second batch size
    network.eval()
    with torch.no_grad():
        compiled(x)
    network.train()
    step(compiled, x)
    result["graphs_total"] = counter.frame_count
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--explain-only", action="store_true", help="graph counts only, no inductor compile")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    plan = default_plan(args.patch)
    print(f"device {device}, torch {torch.__version__}, patch {plan['patch_size']}, batch {args.batch}, "
          f"features {plan['arch']['features_per_stage']}")
    print("\n| family | train graphs / breaks | eval graphs / breaks | first compiled step (s) | compiled step (s) | "
          "eager step (s) | graphs after batch change + train/eval/train |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for family in args.families:
        r = measure(family, plan, device, args.batch, args.repeats, args.explain_only)
        compiled = ("-", "-", "-") if args.explain_only else (
            f"{r['first_compiled_step_s']:.1f}", f"{r['compiled_s']:.3f}",
            f"{r['graphs_first_step']} -> {r['graphs_total']}")
        print(f"| {family} | {r['train_graphs']} / {r['train_breaks']} | {r['eval_graphs']} / {r['eval_breaks']} | "
              f"{compiled[0]} | {compiled[1]} | {r['eager_s']:.3f} | {compiled[2]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
