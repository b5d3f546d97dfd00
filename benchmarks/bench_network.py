"""One nnU-Net training iteration: Rep3DUNet (k=21, LRBM) vs nnU-Net's default PlainConvUNet from the same plan.

Both networks come from the plan nnU-Net's default planner would write for the patch (its topology helper), each
with its own trainer's optimizer (SGD for nnU-Net, AdamW for Rep3D) and nnU-Net's deep-supervised Dice+CE loss.
Times are medians over repeated iterations after warm-up, variants interleaved in one process; peak memory is
torch.cuda.max_memory_allocated on CUDA and the peak resident set of a child process per variant on CPU.

    python benchmarks/bench_network.py                         # CPU, 48^3 patch, batch 2
    python benchmarks/bench_network.py --device cuda --patch 128 --amp --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from rep3d_nnunet.architecture import Rep3DUNet
from rep3d_nnunet.config import Rep3DSettings, rep3d_architecture
from rep3d_nnunet.training import OptimizerSettings, build_optimizer

NUM_CLASSES = 3


def default_plan(patch: int, max_features: int = 320) -> dict:
    """arch_kwargs of nnU-Net's default 3d_fullres plan for an isotropic patch (features 32 doubling, capped at
    ``max_features``: nnU-Net's 320 unless a smoke run asks for less)."""
    _, strides, kernels, patch_size, _ = get_pool_and_conv_props([1.0] * 3, [patch] * 3, 4, 999999)
    n = len(strides)
    return {
        "patch_size": list(patch_size),
        "arch": {
            "n_stages": n, "features_per_stage": [min(max_features, 32 * 2 ** i) for i in range(n)],
            "conv_op": torch.nn.Conv3d, "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True, "norm_op": torch.nn.InstanceNorm3d,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": torch.nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
        },
    }


def plan_from_file(path, configuration: str = "3d_fullres") -> dict:
    """The same {"patch_size", "arch"} as ``default_plan`` from a plans file nnU-Net wrote (a real dataset's plan),
    plus the configuration's batch size."""
    import pydoc
    from pathlib import Path

    entry = json.loads(Path(path).read_text())["configurations"][configuration]
    architecture = entry["architecture"]
    arch = {key: pydoc.locate(value) if key in architecture["_kw_requires_import"] and value is not None else value
            for key, value in architecture["arch_kwargs"].items()}
    return {"patch_size": list(entry["patch_size"]), "arch": arch, "batch_size": entry["batch_size"]}


def build(name: str, plan: dict) -> torch.nn.Module:
    if name == "nnunet":
        network = PlainConvUNet(1, num_classes=NUM_CLASSES, deep_supervision=True, **plan["arch"])
        network.apply(PlainConvUNet.initialize)
        return network
    # rep3d[-MODULATION][:BACKEND], e.g. rep3d, rep3d:fft, rep3d-none (no generator), rep3d-fixed:direct
    variant, _, backend = name.partition(":")
    _, _, modulation = variant.partition("-")
    settings = Rep3DSettings(conv_backend=backend or "auto", modulation=modulation or "lrbm")
    kwargs, _ = rep3d_architecture("PlainConvUNet", plan["arch"], plan["patch_size"], [1.0] * 3, settings)
    network = Rep3DUNet(1, num_classes=NUM_CLASSES, deep_supervision=True, **kwargs)
    network.apply(Rep3DUNet.initialize)
    return network


