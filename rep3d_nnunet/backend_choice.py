"""Which backend a large depthwise convolution runs on: measured on first use (CUDA), or a cost model.

Two backends compute ``ops.depthwise_conv``: ``direct`` (torch's convolution: cuDNN or the native CUDA kernel, oneDNN
on the CPU) and ``fft`` (``ops``' exact FFT path, float32 inside autocast). For ``backend="auto"`` the policy in the
environment variable ``REP3D_CONV_BACKEND`` decides:

``measure`` (default on CUDA)
    On first use of a (device, dtype, per-sample input shape, kernel) both backends run forward and backward on
    tensors of the real shape (the whole batch); the faster is kept for the rest of the process and printed once.
    Under DDP every rank takes the slowest rank's times, so all ranks decide alike.
``model`` (default on the CPU, whose constants were measured on the project's machine)
    The cost model below decides (``choose_backend``); it also sizes FFT workspaces for the planner.
``direct`` or ``fft``
    Forces that backend for every ``auto`` convolution.

A decision never depends on grad mode or batch size: a shape decided in training is computed the same way in
validation and prediction (nnU-Net's validation runs the compiled network in eval mode; the predictor runs it under
``inference_mode``). Cropped kernels of at most 27 taps (3^3, 1x3x3) always stay ``direct``. torch.compile cannot run
a measurement while it traces; our trainers measure before the first compiled step (``measure_network``), and a shape
first met inside a trace is decided by the model, recorded and printed as such, so that eager calls of the same
shape agree with the compiled graph.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .kernel_geometry import check_kernel_size, cropped_radii, next_smooth_size

BACKENDS = ("auto", "direct", "fft")
POLICIES = ("measure", "model", "direct", "fft")
POLICY_VARIABLE = "REP3D_CONV_BACKEND"


# ---- cost model ----------------------------------------------------------------------------------------------------
def _by_key(cpu_train: float, cpu_infer: float, cuda_train: float, cuda_infer: float) -> dict[tuple[str, bool], float]:
    """Constants keyed (device type, a backward pass follows)."""
    return {
        ("cpu", True): cpu_train, ("cpu", False): cpu_infer, ("cuda", True): cuda_train, ("cuda", False): cuda_infer
    }


# Modelled seconds = per-unit constant * work + per-call overhead, keyed (device type, backward follows).
#   direct work: multiply-adds of one pass, N*C*prod(D)*prod(k_eff) (k_eff: the cropped kernel);
#   FFT work:    N*C*prod(n)*log2(prod(n)), the butterfly count of one full-size transform.
# The constants cover all passes (forward; or forward + grad input + grad weight). CPU: fitted to medians measured on
# this project's 2-core CPU (torch 2.15, 2 threads, float32; ``benchmarks/bench_ops.py --calibrate``; the forward-only
# direct constant is the fit's upper range, since oneDNN's per-MAC speed varies 3x with k). CUDA: a model, not
# measured (no GPU has run this project's benchmarks yet): direct at ~10% of an H100's fp32 peak (the native depthwise
# kernel re-reads the input per weight tap in its weight-gradient pass), FFT at half the memory-bound rate of unfused
# torch.fft calls, ~20 kernel launches of overhead per forward+backward. On CUDA the ``measure`` policy decides at run
# time; the model only sizes the planner's FFT workspaces there.
#                      (cpu, training)  (cpu, inference)  (cuda, training)  (cuda, inference)
_DIRECT_SECONDS_PER_MAC = _by_key(2.2e-9, 4.0e-11, 1.0e-12, 3.0e-13)
_DIRECT_OVERHEAD_SECONDS = _by_key(2.5e-4, 4e-5, 5e-5, 2e-5)
_FFT_SECONDS_PER_UNIT = _by_key(3.6e-9, 1.2e-9, 6.0e-12, 2.5e-12)
_FFT_OVERHEAD_SECONDS = _by_key(2e-3, 5e-4, 3e-4, 1e-4)
# The FFT backend must be modelled this much faster: it allocates spectra, deviates from torch's conv by rounding,
# and near the break-even the model cannot tell the two apart.
_FFT_MARGIN = 2.0
# A cropped kernel this small (3^3, 1x3x3, 1^3, ...) always stays on torch's conv, whatever the shape: measured on
# CPU, FFT wins by 1.5x at most there, and it is where cuDNN/oneDNN are at their best.
SMALL_KERNEL_TAPS = 27
# The CPU measures only backends the model puts within this factor of the fastest: a direct 21^3 forward+backward
# takes tens of seconds there (im2col), which no measurement should spend.
_CPU_CANDIDATE_FACTOR = 10.0


def estimate_seconds(input_shape: Sequence[int], kernel_size: int | Sequence[int],
                     device_type: str | torch.device = "cpu", requires_grad: bool = True) -> dict[str, float]:
    """Modelled run time of both backends (a cost model, not a measurement; see the module constants).

    direct = a * N*C*prod(D)*prod(k_eff) and fft = b * N*C*prod(n)*log2(prod(n)), with k_eff the cropped kernel,
    n the FFT sizes, and a, b per device type (``cuda``, anything else uses the CPU constants) and per pass set
    (forward only, or forward + grad input + grad weight).

    Args:
        input_shape: [N, C, *spatial], 2 or 3 spatial axes.
        kernel_size: odd size per spatial axis, or one int for all.
        device_type: ``"cpu"``, ``"cuda"`` (or a ``torch.device``).
        requires_grad: whether a backward pass follows (training) or the forward runs alone (inference).

    Returns:
        ``{"direct": seconds, "fft": seconds}``.
    """
    batch, channels, *spatial = (int(s) for s in input_shape)
    radii = cropped_radii(spatial, check_kernel_size(kernel_size, len(spatial)))
    key = ("cuda" if torch.device(device_type).type == "cuda" else "cpu", bool(requires_grad))
    macs = batch * channels * math.prod(spatial) * math.prod([2 * r + 1 for r in radii])
    points = math.prod([next_smooth_size(d + r) for d, r in zip(spatial, radii) if r > 0] or [1])
    fft_units = batch * channels * points * max(math.log2(points), 1.0)
    return {
        "direct": _DIRECT_SECONDS_PER_MAC[key] * macs + _DIRECT_OVERHEAD_SECONDS[key],
        "fft": _FFT_SECONDS_PER_UNIT[key] * fft_units + _FFT_OVERHEAD_SECONDS[key],
    }


def choose_backend(input_shape: Sequence[int], kernel_size: int | Sequence[int],
                   device_type: str | torch.device = "cpu", requires_grad: bool = True,
                   dtype: torch.dtype = torch.float32) -> str:
    """The cost model's choice, ``"direct"`` or ``"fft"`` (``estimate_seconds``).

    FFT is chosen only when modelled ``_FFT_MARGIN`` (2x) faster, so the per-call overheads keep tiny tensors on
    torch's conv; cropped kernels of at most 27 taps (3^3, 1x3x3, 1^3) always stay there. Larger float64 kernels on
    the CPU always take the FFT: oneDNN has no float64 convolution, and torch's fallback (``slow_conv3d``) is the
    path that made the eval-mode LRBM masks (float64) cost seconds per network.

    Args:
        input_shape: [N, C, *spatial], 2 or 3 spatial axes.
        kernel_size: odd size per spatial axis, or one int for all.
        device_type: ``"cpu"``, ``"cuda"`` (or a ``torch.device``).
        requires_grad: whether a backward pass follows; the convolutions decide for training (True), so that
            prediction computes what training did.
        dtype: the input's dtype (the cost model's constants are float32's).
    """
    spatial = [int(s) for s in input_shape[2:]]
    kernel_size = check_kernel_size(kernel_size, len(spatial))
    taps = math.prod([2 * r + 1 for r in cropped_radii(spatial, kernel_size)])
    if taps <= SMALL_KERNEL_TAPS:
        return "direct"
    if dtype == torch.float64 and torch.device(device_type).type == "cpu":
        return "fft"
    cost = estimate_seconds(input_shape, kernel_size, device_type, requires_grad)
    return "fft" if cost["fft"] * _FFT_MARGIN < cost["direct"] else "direct"


# ---- the decision per shape ----------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Key:
    """What a decision is for. ``sample_shape``: one sample's input [C or 1, *spatial] (``fan_out``: one channel read
    by ``channels`` filters); ``dtype``: what torch's convolution would run in (the autocast dtype under autocast)."""

    operation: str  # "depthwise" or "fan_out"
    device: str
    dtype: torch.dtype
    sample_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    channels: int

    def describe(self) -> str:
        spatial = "x".join(map(str, self.sample_shape[1:]))
        inputs = f"{self.channels} channels" if self.operation == "depthwise" else f"1 channel -> {self.channels}"
        return (f"{'x'.join(map(str, self.kernel))} {self.operation} conv, {inputs} at {spatial} "
                f"({self.device}, {str(self.dtype).removeprefix('torch.')})")


