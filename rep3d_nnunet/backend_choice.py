"""Which backend each large depthwise convolution runs on: the decisions, the policy that takes them, and their record.

Two backends compute ``ops.depthwise_conv`` (``conv_backends``: ``direct``, torch's conv; ``fft``, the exact FFT
path). For ``backend="auto"`` one decision is taken per ``Key`` (operation, device, the dtype torch's conv runs in,
memory format, one sample's shape, kernel) and kept: training, validation and prediction of a shape compute it the
same way. The policy in the environment variable ``REP3D_CONV_BACKEND`` says how a decision is taken:

``measure`` (default on CUDA)
    Both backends are timed on the shape (``backend_measurement``). Our trainers take every decision of a run before
    its first step (training step, validation and batch-1 prediction tiles; under DDP all ranks agree then) and
    record them with the model; a shape met later is measured once, where it is met, on that process alone.
``model`` (default on the CPU, whose constants were measured on the project's machine)
    The cost model decides (``backend_cost_model.choose_backend``).
``direct`` or ``fft``
    Forces that backend for every ``auto`` convolution.

Cropped kernels of at most 27 taps (3^3, 1x3x3) always stay ``direct``. A shape first met while torch.compile traces
is decided by the cost model (nothing can be timed inside a trace), recorded and printed as such.

The record (``record``, ``adopt``): decisions are kept per device model (``device_identity``: the GPU's name from
``torch.cuda.get_device_name``, the CPU's model name), as plain JSON values, in the model folder's plans and the
checkpoints (``nnunet_compat.record_build_inputs``) and in an export's plans (the folded network's
``conv_backend_decisions``). Building a network from such plans adopts the decisions recorded for a device this
machine has; a record for another device is ignored with one printed line, and that device's shapes are decided
here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from .backend_cost_model import choose_backend, is_small_kernel

BACKENDS = ("auto", "direct", "fft")
POLICIES = ("measure", "model", "direct", "fft")
POLICY_VARIABLE = "REP3D_CONV_BACKEND"
MEMORY_FORMATS = ("contiguous", "channels_last")


def policy(device_type: str) -> str:
    """``REP3D_CONV_BACKEND``, or the default: ``measure`` on CUDA, ``model`` elsewhere.

    Raises:
        ValueError: an unknown value (the message lists the allowed ones).
    """
    value = os.environ.get(POLICY_VARIABLE, "").strip().lower()
    if not value:
        return "measure" if device_type == "cuda" else "model"
    if value not in POLICIES:
        raise ValueError(f"{POLICY_VARIABLE}={value!r} is not one of {', '.join(POLICIES)}; unset it for the default "
                         f"(measure on CUDA, model on the CPU).")
    return value


@functools.cache
def device_identity(device: str) -> str:
    """The device model a decision holds for: ``"cuda: NVIDIA H100 80GB HBM3"``, ``"cpu: <model name>"``.

    Two GPUs of one model share decisions; a decision measured on another model is not reused. Pure Python on a
    string, cached: torch.compile may call it while tracing.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {_cpu_model_name()}"
    return device.type


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def local_device_identities() -> list[str]:
    """Every device model of this machine (the CPU, each visible GPU)."""
    identities = [device_identity("cpu")]
    if torch.cuda.is_available():
        identities += [device_identity(f"cuda:{index}") for index in range(torch.cuda.device_count())]
    return list(dict.fromkeys(identities))


def memory_format_of(x: torch.Tensor) -> str:
    """``channels_last`` for a channels-last input that is not also contiguous, else ``contiguous`` (on CUDA torch
    sends channels-last depthwise convolutions to cuDNN and contiguous ones to its own kernel)."""
    channels_last = {5: torch.channels_last_3d, 4: torch.channels_last}.get(x.ndim)
    if channels_last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return "channels_last"
    return "contiguous"


