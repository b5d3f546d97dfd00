"""Where a training step's time goes: the default Rep3D network against nnU-Net's PlainConvUNet, part by part.

One training step (forward, nnU-Net's deep-supervised Dice+CE loss as its trainer builds it, backward, AdamW step) of

* ``nnunet``: PlainConvUNet from the plan, with nnUNetTrainerAdam1en3's optimizer (AdamW, lr 1e-3, weight decay
  3e-5, amsgrad), and
* ``rep3d``: ``training.build_rep3d_network`` with ``config.Rep3DSettings()`` (the default trainer's network) and the
  Rep3D trainers' optimizer (``training.build_optimizer``: AdamW with its parameter groups),

on (a) the MSD Hippocampus 3d_fullres plan nnU-Net 2.8.1 writes (``benchmarks/plans/``: patch 40 x 56 x 40, four
stages, features 32-256, batch 7) and (b) a six-stage anisotropic plan (nnU-Net's topology helper for a 40 x 128 x
128 patch at spacing 3 x 1 x 1 mm, features 32-320, batch 2, the abdominal MRI plan of issue 31), each at the plan's
full width (``--divisor 1``) or with every stage's features divided (``--divisor 4``: the project's benchmark, batch
2).

Two measurements, both on one torch thread, contenders interleaved in one process:

1. Seconds per step: CPU time of this process (``time.process_time``: other jobs on a shared machine do not count)
   over ``--repeats`` plain steps per contender, median; the ratio Rep3D / nnU-Net is what the issue's targets read.
2. Time per part: ``--profiled`` clocked steps per contender, CPU time of the thread (``time.thread_time``; with one
   torch thread the backward runs on it too). Every module of interest runs inside a label (the plan's convolutions
   of each stage, each stage's large-kernel convolutions, their masks W * M with the LRBM generator, the rest of the
   Rep3D blocks: norm, GELU, 1x1 and the residual, the decoder); a label's forward time is its own (a nested label
   pauses its parent). Backward time is clocked per autograd node (hooks before and after each node runs) and goes
   to the label whose forward created the node (by autograd's sequence numbers). Loss (forward and backward) and
   optimizer (zero_grad + step) have their own labels; ``AccumulateGrad``, the engine's work between nodes and
   unlabelled glue are "other". The table holds medians over the clocked steps per part. ``--ops`` adds one step
   under torch.profiler (the same labels as ``record_function`` ranges) and lists the costliest ops inside the
   large-kernel convolutions and the masks (wall time of that one step: shares, not seconds, are what it is for).

    nice python benchmarks/profile_step.py --plan hippocampus --divisor 4
    nice python benchmarks/profile_step.py --plan six_stage --divisor 1 --repeats 2 --profiled 1
    nice python benchmarks/profile_step.py --plan hippocampus --divisor 4 --only-ratio \\
        --design "stage0-none: blocks=0,2,2,2" --design "k13: kernel=13"

``--design "NAME: key=value ..."`` times a Rep3D design alternative beside the default (data for the design
decision, not a default): ``blocks`` (per stage, e.g. ``0,2,2,2``, or one number), ``kernel`` (requested kernel per
stage, capped by the feature map as the default is, or one number), ``modulation`` (``lrbm``, ``fixed``, ``none``).
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch.autograd.profiler import record_function

from rep3d_nnunet.blocks import ModulatedDepthwiseConv, Rep3DBlock
from rep3d_nnunet.config import REP3D_NETWORK_CLASS, Rep3DSettings, rep3d_architecture
from rep3d_nnunet.kernel_geometry import stage_kernel_sizes
from rep3d_nnunet.training import OptimizerSettings, build_optimizer, build_rep3d_network

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
HIPPOCAMPUS_PLANS = Path(__file__).parent / "plans" / "Dataset004_Hippocampus_nnUNetPlans.json"
MARK = "§"  # prefix of this script's record_function labels
PARTS = ("plan's convs (conv, norm, act)", "large-kernel conv", "mask (LRBM generator, W*M)",
         "block norm / GELU / 1x1 / residual", "decoder", "loss", "optimizer (zero_grad + step)", "other")


# ---- plans ------------------------------------------------------------------------------------------------------------
def hippocampus_plan(divisor: int) -> tuple[dict, int, int]:
    """(3d_fullres configuration, batch, classes) of the MSD Hippocampus plans nnU-Net wrote; batch 7 at full width,
    2 with divided features (the project's benchmark, ``benchmarks/hippocampus.py``)."""
    configuration = json.loads(HIPPOCAMPUS_PLANS.read_text())["configurations"]["3d_fullres"]
    batch = configuration["batch_size"] if divisor == 1 else 2
    return _divided(configuration, divisor, batch), batch, 3


def six_stage_plan(divisor: int) -> tuple[dict, int, int]:
    """nnU-Net's default topology for a 40 x 128 x 128 patch at 3 x 1 x 1 mm (six stages, the first two flat in z:
    strides 1x1x1, 1x2x2, 2x2x2 x3, 1x2x2; kernels 1x3x3 then 3^3), features 32-320, batch 2, four classes."""
    spacing, patch = [3.0, 1.0, 1.0], [40, 128, 128]
    _, strides, kernels, patch_size, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n = len(strides)
    arch_kwargs = {
        "n_stages": n, "features_per_stage": [min(320, 32 * 2 ** i) for i in range(n)],
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides], "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    configuration = {"patch_size": [int(p) for p in patch_size], "spacing": spacing, "batch_size": 2,
                     "architecture": {"network_class_name": PLAIN, "arch_kwargs": arch_kwargs,
                                      "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    return _divided(configuration, divisor, 2), 2, 4


def _divided(configuration: dict, divisor: int, batch: int) -> dict:
    configuration = json.loads(json.dumps(configuration))
    kwargs = configuration["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(1, f // divisor) for f in kwargs["features_per_stage"]]
    configuration["batch_size"] = batch
    return configuration


PLANS = {"hippocampus": hippocampus_plan, "six_stage": six_stage_plan}


# ---- networks, loss, optimizers ---------------------------------------------------------------------------------------
def parse_design(text: str) -> tuple[str, dict]:
    """``"NAME: blocks=0,2,2,2 kernel=21,13,9,5 modulation=none"`` -> (NAME, {key: value})."""
    name, _, spec = text.partition(":")
    design = {}
    for token in spec.split():
        key, _, value = token.partition("=")
        if key not in ("blocks", "kernel", "modulation"):
            raise ValueError(f"Unknown design key {key!r} in {text!r}; allowed: blocks, kernel, modulation.")
        design[key] = value if key == "modulation" else [int(v) for v in value.split(",")]
    return name.strip(), design


def build_network(name: str, configuration: dict, classes: int, design: dict | None = None) -> torch.nn.Module:
    """``nnunet``: PlainConvUNet as nnU-Net builds it; otherwise the default Rep3D network (``design`` changes it)."""
    torch.manual_seed(0)
    manager = ConfigurationManager(configuration)
    if name == "nnunet":
        return get_network_from_plans(PLAIN, manager.network_arch_init_kwargs,
                                      manager.network_arch_init_kwargs_req_import, 1, classes, allow_init=True,
                                      deep_supervision=True)
    settings = Rep3DSettings(**({"modulation": design["modulation"]} if design and "modulation" in design else {}))
    if not design or design.keys() <= {"modulation"}:
        return build_rep3d_network(PlansManager({"configurations": {}}), manager, 1, classes, True, settings)
    kwargs, req_import = rep3d_architecture(manager.network_arch_class_name, manager.network_arch_init_kwargs,
                                            manager.patch_size, manager.spacing, settings)
    n = kwargs["n_stages"]
    if "blocks" in design:
        kwargs["n_blocks_per_stage"] = design["blocks"] * n if len(design["blocks"]) == 1 else design["blocks"]
    if "kernel" in design:
        requested = design["kernel"] * n if len(design["kernel"]) == 1 else design["kernel"]
        kwargs["large_kernel_sizes"] = [
            stage_kernel_sizes(manager.patch_size, kwargs["strides"], kwargs["kernel_sizes"], k)[s]
            for s, k in enumerate(requested)]
    return get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, req_import, 1, classes, allow_init=True,
                                  deep_supervision=True)


def build_optimizer_for(name: str, network: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "nnunet":  # nnUNetTrainerAdam1en3
        return torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=3e-5, amsgrad=True)
    optimizer, _ = build_optimizer(network, OptimizerSettings(), num_epochs=1000)
    return optimizer


def build_loss(configuration: dict) -> torch.nn.Module:
    """nnUNetTrainer._build_loss: Dice+CE, deep supervision weights 1 / 2^i, the lowest resolution weighted 0."""
    n_outputs = len(configuration["architecture"]["arch_kwargs"]["strides"]) - 1
    weights = np.array([1 / (2 ** i) for i in range(n_outputs)])
    weights[-1] = 0
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def batch_data(configuration: dict, batch: int, classes: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A random batch and its targets at nnU-Net's deep supervision scales."""
    generator = torch.Generator().manual_seed(0)
    patch = configuration["patch_size"]
    strides = configuration["architecture"]["arch_kwargs"]["strides"]
    cumulative = np.cumprod(np.array(strides), axis=0)
    x = torch.randn(batch, 1, *patch, generator=generator)
    targets = [torch.randint(0, classes, (batch, 1, *[p // int(c) for p, c in zip(patch, cumulative[i])]),
                             generator=generator).float() for i in range(len(strides) - 1)]
    return x, targets


class Contender:
    """A network with its optimizer, the loss and one batch; ``step()`` runs one labelled training step."""

    def __init__(self, name: str, network: torch.nn.Module, configuration: dict, batch: int, classes: int):
        self.name = name
        self.network = network.train()
        self.optimizer = build_optimizer_for("nnunet" if name == "nnunet" else "rep3d", network)
        self.loss = build_loss(configuration)
        self.x, self.targets = batch_data(configuration, batch, classes)
        self.labels = label_modules(network)

    def step(self, clock: "PartClock | None" = None) -> None:
        """One training step; with a ``clock``, its CPU time per part."""
        global ACTIVE_CLOCK
        ACTIVE_CLOCK = clock
        try:
            with _part(MARK + "optimizer (zero_grad + step)|"):
                self.optimizer.zero_grad(set_to_none=True)
            with _part(MARK + "other|"):
                outputs = self.network(self.x)
            with _part(MARK + "loss|"):
                value = self.loss(outputs, self.targets)
            handles = clock.watch_backward(value) if clock is not None else []
            started = time.thread_time()
            with record_function(MARK + "backward"):
                value.backward()
            if clock is not None:
                clock.backward_total += time.thread_time() - started
            for handle in handles:
                handle.remove()
            with _part(MARK + "optimizer (zero_grad + step)|"):
                self.optimizer.step()
        finally:
            ACTIVE_CLOCK = None


# ---- labels -----------------------------------------------------------------------------------------------------------
ACTIVE_CLOCK = None


def _sequence_mark() -> int:
    """The autograd sequence number the next node will get minus one (creating a node consumes one)."""
    with torch.enable_grad():
        return (torch.empty(0, requires_grad=True) * 1).grad_fn._sequence_nr()


class PartClock:
    """CPU time of this thread per part: forward by label ranges (nested labels pause their parent), backward by
    autograd node (each node's run goes to the label its forward ran in, found by its sequence number)."""

    def __init__(self):
        self.times: dict[tuple[str, str], float] = defaultdict(float)
        self.stack: list[list] = []  # [label, started]
        self.bounds: list[tuple[int, str]] = []  # (sequence mark, label of the nodes created after it)
        self.backward_total = 0.0

    def enter(self, label: str) -> None:
        now = time.thread_time()
        if self.stack:
            self.times[(self.stack[-1][0], "forward")] += now - self.stack[-1][1]
        self.bounds.append((_sequence_mark(), label))
        self.stack.append([label, time.thread_time()])

    def leave(self) -> None:
        now = time.thread_time()
        label, started = self.stack.pop()
        self.times[(label, "forward")] += now - started
        self.bounds.append((_sequence_mark(), self.stack[-1][0] if self.stack else "other|"))
        if self.stack:
            self.stack[-1][1] = time.thread_time()

    def label_of(self, sequence_nr: int) -> str:
        index = bisect.bisect_left(self.bounds, (sequence_nr, "")) - 1
        return self.bounds[index][1] if index >= 0 else "other|"

    def watch_backward(self, value: torch.Tensor) -> list:
        """Hooks on every node of ``value``'s graph that time its run; returns their handles."""
        handles, seen, pending = [], set(), [value.grad_fn]
        while pending:
            node = pending.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            pending.extend(next_node for next_node, _ in node.next_functions)
            label = "other|" if node.name().endswith("AccumulateGrad") else self.label_of(node._sequence_nr())
            started = []
            handles.append(node.register_prehook(lambda *_, started=started: started.append(time.thread_time())))
            handles.append(node.register_hook(lambda *_, started=started, label=label: self._charge(label, started)))
        return handles

    def _charge(self, label: str, started: list) -> None:
        self.times[(label, "backward")] += time.thread_time() - started.pop()

    def parts(self) -> dict[tuple[str, str], float]:
        """{(label, phase): seconds}; the backward's engine work outside the nodes goes to other."""
        times = dict(self.times)
        nodes = sum(v for (_, phase), v in times.items() if phase == "backward")
        times[("other|", "backward")] = times.get(("other|", "backward"), 0.0) + self.backward_total - nodes
        return times


class _part:
    """A labelled range: ``record_function`` for torch.profiler and, while a step is clocked, the clock's part."""

    def __init__(self, label: str):
        self.range = record_function(label)
        self.label = label[len(MARK):]

    def __enter__(self):
        self.range.__enter__()
        if ACTIVE_CLOCK is not None:
            ACTIVE_CLOCK.enter(self.label)

    def __exit__(self, *args):
        if ACTIVE_CLOCK is not None:
            ACTIVE_CLOCK.leave()
        self.range.__exit__(*args)


def _label_forward(module: torch.nn.Module, label: str) -> None:
    """Runs the module's forward inside ``_part(label)`` (hooks open and close the range)."""
    ranges = []

    def enter(*_):
        ranges.append(_part(label))
        ranges[-1].__enter__()

    def leave(*_):
        ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


_MASK_LABELS: dict[int, str] = {}
_original_effective_weight = ModulatedDepthwiseConv.effective_weight


def _labelled_effective_weight(self):
    label = _MASK_LABELS.get(id(self))
    if label is None:
        return _original_effective_weight(self)
    with _part(label):
        return _original_effective_weight(self)


ModulatedDepthwiseConv.effective_weight = _labelled_effective_weight


def label_modules(network: torch.nn.Module) -> list[str]:
    """Puts every part of interest under a label ``MARK + part|stage``; returns the labels."""
    labels = []

    def add(module, label):
        _label_forward(module, MARK + label)
        labels.append(label)

    for s, stage in enumerate(network.encoder.stages):
        modules = list(stage) if isinstance(stage, torch.nn.Sequential) else [stage]
        for module in modules:
            if isinstance(module, Rep3DBlock):
                add(module, f"{PARTS[3]}|{s}")
                add(module.conv, f"{PARTS[1]}|{s}")
                _MASK_LABELS[id(module.conv)] = MARK + f"{PARTS[2]}|{s}"
            else:  # nnU-Net's StackedConvBlocks (PlainConvUNet's stage, or the Rep3D stage's downsampling convs)
                add(module, f"{PARTS[0]}|{s}")
    add(network.decoder, f"{PARTS[4]}|")
    return labels


# ---- profile parsing --------------------------------------------------------------------------------------------------
def _nearest_label(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(MARK) and "|" in parent.name:
            return parent.name[len(MARK):]
        parent = parent.cpu_parent
    return None


def parts_of_profile(events, ops: dict | None = None) -> dict[tuple[str, str], float]:
    """{(label, "forward" | "backward"): seconds} of one profiled step (see the module docstring).

    ``ops``, if given, receives {(part, phase, op name): self seconds} summed over the stages."""
    times: dict[tuple[str, str], float] = defaultdict(float)
    creator: dict[int, tuple[float, str]] = {}  # sequence number -> (start, label) of its latest forward op
    for event in events:
        name = event.name
        seconds = event.time_range.elapsed_us() * 1e-6
        if name.startswith(MARK) and "|" in name:  # a label: its own time is its range minus the labels inside
            label = name[len(MARK):]
            times[(label, "forward")] += seconds
            outer = _nearest_label(event)
            if outer is not None:
                times[(outer, "forward")] -= seconds
            elif _inside(event, MARK + "forward"):  # a top-level part of the network's forward
                times[("other|", "forward")] -= seconds
        elif name == MARK + "forward":
            times[("other|", "forward")] += seconds
        elif event.sequence_nr >= 0 and not name.startswith("autograd::engine") and not _inside(
                event, MARK + "backward"):
            label = _nearest_label(event) or "other|"
            start = event.time_range.start
            if event.sequence_nr not in creator or creator[event.sequence_nr][0] <= start:
                creator[event.sequence_nr] = (start, label)
        if ops is not None and not name.startswith(MARK) and not _inside(event, MARK + "backward"):
            label = _nearest_label(event)
            if label is not None:
                ops[(label.split("|")[0], "forward", name)] += event.self_cpu_time_total * 1e-6
    for event in events:  # backward: each node's evaluation goes to the label of the forward op that created it
        if event.name.startswith("autograd::engine::evaluate_function"):
            label = creator.get(event.sequence_nr, (0.0, "other|"))[1] if event.sequence_nr >= 0 else "other|"
            times[(label, "backward")] += event.time_range.elapsed_us() * 1e-6
            if ops is not None:
                pending = [event]
                while pending:
                    op = pending.pop()
                    ops[(label.split("|")[0], "backward", op.name)] += op.self_cpu_time_total * 1e-6
                    pending.extend(op.cpu_children)
    return dict(times)


def _inside(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def profile_steps(contenders: list[Contender], steps: int, ops: bool = False) -> dict[str, dict]:
    """Per contender {(label, phase): median CPU seconds} and the median clocked step, over ``steps`` interleaved;
    with ``ops``, one more step under torch.profiler for the ops inside the large-kernel convs and masks."""
    collected = {c.name: [] for c in contenders}
    for _ in range(steps):
        for contender in contenders:
            clock = PartClock()
            started = time.thread_time()
            contender.step(clock)
            collected[contender.name].append((clock.parts(), time.thread_time() - started))
    result = {}
    for name, runs in collected.items():
        keys = {k for parts, _ in runs for k in parts}
        result[name] = {"parts": {k: statistics.median(p.get(k, 0.0) for p, _ in runs) for k in keys},
                        "step": statistics.median(t for _, t in runs), "ops": {}}
    if ops:
        for contender in contenders:
            found = defaultdict(float)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                contender.step()
            parts_of_profile(profiler.events(), found)
            result[contender.name]["ops"] = dict(found)
    return result


# ---- tables -----------------------------------------------------------------------------------------------------------
def print_profile_table(profiles: dict[str, dict], title: str) -> None:
    names = list(profiles)
    print(f"\n{title}: clocked step (CPU time, median of the clocked steps), seconds forward / backward, share")
    print("| part | stage | " + " | ".join(f"{n} fwd | {n} bwd | {n} share" for n in names) + " |")
    print("| --- | --- | " + " | ".join("---: | ---: | ---:" for _ in names) + " |")
    rows = sorted({k[0] for p in profiles.values() for k in p["parts"]},
                  key=lambda label: (PARTS.index(label.split("|")[0]) if label.split("|")[0] in PARTS
                                     else len(PARTS), label))
    totals = {n: defaultdict(float) for n in names}
    for label in rows:
        part, _, stage = label.partition("|")
        cells = []
        for n in names:
            fwd = profiles[n]["parts"].get((label, "forward"), 0.0)
            bwd = profiles[n]["parts"].get((label, "backward"), 0.0)
            totals[n][part] += fwd + bwd
            if (label, "forward") in profiles[n]["parts"] or (label, "backward") in profiles[n]["parts"]:
                cells.append(f"{fwd:.3f} | {bwd:.3f} | {100 * (fwd + bwd) / profiles[n]['step']:.1f}%")
            else:
                cells.append("- | - | -")
        print(f"| {part} | {stage or '-'} | " + " | ".join(cells) + " |")
    print("| **clocked step** | | " + " | ".join(f"**{profiles[n]['step']:.3f}** | | 100%" for n in names) + " |")
    print("\nper part, all stages (seconds forward + backward):")
    print("| part | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---:" for _ in names) + " |")
    for part in PARTS:
        if any(part in totals[n] for n in names):
            print(f"| {part} | " + " | ".join(f"{totals[n].get(part, 0.0):.3f}" for n in names) + " |")


def print_op_table(profiles: dict[str, dict], name: str, parts=(PARTS[1], PARTS[2]), top: int = 12) -> None:
    """The ops that cost most inside the given parts (self time, mean over the profiled steps, all stages)."""
    ops = profiles[name]["ops"]
    for part in parts:
        rows = sorted(((seconds, phase, op) for (p, phase, op), seconds in ops.items() if p == part), reverse=True)
        if not rows:
            continue
        total = sum(seconds for seconds, _, _ in rows)
        print(f"\n{name}, {part}: ops by self time (torch.profiler, wall time of one step, all stages, {total:.3f} s)")
        print("| op | phase | s | share |")
        print("| --- | --- | ---: | ---: |")
        for seconds, phase, op in rows[:top]:
            print(f"| {op[:70]} | {phase} | {seconds:.4f} | {100 * seconds / total:.1f}% |")


def time_steps(contenders: list[Contender], repeats: int) -> dict[str, float]:
    """Median CPU seconds of a plain step per contender, interleaved."""
    times = {c.name: [] for c in contenders}
    for _ in range(repeats):
        for contender in contenders:
            started = time.process_time()
            contender.step()
            times[contender.name].append(time.process_time() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=tuple(PLANS), default="hippocampus")
    parser.add_argument("--divisor", type=int, default=4, help="features per stage divided by this (1: full width)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="plain steps per contender for the ratio")
    parser.add_argument("--profiled", type=int, default=2, help="profiled steps per contender (0: none)")
    parser.add_argument("--ops", action="store_true", help="also the costliest ops of the large-kernel convs and masks")
    parser.add_argument("--only-ratio", action="store_true", help="no profile, only seconds per step")
    parser.add_argument("--design", action="append", default=[],
                        help='a Rep3D design alternative to time beside the default, e.g. "s0-none: blocks=0,2,2,2"')
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.profiled < 0 or args.divisor < 1:
        parser.error("--repeats and --divisor must be >= 1, --warmup and --profiled >= 0")
    torch.set_num_threads(1)
    configuration, batch, classes = PLANS[args.plan](args.divisor)
    kwargs = configuration["architecture"]["arch_kwargs"]
    print(f"plan {args.plan}, features {kwargs['features_per_stage']}, patch {configuration['patch_size']}, batch "
          f"{batch}, strides {kwargs['strides']}; torch {torch.__version__}, 1 thread")
    contenders = [Contender(name, build_network(name, configuration, classes), configuration, batch, classes)
                  for name in ("nnunet", "rep3d")]
    for text in args.design:
        name, design = parse_design(text)
        contenders.append(Contender(name, build_network("rep3d", configuration, classes, design), configuration,
                                    batch, classes))
    for contender in contenders[1:]:
        stages = [[m.kernel_size for m in stage.modules() if isinstance(m, ModulatedDepthwiseConv)]
                  for stage in contender.network.encoder.stages]
        print(f"{contender.name}: large-kernel blocks per stage {[len(k) for k in stages]}, kernels "
              f"{[k[0] if k else '-' for k in stages]}")
    for _ in range(args.warmup):
        for contender in contenders:
            contender.step()
    seconds = time_steps(contenders, args.repeats)
    print(f"\nseconds per step (CPU time, median of {args.repeats}, interleaved):")
    print("| network | s / step | x nnU-Net AdamW |")
    print("| --- | ---: | ---: |")
    for name, value in seconds.items():
        print(f"| {name} | {value:.3f} | {value / seconds['nnunet']:.2f} |")
    if not args.only_ratio and args.profiled:
        profiles = profile_steps(contenders[:2], args.profiled, args.ops)
        print_profile_table(profiles, f"{args.plan}, features / {args.divisor}, batch {batch}")
        if args.ops:
            print_op_table(profiles, "rep3d")
    print(json.dumps({"plan": args.plan, "divisor": args.divisor, "batch": batch, "seconds": seconds}))


if __name__ == "__main__":
    main()