@dataclass(frozen=True)
class Decision:
    backend: str
    source: str  # "measured", "model", "forced", "small kernel", "model (first met while compiling)"
    seconds: tuple[tuple[str, float], ...] = ()  # measured median seconds of forward + backward per candidate

    def describe(self) -> str:
        if not self.seconds:
            return f"{self.backend} ({self.source})"
        times = ", ".join(f"{backend} {1e3 * s:.2f} ms" for backend, s in self.seconds)
        return f"{self.backend} (measured forward+backward: {times})"


_DECISIONS: dict[Key, Decision] = {}


def decisions() -> dict[Key, Decision]:
    """Every decision this process has taken, in order."""
    return dict(_DECISIONS)


def forget_decisions() -> None:
    """Drops every decision (tests; a process that moves to another GPU)."""
    _DECISIONS.clear()


def _model_backend(key: Key) -> str:
    return choose_backend((1, key.channels, *key.sample_shape[1:]), key.kernel, key.device.split(":")[0],
                          requires_grad=True, dtype=key.dtype)


def _record(key: Key, decision: Decision) -> str:
    _DECISIONS[key] = decision
    if decision.source not in ("model", "small kernel") and _is_first_rank():
        print(f"rep3d_nnunet: {key.describe()}: {decision.describe()}", flush=True)
    return decision.backend


