"""One-shot GPU check of Rep3D on nnU-Net's GPU path: one command, one table, about 8 minutes on an H100/H200.

    python benchmarks/gpu_check.py                    # all sections, prints the table, writes gpu_check.json
    python benchmarks/gpu_check.py --sections ops network

Sections (each a row group of the table; a section that fails is reported as such and the others still run):
    env        GPU, driver-visible versions: torch, CUDA, cuDNN, nnunetv2, rep3d_nnunet
    ops        depthwise 21^3 forward+backward, torch's direct conv vs the FFT op, fp32 and fp16 autocast
    backends   the large-kernel backend decisions of a Rep3D run at 128^3 under torch's autocast dtype (fp16), as our
               trainers take them before the first step and record them with the model: the training step and a
               batch-1 eval forward (measured forward+backward of both backends per shape, backend_measurement)
    precision  fp16 autocast + GradScaler against fp32, every family (LRBM, fixed prior, vanilla, CSLA, UX-Net +
               LRBM, DKA) and both backends: gradients of a step and predicted logits (benchmarks/bench_precision.py)
    calibrate  the cost model's CUDA constants (backend_cost_model._by_key, which size the planner's FFT workspaces)
               fitted on this GPU (benchmarks/bench_ops.py --calibrate)
    network    one nnU-Net training iteration at 128^3, batch 2, AMP (fp16 + GradScaler), eager and torch.compile'd:
               nnU-Net's PlainConvUNet vs Rep3D (LRBM) and Rep3D with plain kernels (modulation none); ms, peak
               torch.cuda.max_memory_allocated beside nnU-Net's planner estimate (modelled), compile time
               (benchmarks/bench_network.py)
    inference  nnU-Net's predictor per case, as nnUNetv2_predict runs it (weights loaded per fold and case, 8 mirror
               flips, fp16 autocast) with 1 and 5 folds, on a 128^3 patch of the default plan and on the MSD
               Hippocampus plan: PlainConvUNet, the Rep3D export and the Rep3D training folder
               (benchmarks/bench_predict.py)
    train      nnUNetv2_train on a synthetic long-range dataset, -device cuda, torch.compile on (nnU-Net's default),
               2 epochs of 50 iterations: epoch times from nnU-Net's log, with and without the compile

It refuses to run without CUDA. ``--device cpu --smoke`` runs every section but calibrate and precision at toy sizes on
the CPU (no compile: nnU-Net disables it there), to check the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SECTIONS = ("env", "ops", "backends", "precision", "calibrate", "network", "inference", "train")
TRAIN_TRAINER = "nnUNetTrainerRep3DGPUCheck"
TRAIN_DATASET_ID = 989


@dataclass
class Row:
    section: str
    what: str
    value: str
    note: str = ""


@dataclass
class Sizes:
    """What each section runs at: the real check, or toy sizes for ``--smoke``."""

    op_shape: tuple  # [N, C, D] of an input [N, C, D, D, D]
    kernel: int
    patch: int
    batch: int
    repeats: int
    train_cases: int
    train_size: int
    train_iterations: int
    max_features: int = 320  # nnU-Net's cap; the smoke run keeps the network small
    fold_counts: tuple = (1, 5)  # folds the inference section predicts with (nnU-Net's 5-fold ensemble)

    @classmethod
    def for_run(cls, smoke: bool, patch: int, batch: int, repeats: int) -> "Sizes":
        if smoke:
            return cls((1, 4, 12), 21, 32, 1, 1, 5, 24, 2, max_features=32, fold_counts=(1, 2))  # 5 cases: 5 folds
        return cls((2, 48, 64), 21, patch, batch, repeats, 16, 96, 50)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def section_env(device, sizes, args) -> list[Row]:
    import nnunetv2  # noqa: F401
    import torch
    from importlib.metadata import version

    rows = [Row("env", "torch", torch.__version__), Row("env", "nnunetv2", version("nnunetv2")),
            Row("env", "rep3d_nnunet", version("rep3d-nnunet"))]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        rows += [Row("env", "GPU", f"{properties.name}, {properties.total_memory / 2 ** 30:.0f} GiB, "
                                   f"compute capability {properties.major}.{properties.minor}"),
                 Row("env", "CUDA (torch build)", str(torch.version.cuda)),
                 Row("env", "cuDNN", str(torch.backends.cudnn.version()))]
    return rows


def section_ops(device, sizes, args) -> list[Row]:
    import torch
    from bench_ops import _run_once

    batch, channels, size = sizes.op_shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, size, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(channels, 1, *(sizes.kernel,) * 3, generator=generator) / sizes.kernel ** 1.5)
    weight = weight.to(device).requires_grad_()
    bias = torch.randn(channels, generator=generator).to(device).requires_grad_()
    rows = []
    shape = f"[{batch}, {channels}, {size}^3], k={sizes.kernel}"
    for amp in (False, True):
        medians = {}
        for backend in ("direct", "fft"):
            _run_once(x, weight, bias, backend, amp)  # warm-up: cuFFT plans, allocator
            samples = [_run_once(x, weight, bias, backend, amp) for _ in range(max(sizes.repeats, 1))]
            medians[backend] = statistics.median(s for s, _ in samples)
            peak = max(p for _, p in samples) / 2 ** 20
            rows.append(Row("ops", f"{backend} fwd+bwd {shape}, {'fp16 autocast' if amp else 'fp32'}",
                            f"{medians[backend] * 1e3:.3g} ms", f"peak {peak:.0f} MiB" if peak else ""))
        rows.append(Row("ops", f"direct / FFT, {'fp16 autocast' if amp else 'fp32'}",
                        f"{medians['direct'] / medians['fft']:.1f}x"))
    return rows


def section_backends(device, sizes, args) -> list[Row]:
    import torch
    from bench_network import build, default_plan

    from rep3d_nnunet import backend_choice
    from rep3d_nnunet.backend_cost_model import choose_backend
    from rep3d_nnunet.backend_measurement import measure_network

    plan = default_plan(sizes.patch, sizes.max_features)
    network = build("rep3d", plan).to(device)
    backend_choice.forget_decisions()
    policy = os.environ.get(backend_choice.POLICY_VARIABLE)
    os.environ[backend_choice.POLICY_VARIABLE] = "measure"  # on the CPU smoke run too
    try:  # what ScheduledTrainer.measure_conv_backends runs: nnU-Net's train_step autocasts on CUDA only
        measure_network(network, (sizes.batch, 1, *plan["patch_size"]), device,
                        torch.get_autocast_dtype(device.type) if device.type == "cuda" else None)
    finally:
        if policy is None:
            os.environ.pop(backend_choice.POLICY_VARIABLE)
        else:
            os.environ[backend_choice.POLICY_VARIABLE] = policy
    rows = []
    for key, decision in backend_choice.decisions().items():
        model = choose_backend((1, key.channels, *key.sample_shape[1:]), key.kernel, device.type, dtype=key.dtype)
        rows.append(Row("backends", key.describe(), decision.describe(),
                        f"cost model: {model}" + ("" if model == decision.backend else " (differs)")
                        + f"; recorded for {key.device}"))
    backend_choice.forget_decisions()
    return rows


def section_precision(device, sizes, args) -> list[Row]:
    from bench_precision import compare

    # the CPU smoke run: torch's float16 direct 21^3 convolution needs tens of GB there
    kernel = 7 if device.type == "cpu" else None
    patch = 64 if device.type == "cuda" else 32
    return [Row("precision", f"{r['family']}, {r['backend']}, fp16 autocast + GradScaler vs fp32, {patch}^3 plan",
                f"gradients {100 * r['gradients']:.2f}%, logits {100 * r['logits']:.3f}%", "relative L2 error")
            for r in compare(device, patch, 2, sizes.max_features, kernel)]


def section_calibrate(device, sizes, args) -> list[Row]:
    from bench_ops import calibrate

    fitted = calibrate(max(sizes.repeats // 3, 2), device)
    rows = []
    for (backend, grad), (per_unit, overhead) in fitted.items():
        rows.append(Row("calibrate", f"{backend}, {'training' if grad else 'inference'}",
                        f"{per_unit:.3g} s/unit + {overhead * 1e3:.3g} ms",
                        "backend_cost_model._DIRECT_SECONDS_PER_MAC/_OVERHEAD" if backend == "direct"
                        else "backend_cost_model._FFT_SECONDS_PER_UNIT"
                        "/_OVERHEAD"))
    return rows


def section_network(device, sizes, args) -> list[Row]:
    from bench_network import build, default_plan, measure

    from rep3d_nnunet.planning import network_memory

    plan = default_plan(sizes.patch, sizes.max_features)
    # the CPU smoke run without autocast: CPU autocast means bfloat16 convolutions, which cores without bf16 units run
    # ~10x slower (a 32^3 training step 37 s instead of ~3 s) and which no user of a CPU trains with
    modes = [(True, False), (True, True)] if device.type == "cuda" else [(False, False)]
    variants = ["nnunet", "rep3d", "rep3d-none"]
    results = measure(device, plan, sizes.batch, variants, modes, max(sizes.repeats, 1), warmup=2)
    modelled = {name: network_memory(build(name, plan), plan["patch_size"], sizes.batch).total_gb
                for name in variants}
    rows = []
    for amp, compiled in modes:
        base = results.get(("nnunet", amp, compiled))
        for name in variants:
            if (name, amp, compiled) not in results:
                rows.append(Row("network", f"{name}, {'compiled' if compiled else 'eager'}", "failed", "see log"))
                continue
            seconds, peak, first = results[(name, amp, compiled)]
            notes = [f"{seconds / base[0]:.2f}x nnU-Net" if base else ""]
            if peak:
                notes.append(f"peak {peak:.0f} MiB" + (f" ({peak / base[1]:.2f}x)" if base and base[1] else ""))
            notes.append(f"planner's estimate {modelled[name]:.2f} GB (modelled)")
            if compiled and first is not None:
                notes.append(f"compile {first - seconds:.0f} s")
            rows.append(Row("network", f"{name}, {plan['patch_size'][0]}^3 batch {sizes.batch}, "
                                       f"{'AMP' if amp else 'float32'}, "
                                       f"{'compiled' if compiled else 'eager'}", f"{seconds * 1e3:.4g} ms",
                            ", ".join(n for n in notes if n)))
    return rows


def section_inference(device, sizes, args) -> list[Row]:
    from bench_predict import HIPPOCAMPUS_PLANS, VARIANTS, measure, plans_for_patch

    plans = {f"default {sizes.patch}^3 plan": plans_for_patch(sizes.patch, sizes.max_features)}
    if not args.smoke:
        plans["Hippocampus plan"] = json.loads(HIPPOCAMPUS_PLANS.read_text())
    rows = []
    for label, plan in plans.items():
        case = [round(s) for s in plan["configurations"]["3d_fullres"]["median_image_size_in_voxels"]]
        mirroring = not args.smoke  # the smoke run checks the script, nnU-Net's 8 flips only add time there
        times, masks = measure(plan, "3d_fullres", case, device, sizes.repeats, VARIANTS, sizes.fold_counts,
                               [mirroring])
        for (variant, folds, _), samples in times.items():
            seconds = statistics.median(samples)
            reference = statistics.median(times[("nnunet", folds, mirroring)])
            rows.append(Row("inference", f"{label}, case {case}, {variant}, {folds} fold(s), nnU-Net's predictor "
                                         f"({'8 flips, ' if mirroring else ''}fp16 autocast on CUDA)",
                            f"{seconds * 1e3:.4g} ms per case",
                            f"{seconds / reference:.2f}x nnU-Net; {masks[(variant, folds)]} masks computed"))
    return rows


def _console_script(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def section_train(device, sizes, args) -> list[Row]:
    from rep3d_nnunet.datasets.synthetic import generate_synthetic_dataset
    from rep3d_nnunet.environment import export_lines

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rep3d_gpu_check_"))
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_compile"}  # nnU-Net's default: compile on CUDA
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(workdir / name)
        (workdir / name).mkdir(parents=True, exist_ok=True)
    trainers = workdir / "trainers"
    trainers.mkdir(exist_ok=True)
    (trainers / f"{TRAIN_TRAINER}.py").write_text(textwrap.dedent(f'''
        from rep3d_nnunet.training import Rep3DTrainer


        class {TRAIN_TRAINER}(Rep3DTrainer):
            """nnUNetTrainerRep3D for 2 epochs of {sizes.train_iterations} iterations (the GPU check)."""
            num_epochs_override = 2
            iterations_per_epoch_override = {sizes.train_iterations}
            val_iterations_per_epoch_override = {max(sizes.train_iterations // 5, 1)}
    '''))
    registered = export_lines(env)[0].split("=", 1)[1]
    env["nnUNet_extTrainer"] = os.pathsep.join([registered, str(trainers)])
    processes = str(max(1, min(os.cpu_count() or 1, 8)))
    env.setdefault("nnUNet_def_n_proc", processes)
    dataset = generate_synthetic_dataset(Path(env["nnUNet_raw"]), TRAIN_DATASET_ID, task="long_range",
                                         num_training=sizes.train_cases, num_test=0,
                                         size=(sizes.train_size,) * 3, seed=0, overwrite=True)
    started = time.perf_counter()
    subprocess.run([_console_script("nnUNetv2_plan_and_preprocess"), "-d", str(TRAIN_DATASET_ID), "-c",
                    "3d_fullres", "-np", processes], env=env, check=True, capture_output=True, text=True)
    preprocessing = time.perf_counter() - started
    started = time.perf_counter()
    result = subprocess.run([_console_script("nnUNetv2_train"), str(TRAIN_DATASET_ID), "3d_fullres", "0", "-tr",
                             TRAIN_TRAINER, "-device", device.type], env=env, capture_output=True, text=True)
    training = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"nnUNetv2_train failed ({result.returncode}): {result.stderr[-2000:]}")
    log = result.stdout
    epochs = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    dice = re.findall(r"Pseudo dice \[([^\]]*)\]", log)
    compiled = "Using torch.compile" in log
    rows = [Row("train", "nnUNetv2_plan_and_preprocess", f"{preprocessing:.0f} s",
                f"{sizes.train_cases} cases of {sizes.train_size}^3 ({dataset.name})"),
            Row("train", f"nnUNetv2_train -device {device.type}, 2 x {sizes.train_iterations} iterations",
                f"{training:.0f} s", "torch.compile on" if compiled else "torch.compile off")]
    rows += [Row("train", f"epoch {i + 1}", f"{t:.1f} s", "includes the compile" if i == 0 and compiled else "")
             for i, t in enumerate(epochs)]
    if dice:
        # nnU-Net logs numpy scalars, "np.float32(0.41)": keep the numbers
        values = re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?|\d+(?=\))", dice[-1])
        rows.append(Row("train", "pseudo Dice after epoch 2", ", ".join(values) or dice[-1]))
    return rows


RUNNERS = {"env": section_env, "ops": section_ops, "backends": section_backends, "precision": section_precision,
           "calibrate": section_calibrate, "network": section_network, "inference": section_inference,
           "train": section_train}


def run_sections(device, sizes: Sizes, sections, args) -> list[Row]:
    rows = []
    for section in sections:
        started = time.perf_counter()
        print(f"# {section} ...", flush=True)
        try:
            rows += RUNNERS[section](device, sizes, args)
        except Exception as error:  # noqa: BLE001  one broken section must not hide the others' figures
            traceback.print_exc()
            rows.append(Row(section, "failed", f"{type(error).__name__}", str(error).splitlines()[0][:200]))
        rows.append(Row(section, "section wall time", f"{time.perf_counter() - started:.0f} s"))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = ["| section | what | value | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.section} | {r.what} | {r.value} | {r.note} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run, in this order (default: all)")
    parser.add_argument("--patch", type=int, default=128, help="network/inference patch, isotropic (default 128)")
    parser.add_argument("--batch", type=int, default=2, help="training batch size (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (default 10)")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the rows (default %(default)s)")
    parser.add_argument("--workdir", default=None, help="nnU-Net folders of the train section (default: a temp dir)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default); cpu only together with --smoke")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes, to check this script itself (on the CPU: every section but calibrate)")
    args = parser.parse_args(argv)
    if args.patch < 32 or args.patch % 32:
        parser.error(f"--patch {args.patch}: use a multiple of 32 (nnU-Net's default 3D plan halves it 5 times)")
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cpu" and not args.smoke:
        print("gpu_check: error: this check measures the GPU path; --device cpu is only for --smoke runs of the "
              "script itself.", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: torch sees no CUDA GPU (torch.cuda.is_available() is False). Run it on a machine "
              "with an NVIDIA GPU and a CUDA build of torch; `nvidia-smi` should list the GPU.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnUNetTrainer sets it
    sizes = Sizes.for_run(args.smoke, args.patch, args.batch, args.repeats)
    # the CPU smoke run leaves out the cost-model fit and the float16 comparison (a CPU without float16 units runs
    # float16 convolutions for minutes; tests/test_mixed_precision.py covers it at toy sizes)
    sections = [s for s in args.sections
                if not (args.smoke and device.type == "cpu" and s in ("calibrate", "precision"))]
    started = time.perf_counter()
    rows = run_sections(device, sizes, sections, args)
    rows.append(Row("total", "wall time", f"{time.perf_counter() - started:.0f} s"))
    print("\n" + markdown_table(rows))
    Path(args.json).write_text(json.dumps({"sizes": asdict(sizes), "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nWrote {args.json}")
    return 1 if any(r.what == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
