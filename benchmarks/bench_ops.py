"""Forward+backward time of the depthwise conv backends: torch's direct conv vs the FFT path of ``rep3d_nnunet.ops``.

Usage:
    python benchmarks/bench_ops.py [--device cuda] [--repeats N] [--max-direct-seconds S] [--amp]
    python benchmarks/bench_ops.py --calibrate [--device cuda]   # refit the constants of backend_cost_model.py

Method: one process; per input shape the same input tensor and, per kernel size, the same weights for every variant;
variants interleaved within each repeat; warm-up first (cuFFT plans, cudnn.benchmark, allocator); medians. CUDA
times are taken between torch.cuda.synchronize() calls, peak memory with torch.cuda.max_memory_allocated() after a
reset (it includes the input, weights and gradients). Direct variants whose modelled time
(backend_cost_model.estimate_seconds) exceeds --max-direct-seconds are skipped and reported as such; a variant whose
single run takes longer than 5 s counts its warm-up run as a sample and is repeated at most --slow-budget seconds in
total, so the table finishes in minutes on a CPU (the runs column says how many samples each median has).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rep3d_nnunet import backend_cost_model, ops  # noqa: E402
from rep3d_nnunet.kernel_geometry import conv_plan  # noqa: E402

SHAPES = ((1, 32, 32), (2, 48, 48))  # (N, C, D): input [N, C, D, D, D]
KERNELS = (3, 7, 13, 21)
SLOW_RUN_SECONDS = 5.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp_context(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _run_once(x, weight, bias, backend: str, amp: bool) -> tuple[float, int]:
    """One forward+backward; returns (seconds, peak bytes allocated on CUDA or 0)."""
    device = x.device
    x.grad = weight.grad = bias.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    with _amp_context(device, amp):
        y = ops.depthwise_conv(x, weight, bias, backend=backend)
    y.float().sum().backward()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, peak


def _time_one_forward(x, weight, bias, backend: str) -> float:
    with torch.no_grad():
        _sync(x.device)
        start = time.perf_counter()
        ops.depthwise_conv(x, weight, bias, backend=backend)
        _sync(x.device)
    return time.perf_counter() - start


def benchmark(device: torch.device, repeats: int, max_direct_seconds: float, slow_budget: float, amp_modes,
              shapes=SHAPES, kernels=KERNELS) -> None:
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} repeats={repeats}", flush=True)
    header = f"{'input':>18} {'k':>3} {'amp':>5} {'direct':>12} {'fft':>12} {'direct/fft':>10} {'runs':>7}"
    if device.type == "cuda":
        header += f" {'peak MiB d':>10} {'peak MiB f':>10}"
    print(header, flush=True)
    for batch, channels, size in shapes:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, channels, size, size, size, generator=generator).to(device).requires_grad_()
        bias = torch.randn(channels, generator=generator).to(device).requires_grad_()
        for k in kernels:
            weight = (torch.randn(channels, 1, k, k, k, generator=generator) / k ** 1.5).to(device).requires_grad_()
            for amp in amp_modes:
                estimate = backend_cost_model.estimate_seconds(x.shape, k, device.type, requires_grad=True)
                variants = ["fft"]
                skipped = ""
                if estimate["direct"] > max_direct_seconds:
                    skipped = f"skipped: modelled {estimate['direct']:.0f} s/run > {max_direct_seconds:.0f} s"
                else:
                    variants.insert(0, "direct")
                samples: dict[str, list[float]] = {v: [] for v in variants}
                peaks: dict[str, int] = {v: 0 for v in variants}
                target: dict[str, int] = {}
                for variant in variants:  # warm-up
                    seconds, peak = _run_once(x, weight, bias, variant, amp)
                    peaks[variant] = max(peaks[variant], peak)
                    target[variant] = repeats
                    if seconds > SLOW_RUN_SECONDS:  # a slow run's warm-up is as good a sample as any later one
                        samples[variant].append(seconds)
                        target[variant] = max(1, min(repeats, int(slow_budget // seconds)))
                for _ in range(repeats):
                    for variant in variants:  # interleaved
                        if len(samples[variant]) < target[variant]:
                            seconds, peak = _run_once(x, weight, bias, variant, amp)
                            samples[variant].append(seconds)
                            peaks[variant] = max(peaks[variant], peak)
                medians = {v: statistics.median(s) for v, s in samples.items() if s}
                unit, scale = ("ms", 1e3) if device.type == "cuda" else ("s", 1.0)
                direct = f"{medians['direct'] * scale:.4g} {unit}" if "direct" in medians else "skipped"
                fft = f"{medians['fft'] * scale:.4g} {unit}"
                ratio = f"{medians['direct'] / medians['fft']:.1f}x" if "direct" in medians else "-"
                runs = "/".join(str(len(samples[v])) for v in variants)
                line = (f"{str([batch, channels, size]) + '^3':>18} {k:>3} {('on' if amp else 'off'):>5} "
                        f"{direct:>12} {fft:>12} {ratio:>10} {runs:>7}")
                if device.type == "cuda":
                    mib = {v: f"{peaks[v] / 2 ** 20:.0f}" for v in variants}
                    line += f" {mib.get('direct', '-'):>10} {mib['fft']:>10}"
                if skipped:
                    line += f"   direct {skipped}"
                print(line, flush=True)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """Fits ops' cost-model constants for a device: seconds = a * work + overhead (overhead from a tiny case, a as a
    geometric mean). Returns {(backend, requires_grad): (a, overhead)} and prints the fit per case."""
    cases = [
        ((1, 16, 16, 16, 16), 5), ((1, 16, 16, 16, 16), 7), ((1, 16, 16, 16, 16), 9), ((1, 32, 24, 24, 24), 5),
        ((1, 32, 24, 24, 24), 7), ((1, 32, 32, 32, 32), 5), ((1, 32, 32, 32, 32), 7), ((1, 8, 32, 32, 32), 13),
        ((1, 4, 24, 24, 24), 21), ((1, 48, 21, 21, 21), 7), ((1, 32, 32, 32, 32), 21), ((2, 48, 48, 48, 48), 21),
    ]
    tiny = ((1, 1, 4, 4, 4), 3)
    results = {}
    for grad in (True, False):
        for backend in ("direct", "fft"):
            rows = []
            for shape, k in [tiny] + cases:
                too_slow = shape[0] * shape[1] * math.prod(shape[2:]) * k ** 3 > 1.5e9
                if backend == "direct" and grad and too_slow and device.type == "cpu":
                    continue
                x = torch.randn(*shape, device=device, requires_grad=grad)
                w = torch.randn(shape[1], 1, k, k, k, device=device, requires_grad=grad)

                def step():
                    if grad:
                        ops.depthwise_conv(x, w, None, backend).sum().backward()
                    else:
                        with torch.no_grad():
                            ops.depthwise_conv(x, w, None, backend)
                    _sync(device)

                plan = conv_plan(tuple(shape[2:]), (k,) * 3)
                points = math.prod(plan.fft_shape())
                work = (shape[0] * shape[1] * math.prod(shape[2:]) * math.prod([2 * r + 1 for r in plan.radii])
                        if backend == "direct" else shape[0] * shape[1] * points * math.log2(points))
                rows.append((shape, k, work, _median_time(step, repeats)))
            overhead = rows[0][3]
            per_unit = math.exp(statistics.mean(math.log(max(t - overhead, 1e-9) / w) for _, _, w, t in rows[1:]))
            results[(backend, grad)] = (per_unit, overhead)
            print(f"{backend:>6} grad={grad!s:5} a={per_unit:.3g} s/unit overhead={overhead * 1e3:.2f} ms")
            for shape, k, work, t in rows[1:]:
                print(f"    {shape} k={k}: {t:.4f} s, model {per_unit * work + overhead:.4f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-direct-seconds", type=float, default=60.0,
                        help="skip direct variants modelled slower than this per forward+backward")
    parser.add_argument("--slow-budget", type=float, default=120.0,
                        help="seconds of samples at most per variant whose single run exceeds 5 s")
    parser.add_argument("--amp", action="store_true", help="also time under autocast (always on for CUDA)")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                        help="comma-separated NxCxD inputs [N, C, D, D, D], default %(default)s")
    parser.add_argument("--kernels", default=",".join(map(str, KERNELS)), help="default %(default)s")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit the cost-model constants of --device instead (backend_cost_model._by_key)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.calibrate:
        calibrate(max(args.repeats, 1), device)
        return
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp_modes = (False, True) if (args.amp or device.type == "cuda") else (False,)
    shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    kernels = [int(k) for k in args.kernels.split(",")]
    benchmark(device, max(args.repeats, 1), args.max_direct_seconds, args.slow_budget, amp_modes, shapes, kernels)


if __name__ == "__main__":
    main()