def decided(key: Key) -> str:
    """The backend for ``key``: its decision if taken, else the policy's without measuring (forced, the model, or, for
    a shape first met while torch.compile traces, the model, recorded so that eager calls agree with the graph).
    Pure Python on hashable values: torch.compile runs it once while tracing and keeps the result."""
    if key in _DECISIONS:
        return _DECISIONS[key].backend
    device_type = key.device.split(":")[0]
    chosen = policy(device_type)
    if math.prod([2 * r + 1 for r in cropped_radii(key.sample_shape[1:], key.kernel)]) <= SMALL_KERNEL_TAPS:
        return _record(key, Decision("direct", "small kernel"))
    if chosen in ("direct", "fft"):
        return _record(key, Decision(chosen, "forced"))
    if chosen == "measure":
        return _record(key, Decision(_model_backend(key), "model (first met while compiling, not measured)"))
    return _record(key, Decision(_model_backend(key), "model"))


def needs_measurement(key: Key) -> bool:
    """True where the policy is ``measure``, the key is undecided and the kernel is not small."""
    return (key not in _DECISIONS and policy(key.device.split(":")[0]) == "measure"
            and math.prod([2 * r + 1 for r in cropped_radii(key.sample_shape[1:], key.kernel)]) > SMALL_KERNEL_TAPS)


def measure(key: Key, batch: int, run: Callable[[str], None], repeats: int = 3, budget_seconds: float = 0.5) -> str:
    """Times ``run(backend)`` (one forward and backward on fresh tensors of the real shape) for each candidate, keeps
    the fastest as the decision for ``key`` and returns it.

    One untimed warm-up per candidate (cuDNN's algorithm search, cuFFT plans), then up to ``repeats`` timed runs or
    until ``budget_seconds`` are spent; the median counts. On the CPU only candidates the model puts within 10x of the
    fastest are run. Under DDP the times are reduced to every rank's maximum before deciding.
    """
    device_type = key.device.split(":")[0]
    candidates = ["direct", "fft"]
    if device_type != "cuda":
        modelled = estimate_seconds((batch, key.channels, *key.sample_shape[1:]), key.kernel, device_type)
        if key.dtype == torch.float64:
            modelled["direct"] = math.inf
        fastest = min(modelled.values())
        candidates = [c for c in candidates if modelled[c] <= _CPU_CANDIDATE_FACTOR * fastest]
    seconds = []
    for backend in candidates:
        run(backend)
        times = []
        while len(times) < repeats and sum(times) < budget_seconds:
            _synchronize(device_type)
            started = time.perf_counter()
            run(backend)
            _synchronize(device_type)
            times.append(time.perf_counter() - started)
        seconds.append(statistics.median(times))
    seconds = _slowest_rank(seconds, key.device)
    best = candidates[min(range(len(candidates)), key=seconds.__getitem__)]
    return _record(key, Decision(best, "measured", tuple(zip(candidates, seconds))))


def _synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _is_first_rank() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


def _slowest_rank(seconds: list[float], device: str) -> list[float]:
    if not _distributed():
        return seconds
    backend = torch.distributed.get_backend()
    tensor = torch.tensor(seconds, dtype=torch.float64, device=device if backend == "nccl" else "cpu")
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


# ---- a whole network, before torch.compile traces it ---------------------------------------------------------------
def measure_network(network: torch.nn.Module, input_shape: Sequence[int], device: torch.device,
                    autocast_dtype: torch.dtype | None = None) -> None:
    """Takes every ``measure`` decision of ``network``'s training step (forward and backward of an eager copy on
    zeros of ``input_shape``, under autocast when ``autocast_dtype`` is given), so that a compiled network finds
    them decided. The network itself (weights, norm statistics, gradients) is left untouched.
    """
    import copy

    if policy(torch.device(device).type) != "measure":
        return
    eager = copy.deepcopy(getattr(network, "_orig_mod", network)).train()
    x = torch.zeros(*input_shape, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with torch.inference_mode(False), torch.enable_grad(), autocast:
        output = eager(x)
        outputs = output if isinstance(output, (list, tuple)) else [output]
        sum(o.float().sum() for o in outputs).backward()
    del eager, x, output, outputs