@dataclass(frozen=True)
class Key:
    """What a decision is for.

    Attributes:
        operation: ``depthwise`` or ``fan_out`` (one input channel read by ``channels`` filters).
        device: ``device_identity`` of the device.
        dtype: what torch's convolution runs in (the autocast dtype under autocast).
        memory_format: ``contiguous`` or ``channels_last`` (``memory_format_of``).
        sample_shape: one sample's input [C or 1, *spatial] (the batch size never changes a decision).
        kernel: the kernel's size per spatial axis.
        channels: C, the output channels.
    """

    operation: str
    device: str
    dtype: torch.dtype
    memory_format: str
    sample_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    channels: int

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def describe(self) -> str:
        spatial = "x".join(map(str, self.sample_shape[1:]))
        inputs = f"{self.channels} channels" if self.operation == "depthwise" else f"1 channel -> {self.channels}"
        layout = "" if self.memory_format == "contiguous" else f", {self.memory_format}"
        return (f"{'x'.join(map(str, self.kernel))} {self.operation} conv, {inputs} at {spatial} "
                f"({self.device_type}, {str(self.dtype).removeprefix('torch.')}{layout})")


@dataclass(frozen=True)
class Decision:
    """A backend and how it was chosen.

    Attributes:
        backend: ``direct`` or ``fft``.
        source: ``measured``, ``model``, ``forced``, ``small kernel`` or ``model (first met while compiling, not
            measured)``.
        seconds: measured median seconds of forward + backward per candidate.
        recorded: read from a model's record (``adopt``), not taken in this process.
    """

    backend: str
    source: str
    seconds: tuple[tuple[str, float], ...] = ()
    recorded: bool = False

    def describe(self) -> str:
        origin = " (recorded with the model)" if self.recorded else ""
        if not self.seconds:
            return f"{self.backend} ({self.source}){origin}"
        times = ", ".join(f"{backend} {1e3 * s:.2f} ms" for backend, s in self.seconds)
        return f"{self.backend} (measured forward+backward: {times}){origin}"


class ConvCall(NamedTuple):
    """What a measurement of ``key`` reproduces: one call's batch, input and weight dtypes, bias, autocast dtype
    (None outside autocast) and device."""

    key: Key
    batch: int
    input_dtype: torch.dtype
    weight_dtype: torch.dtype
    has_bias: bool
    autocast_dtype: torch.dtype | None
    device: torch.device


_DECISIONS: dict[Key, Decision] = {}
# While a network's pre-measurement collects the keys of a step (``collecting``): the undecided keys met, in order.
_PENDING: dict[Key, ConvCall] | None = None
_ANNOUNCED: set[str] = set()  # records read or ignored, each said once


def decisions() -> dict[Key, Decision]:
    """Every decision this process has taken or adopted, in order."""
    return dict(_DECISIONS)


def forget_decisions() -> None:
    """Drops every decision (tests; a process that moves to another GPU)."""
    _DECISIONS.clear()
    _ANNOUNCED.clear()