def make_step(name: str, network, plan, device, batch, amp: bool, compile_network: bool):
    if name == "nnunet":
        optimizer = torch.optim.SGD(network.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    else:
        optimizer, _ = build_optimizer(network, OptimizerSettings(), num_epochs=1000)
    n_outputs = len(plan["arch"]["strides"]) - 1
    weights = np.array([1 / (2 ** i) for i in range(n_outputs)])
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss),
        weights / weights.sum())
    patch = plan["patch_size"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *patch, generator=generator).to(device)
    # deep supervision targets at nnU-Net's scales: 1 / cumprod(strides), all but the lowest resolution
    cumulative = np.cumprod(np.array(plan["arch"]["strides"]), axis=0)
    targets = [torch.randint(0, NUM_CLASSES, (batch, 1, *[p // int(c) for p, c in zip(patch, cumulative[i])]),
                             generator=generator).float().to(device) for i in range(n_outputs)]
    model = torch.compile(network) if compile_network else network
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
            outputs = model(x)
            value = loss(outputs, targets)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def mask_seconds(network: torch.nn.Module, device: torch.device, repeats: int, clock=time.perf_counter
                 ) -> float | None:
    """Median time of computing every modulation mask forward and backward: the per-step cost of the LRBM generators
    (batch-independent, so it weighs most at small patches). None when the network has no masks."""
    from rep3d_nnunet.modulation import KernelModulation

    modulations = [m for m in network.modules() if isinstance(m, KernelModulation)]
    if not modulations:
        return None
    times = []
    for _ in range(repeats + 1):
        started = clock()
        total = sum(m().sum() for m in modulations)
        if total.requires_grad:  # the fixed prior has nothing to train
            total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - started)
    return statistics.median(times[1:])


def peak_resident_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: the latter survives exec and would
    report the (larger) parent's peak for a child started from this benchmark."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child_peak_rss_mb(args, name: str) -> float:
    """Peak resident memory of a fresh process running the variant's iterations (CPU memory measure)."""
    command = [sys.executable, __file__, "--child", name, "--patch", str(args.patch), "--batch", str(args.batch),
               "--repeats", "1", "--warmup", "1"] + (["--plans", str(args.plans)] if args.plans else [])
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def measure(device: torch.device, plan: dict, batch: int, variants, modes, repeats: int, warmup: int,
            child_memory_args=None, clock=time.perf_counter) -> dict:
    """{(variant, amp, compiled): (median seconds per iteration, peak MiB or None, seconds of the first call)}.

    ``modes`` are (amp, compiled) pairs; the first call of a compiled variant includes its compilation (forward and
    backward graphs), so ``first - median`` is the compile time. Variants are interleaved within each repeat. Peak
    memory is torch.cuda.max_memory_allocated on CUDA; on CPU (eager, no AMP) a child process's peak resident set
    when ``child_memory_args`` (parsed arguments of this script) is given. ``clock``: wall time, or
    ``time.process_time`` for the CPU work alone on a CPU shared with other jobs (with one torch thread).
    """
    results = {}
    for amp, compiled in modes:
        steps, first_call = {}, {}
        for name in variants:
            if name.endswith(":direct") and device.type == "cpu" and plan["patch_size"][0] > 32:
                print(f"skipping {name} at {plan['patch_size']} on CPU: torch's direct 21^3 depthwise backward "
                      f"takes minutes per iteration (docs/design.md, section 5)")
                continue
            network = build(name, plan).to(device)
            try:
                steps[name] = make_step(name, network, plan, device, batch, amp, compiled)
                for i in range(warmup):
                    started = time.perf_counter()
                    steps[name]()
                    if i == 0:
                        first_call[name] = time.perf_counter() - started
            except Exception as error:  # noqa: BLE001  report and go on: a benchmark prints what works
                print(f"{name} amp={amp} compile={compiled}: failed: {type(error).__name__}: {error}")
                steps.pop(name, None)
        times = {name: [] for name in steps}
        peaks = {}
        for _ in range(repeats):
            for name, step in steps.items():  # interleaved
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                started = clock()
                step()
                times[name].append(clock() - started)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated() / 2 ** 20)
        for name in steps:
            if device.type == "cpu" and not amp and not compiled and child_memory_args is not None:
                peaks[name] = child_peak_rss_mb(child_memory_args, name)
            results[(name, amp, compiled)] = (statistics.median(times[name]), peaks.get(name), first_call.get(name))
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--plans", default=None, help="a plans file nnU-Net wrote (its 3d_fullres configuration "
                                                      "instead of the default plan for --patch), e.g. "
                                                      "benchmarks/plans/Dataset004_Hippocampus_nnUNetPlans.json")
    parser.add_argument("--batch", type=int, default=None, help="default: the plan's (--plans), else 2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="also run with autocast (fp16 + GradScaler on CUDA)")
    parser.add_argument("--compile", action="store_true", help="also run torch.compile'd networks")
    parser.add_argument("--variants", nargs="+", default=["nnunet", "rep3d", "rep3d:direct"],
                        help="nnunet, or rep3d[-MODULATION][:BACKEND]: rep3d (LRBM, auto backend), rep3d:fft, "
                             "rep3d:direct, rep3d-fixed, rep3d-none (a plain large kernel: no generator)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default), or CPU time of this process on one torch thread (for a CPU shared "
                             "with other jobs: their load does not count)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes (CPU)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    plan = plan_from_file(args.plans) if args.plans else default_plan(args.patch)
    args.batch = args.batch or plan.get("batch_size", 2)

    if args.child:
        step = make_step(args.child, build(args.child, plan).to(device), plan, device, args.batch, False, False)
        for _ in range(args.warmup + args.repeats):
            step()
        print(peak_resident_mib())
        return

    modes = [(False, False)] + ([(True, False)] if args.amp else []) + ([(args.amp, True)] if args.compile else [])
    print(f"device {device}, patch {plan['patch_size']}, batch {args.batch}, torch {torch.__version__}, "
          f"threads {1 if args.clock == 'cpu' else torch.get_num_threads()}, clock {args.clock}")
    print(f"plan: features {plan['arch']['features_per_stage']}, strides {plan['arch']['strides']}")
    if args.clock == "cpu":
        torch.set_num_threads(1)
    results = measure(device, plan, args.batch, args.variants, modes, args.repeats, args.warmup,
                      None if args.no_memory else args, time.process_time if args.clock == "cpu" else time.perf_counter)
    base = {(amp, c): results[("nnunet", amp, c)] for (n, amp, c) in results if n == "nnunet"}
    unit, scale = ("ms", 1e3) if device.type == "cuda" else ("s", 1.0)
    print(f"\n| variant | amp | compile | iteration ({unit}, median) | x nnU-Net | peak memory (MiB) | x nnU-Net "
          f"| first call ({unit}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, amp, compiled), (seconds, peak, first) in results.items():
        ref_seconds, ref_peak, _ = base.get((amp, compiled), (None, None, None))
        time_ratio = f"{seconds / ref_seconds:.2f}" if ref_seconds else "-"
        peak_text = f"{peak:.0f}" if peak else "-"
        peak_ratio = f"{peak / ref_peak:.2f}" if peak and ref_peak else "-"
        first_text = f"{first * scale:.3g}" if first is not None else "-"
        print(f"| {name} | {amp} | {compiled} | {seconds * scale:.3g} | {time_ratio} | {peak_text} | {peak_ratio} "
              f"| {first_text} |")
    for name in args.variants:
        if name.startswith("rep3d"):
            seconds = mask_seconds(build(name, plan).to(device), device, args.repeats,
                                   time.process_time if args.clock == "cpu" else time.perf_counter)
            if seconds is not None:
                print(f"{name}: computing its masks (generators included) forward+backward takes "
                      f"{seconds * scale:.3g} {unit} of each iteration")
    print(json.dumps({f"{n}|amp={a}|compile={c}": v for (n, a, c), v in results.items()}))


if __name__ == "__main__":
    main()
