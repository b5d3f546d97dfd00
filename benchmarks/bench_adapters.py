"""What a dual-kernel adapter costs in 3D: per adapter, and per fine-tuning iteration of nnU-Net's default network.

1. One adapter at a stage's resolution (forward + backward, input gradient included as in a fine-tuning step), for
   the large kernel sizes a 3D DKA could use (the FFT convolution makes their cost nearly independent of k), beside
   the small kernel alone and the standard bottleneck adapter.
2. One training iteration of nnU-Net's default 3D PlainConvUNet for the patch (frozen, as fine-tuning runs it) with
   adapters after every encoder stage, against linear probing (no adapter), AdamW on what trains.

One process, variants interleaved, medians after a warm-up; peak memory on CUDA only.

    python benchmarks/bench_adapters.py                       # CPU: one adapter at 64^3 x 32 channels; network 48^3
    python benchmarks/bench_adapters.py --device cuda --size 128 --patch 128
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
from bench_network import NUM_CLASSES, default_plan  # noqa: E402

from rep3d_nnunet.adapters import AdapterSettings, DualKernelAdapter, insert_adapters  # noqa: E402
from rep3d_nnunet.finetuning import FinetuneOptimizer, trainable_parameter_groups  # noqa: E402

ADAPTER_VARIANTS = [("bottleneck", None), ("small", 5), ("large", 21), ("large", 31), ("large", 51), ("dual", 31),
                    ("dual", 51)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times, peak = [], 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() / 2 ** 20)
    return statistics.median(times), peak


def adapter_costs(device, size: int, channels: int, repeats: int) -> list[tuple[str, float, float]]:
    x = torch.randn(1, channels, size, size, size, device=device, requires_grad=True)
    rows = []
    for kind, kernel in ADAPTER_VARIANTS:
        k = [min(kernel or 1, 2 * size - 1)] * 3
        adapter = DualKernelAdapter(channels, max(channels // 4, 8), 3, kind, k, 5).to(device)
        torch.nn.init.normal_(adapter.up.weight, std=0.01)

        def step():
            x.grad = None
            adapter.zero_grad(set_to_none=True)
            adapter(x).square().mean().backward()

        seconds, peak = _median_seconds(step, device, repeats)
        rows.append((f"{kind}" + (f" k={k[0]}" if kernel else ""), seconds, peak))
    return rows


def network_costs(device, patch: int, repeats: int) -> list[tuple[str, float, float]]:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    plan = default_plan(patch)
    x = torch.randn(2, 1, *plan["patch_size"], device=device)
    steps = {}
    for label, settings in [("linear probing", AdapterSettings(kind="none")),
                            ("standard adapter", AdapterSettings(kind="bottleneck")),
                            ("DKA small only (5)", AdapterSettings(kind="small")),
                            ("DKA dual 21 + 5", AdapterSettings(large_kernel_3d=21)),
                            ("DKA dual 31 + 5", AdapterSettings(large_kernel_3d=31)),
                            ("DKA dual 51 + 5", AdapterSettings(large_kernel_3d=51))]:
        torch.manual_seed(0)
        network = PlainConvUNet(1, num_classes=NUM_CLASSES, deep_supervision=True, **plan["arch"]).to(device)
        insert_adapters(network, settings, plan["patch_size"])
        optimizer = torch.optim.AdamW(trainable_parameter_groups(network, settings, FinetuneOptimizer()))

        def step(network=network, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            sum(o.square().mean() for o in network(x)).backward()
            optimizer.step()

        steps[label] = step
    results = {label: [] for label in steps}
    peaks = {label: 0.0 for label in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for label, step in steps.items():  # interleaved
            seconds, peak = _median_seconds(step, device, 1)
            results[label].append(seconds)
            peaks[label] = max(peaks[label], peak)
    return [(label, statistics.median(times), peaks[label]) for label, times in results.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64, help="feature map edge for the single adapter (default 64)")
    parser.add_argument("--channels", type=int, default=32, help="stage channels for the single adapter (d = C/4)")
    parser.add_argument("--patch", type=int, default=48, help="network patch (nnU-Net's default 3D plan)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    unit, scale = ("ms", 1e3) if device.type == "cuda" else ("s", 1.0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"\nOne adapter, forward + backward, input [1, {args.channels}, {args.size}^3], "
          f"d = {max(args.channels // 4, 8)}:\n")
    print(f"| adapter | time ({unit}) | x standard adapter | peak MiB |\n| --- | --- | --- | --- |")
    rows = adapter_costs(device, args.size, args.channels, args.repeats)
    base = rows[0][1]
    for label, seconds, peak in rows:
        print(f"| {label} | {seconds * scale:.3g} | {seconds / base:.2f} | {peak:.0f} |" if peak else
              f"| {label} | {seconds * scale:.3g} | {seconds / base:.2f} | - |")
    print(f"\nOne fine-tuning iteration, nnU-Net's default 3D plan at {args.patch}^3, batch 2 (frozen network):\n")
    print(f"| method | time ({unit}) | x linear probing | peak MiB |\n| --- | --- | --- | --- |")
    rows = network_costs(device, args.patch, args.repeats)
    base = rows[0][1]
    for label, seconds, peak in rows:
        print(f"| {label} | {seconds * scale:.3g} | {seconds / base:.2f} | {f'{peak:.0f}' if peak else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