def is_first_rank() -> bool:
    """Rank 0 of a DDP run, or the only process: the one that prints."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _model_backend(key: Key) -> str:
    return choose_backend((1, key.channels, *key.sample_shape[1:]), key.kernel, key.device_type,
                          requires_grad=True, dtype=key.dtype)


def take(key: Key, decision: Decision) -> str:
    """Keeps ``decision`` for ``key`` (printed once unless the model or a small kernel decided); returns its backend."""
    _DECISIONS[key] = decision
    if decision.source not in ("model", "small kernel") and is_first_rank():
        print(f"rep3d_nnunet: {key.describe()}: {decision.describe()}", flush=True)
    return decision.backend


def undecided(key: Key) -> bool:
    """True where the policy is ``measure``, the key is undecided and the kernel is not small: it is to be measured."""
    return (key not in _DECISIONS and policy(key.device_type) == "measure"
            and not is_small_kernel(key.sample_shape[1:], key.kernel))


def decided(key: Key) -> str:
    """The backend for ``key``: its decision if taken, else the policy's without measuring (forced, the model, or, for
    a shape first met while torch.compile traces, the model, recorded so that eager calls agree with the graph).
    Pure Python on hashable values: torch.compile runs it once while tracing and keeps the result."""
    if key in _DECISIONS:
        return _DECISIONS[key].backend
    if _PENDING is not None and key in _PENDING:
        return _model_backend(key)  # a pre-measurement's dry run: decided with the others once they are timed
    chosen = policy(key.device_type)
    if is_small_kernel(key.sample_shape[1:], key.kernel):
        return take(key, Decision("direct", "small kernel"))
    if chosen in ("direct", "fft"):
        return take(key, Decision(chosen, "forced"))
    if chosen == "measure":
        return take(key, Decision(_model_backend(key), "model (first met while compiling, not measured)"))
    return take(key, Decision(_model_backend(key), "model"))


@contextlib.contextmanager
def collecting() -> Iterator[dict[Key, ConvCall]]:
    """Within: the undecided keys met are noted (``defer``) instead of measured one by one, and the model's backend
    stands in for them, unrecorded. Yields the notes: {key: the first call that met it}."""
    global _PENDING
    if _PENDING is not None:
        raise RuntimeError("A network's backend pre-measurement is already collecting in this process.")
    _PENDING = {}
    try:
        yield _PENDING
    finally:
        _PENDING = None


def defer(call: ConvCall) -> bool:
    """Notes ``call`` for the pre-measurement that is collecting; False where none is (measure it now)."""
    if _PENDING is None:
        return False
    _PENDING.setdefault(call.key, call)
    return True


# ---- the record that travels with a model ----------------------------------------------------------------------
def _entry(key: Key, decision: Decision) -> dict:
    return {"operation": key.operation, "dtype": str(key.dtype).removeprefix("torch."),
            "memory_format": key.memory_format, "sample_shape": list(key.sample_shape), "kernel": list(key.kernel),
            "channels": key.channels, "backend": decision.backend, "source": decision.source,
            "seconds": {backend: seconds for backend, seconds in decision.seconds}}


def _key_and_decision(device: str, entry: dict) -> tuple[Key, Decision]:
    key = Key(entry["operation"], device, getattr(torch, entry["dtype"]), entry["memory_format"],
              tuple(entry["sample_shape"]), tuple(entry["kernel"]), int(entry["channels"]))
    seconds = tuple((backend, float(s)) for backend, s in entry.get("seconds", {}).items())
    return key, Decision(entry["backend"], entry["source"], seconds, recorded=True)


def record(previous: dict | None = None) -> dict:
    """The decisions of this process as plain JSON values, {device identity: [decision, ...]}, merged into
    ``previous`` (a model's earlier record: its other devices are kept). Small kernels are left out (always direct).
    """
    merged = {device: list(entries) for device, entries in (previous or {}).items()}
    own: dict[str, list[dict]] = {}
    for key, decision in _DECISIONS.items():
        if decision.source != "small kernel":
            own.setdefault(key.device, []).append(_entry(key, decision))
    return {**merged, **own}


def adopt(recorded: dict | None) -> int:
    """Makes a model's recorded decisions this process's, for the devices this machine has; returns how many.

    A decision this process has already taken for a key stays (a compiled graph may hold it). A record of another
    device is ignored with one printed line: that device's shapes are decided here, by this machine's policy.
    """
    adopted = 0
    local = local_device_identities()
    for device, entries in (recorded or {}).items():
        if device not in local:
            if device not in _ANNOUNCED and is_first_rank():
                print(f"rep3d_nnunet: this model's convolution backends were measured on {device}; this machine has "
                      f"{' and '.join(local)}, so that record is ignored and each shape is decided here "
                      f"({POLICY_VARIABLE}: measure on CUDA, the cost model on the CPU by default).", flush=True)
            _ANNOUNCED.add(device)
            continue
        for entry in entries:
            key, decision = _key_and_decision(device, entry)
            if key not in _DECISIONS:
                _DECISIONS[key] = decision
                adopted += 1
        if device not in _ANNOUNCED and is_first_rank():
            print(f"rep3d_nnunet: {len(entries)} convolution backend decision(s) recorded with the model on {device} "
                  f"are used as recorded.", flush=True)
        _ANNOUNCED.add(device)
    return adopted
