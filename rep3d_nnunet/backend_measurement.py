"""Measuring the two large-kernel backends: one shape on fresh tensors, or every shape of a network before training.

``measure(call)`` times forward and backward of both backends (``conv_backends``) on fresh tensors of the call's
shapes, dtypes and memory format, and takes the faster as the decision (``backend_choice.take``). It runs where
``ops`` meets an undecided shape under the ``measure`` policy, on that process alone: no collective, ever, outside
``measure_network``.

``measure_network`` is what our trainers run before the first step: an eager copy of the network does one training
step (forward and backward, under the autocast dtype the trainer's step uses) and one eval-mode forward of batch 1
(validation and prediction tiles: nnU-Net pads every tile to the patch size), while ``backend_choice.collecting``
notes every undecided key; then each key is timed, and under DDP the ranks agree on the slowest rank's times (the
run's only collective of this kind). Everything a run meets afterwards is decided, including the convolutions of
the LRBM mask generator in eval mode (kernel-sized tensors, in the eval path's dtype).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import zlib
from typing import Sequence

import torch

from . import backend_choice
from .backend_choice import ConvCall, Decision
from .backend_cost_model import CPU_CANDIDATE_FACTOR, estimate_seconds
from .conv_backends import convolve
from .kernel_geometry import conv_plan

CANDIDATES = ("direct", "fft")
_MEMORY_FORMATS = {("channels_last", 5): torch.channels_last_3d, ("channels_last", 4): torch.channels_last}


def candidates(call: ConvCall) -> list[str]:
    """Both backends on CUDA; on the CPU those the cost model puts within ``CPU_CANDIDATE_FACTOR`` of the fastest (a
    direct 21^3 forward+backward takes tens of seconds there, which no measurement should spend; oneDNN has no
    float64 convolution)."""
    key = call.key
    if key.device_type == "cuda":
        return list(CANDIDATES)
    modelled = estimate_seconds((call.batch, key.channels, *key.sample_shape[1:]), key.kernel, key.device_type)
    if key.dtype == torch.float64:
        modelled["direct"] = math.inf
    fastest = min(modelled.values())
    return [c for c in CANDIDATES if modelled[c] <= CPU_CANDIDATE_FACTOR * fastest]


def _fresh_run(call: ConvCall, backend: str) -> None:
    """One forward and backward of the call's convolution on fresh tensors, by ``backend`` (with autograd, also
    when the call came from an eval forward under ``inference_mode``: the decision is the training one)."""
    key, device = call.key, call.device
    autocast = torch.autocast(device.type, dtype=call.autocast_dtype, enabled=call.autocast_dtype is not None)
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn((call.batch, *key.sample_shape), dtype=call.input_dtype, device=device)
        memory_format = _MEMORY_FORMATS.get((key.memory_format, x.ndim))
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        x.requires_grad_(True)
        weight = torch.randn(key.channels, 1, *key.kernel, dtype=call.weight_dtype, device=device, requires_grad=True)
        bias = torch.zeros(key.channels, dtype=call.weight_dtype, device=device, requires_grad=True) \
            if call.has_bias else None
        with autocast:
            y = convolve(backend, key.operation, x, weight, bias, conv_plan(tuple(key.sample_shape[1:]), key.kernel))
        y.float().sum().backward()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backend(call: ConvCall, backend: str, repeats: int = 3, budget_seconds: float = 0.5) -> float:
    """Median seconds of forward + backward by ``backend``: one untimed warm-up (cuDNN's algorithm search, cuFFT
    plans), then up to ``repeats`` timed runs or until ``budget_seconds`` are spent."""
    _fresh_run(call, backend)
    times = []
    while len(times) < repeats and sum(times) < budget_seconds:
        _synchronize(call.device)
        started = time.perf_counter()
        _fresh_run(call, backend)
        _synchronize(call.device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _timed(call: ConvCall) -> list[float]:
    """Seconds per backend of ``CANDIDATES`` (inf for one not measured)."""
    allowed = candidates(call)
    return [time_backend(call, backend) if backend in allowed else math.inf for backend in CANDIDATES]


def _take_fastest(call: ConvCall, seconds: Sequence[float]) -> str:
    measured = tuple((b, s) for b, s in zip(CANDIDATES, seconds) if math.isfinite(s))
    best = min(measured, key=lambda pair: pair[1])[0]
    return backend_choice.take(call.key, Decision(best, "measured", measured))


def measure(call: ConvCall) -> None:
    """Decides ``call.key`` by timing both backends, on this process alone; while a pre-measurement is collecting,
    only notes the call (``backend_choice.defer``)."""
    if not backend_choice.defer(call):
        _take_fastest(call, _timed(call))


def measure_network(network: torch.nn.Module, input_shape: Sequence[int], device: torch.device,
                    autocast_dtype: torch.dtype | None = None, memory_format: torch.memory_format | None = None,
                    agree_across_ranks: bool = True) -> int:
    """Takes every ``measure`` decision of ``network``'s training step, validation and batch-1 prediction before the
    first step, so that none is taken later (inside a compiled graph, a validation forward or a collective).

    The network itself (weights, norm statistics, gradients, eval caches) is left untouched: an eager copy runs.

    Args:
        network: the module (unwrapped: no DDP, no torch.compile wrapper).
        input_shape: the training batch [N, C_in, *patch]; validation and prediction run [1, C_in, *patch].
        device: where the run computes.
        autocast_dtype: the dtype the trainer's step autocasts to (``torch.get_autocast_dtype``), None without
            autocast.
        memory_format: the inputs' memory format (None: contiguous).
        agree_across_ranks: under DDP, every rank takes the slowest rank's times (all ranks must call this).

    Returns:
        How many decisions were measured.
    """
    if backend_choice.policy(torch.device(device).type) != "measure":
        return 0
    eager = copy.deepcopy(getattr(network, "_orig_mod", network))
    autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    batch, *sample = input_shape

    def zeros(n: int) -> torch.Tensor:
        x = torch.zeros(n, *sample, device=device)
        return x if memory_format is None else x.contiguous(memory_format=memory_format)

    with backend_choice.collecting() as pending:
        with torch.inference_mode(False), torch.enable_grad(), autocast:
            outputs = eager.train()(zeros(batch))
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            sum(o.float().sum() for o in outputs).backward()
        with torch.no_grad(), autocast:
            eager.eval()(zeros(1))
        calls = list(pending.values())
    eager.train()  # drops what the eval forward cached for the copy
    del eager, outputs
    seconds = [_timed(call) for call in calls]
    if agree_across_ranks:
        seconds = _slowest_rank(calls, seconds, device)
    for call, times in zip(calls, seconds):
        _take_fastest(call, times)
    return len(calls)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _slowest_rank(calls: list[ConvCall], seconds: list[list[float]], device: torch.device) -> list[list[float]]:
    """Every rank's maximum per key and backend. The ranks first check that they measured the same keys: the
    collectives that follow must match one for one."""
    if not _distributed():
        return seconds
    where = device if torch.distributed.get_backend() == "nccl" else "cpu"
    fingerprint = zlib.crc32("\n".join(call.key.describe() for call in calls).encode())
    check = torch.tensor([len(calls), fingerprint, -len(calls), -fingerprint], dtype=torch.float64, device=where)
    torch.distributed.all_reduce(check, op=torch.distributed.ReduceOp.MAX)
    if check[0].item() != -check[2].item() or check[1].item() != -check[3].item():
        raise RuntimeError("The DDP ranks met different convolution shapes before training; they would decide their "
                           "backends apart. Run every rank with the same plans, patch size and batch size.")
    if not calls:
        return seconds
    times = torch.tensor(seconds, dtype=torch.float64, device=where)
    torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
    return times.tolist()
