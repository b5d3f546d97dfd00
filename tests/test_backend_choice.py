"""The large-kernel backend, measured on first use (the default on CUDA, tested here on the CPU with both backends):
one decision per device, dtype and per-sample shape, the same in training, validation and prediction, printed once,
switched off or forced by REP3D_CONV_BACKEND, taken before torch.compile traces, equal on every DDP rank."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rep3d_nnunet import backend_choice, ops
from rep3d_nnunet.blocks import ModulatedDepthwiseConv

SHAPE = (2, 3, 8, 9, 10)  # a 7^3 kernel here: both backends are candidates on the CPU
KERNEL = (3, 1, 7, 7, 7)


@pytest.fixture(autouse=True)
def _no_decisions(monkeypatch):
    backend_choice.forget_decisions()
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, "measure")
    yield
    backend_choice.forget_decisions()


def _timed_runs(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Replaces the measured run of a backend by a sleep of ``seconds[backend]``; returns the backends run."""
    runs = []

    def fake(x, weight, bias, operation):
        def run(backend):
            runs.append(backend)
            time.sleep(seconds[backend])
        return run

    monkeypatch.setattr(ops, "_measurement_run", fake)
    return runs


def _backends_used(monkeypatch) -> list[str]:
    used = []
    direct, fft = ops._direct_conv, ops.fft_conv
    monkeypatch.setattr(ops, "_direct_conv", lambda *a: used.append("direct") or direct(*a))
    monkeypatch.setattr(ops, "fft_conv", lambda *a: used.append("fft") or fft(*a))
    return used


@pytest.mark.parametrize("faster", ["direct", "fft"])
def test_the_faster_backend_is_measured_kept_and_used(monkeypatch, capsys, faster):
    slower = "fft" if faster == "direct" else "direct"
    runs = _timed_runs(monkeypatch, {faster: 0.001, slower: 0.02})
    used = _backends_used(monkeypatch)
    x = torch.randn(*SHAPE, requires_grad=True)
    weight = torch.randn(*KERNEL, requires_grad=True)
    ops.depthwise_conv(x, weight).sum().backward()
    assert set(runs) == {"direct", "fft"} and used == [faster]
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("rep3d_nnunet: 7x7x7 depthwise conv, 3 channels at 8x9x10")
    assert f"(cpu, float32): {faster} (measured forward+backward: direct " in printed[0]

    # the same shape again: training, eval without autograd, prediction under inference_mode, another batch size
    runs.clear()
    ops.depthwise_conv(x, weight).sum().backward()
    with torch.no_grad():
        ops.depthwise_conv(x, weight)
    with torch.inference_mode():
        ops.depthwise_conv(torch.randn(1, *SHAPE[1:]), weight.detach())
    assert runs == [] and used == [faster] * 4
    assert capsys.readouterr().out == ""  # printed once
    (key, decision), = backend_choice.decisions().items()
    assert decision.backend == faster and decision.source == "measured" and key.dtype == torch.float32


def test_a_shape_first_met_in_prediction_is_measured_as_training_would_use_it(monkeypatch):
    """Under inference_mode the measurement still times forward and backward: the decision is the training one."""
    runs = _timed_runs(monkeypatch, {"direct": 0.02, "fft": 0.001})
    used = _backends_used(monkeypatch)
    conv = ModulatedDepthwiseConv(3, 7, dim=3, modulation="lrbm").eval()
    with torch.inference_mode():
        predicted = conv(torch.randn(1, 3, 8, 9, 10))
    assert set(runs) == {"direct", "fft"} and "fft" in used
    conv.train()
    trained = conv(torch.randn(2, 3, 8, 9, 10))
    trained.sum().backward()
    assert used[-1] == "fft" and predicted.shape == (1, 3, 8, 9, 10)


@pytest.mark.parametrize("policy, expected", [("model", None), ("direct", "direct"), ("fft", "fft")])
def test_the_policy_variable_switches_measuring_off_or_forces_a_backend(monkeypatch, policy, expected):
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, policy)
    runs = _timed_runs(monkeypatch, {"direct": 0.0, "fft": 0.0})
    used = _backends_used(monkeypatch)
    ops.depthwise_conv(torch.randn(*SHAPE), torch.randn(*KERNEL))
    model = backend_choice.choose_backend(SHAPE, KERNEL[2:], "cpu")
    assert runs == [] and used == [expected or model]
    (decision,) = backend_choice.decisions().values()
    assert decision.source == ("model" if policy == "model" else "forced")


def test_an_unknown_policy_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, "fastest")
    with pytest.raises(ValueError, match="REP3D_CONV_BACKEND='fastest' is not one of measure, model, direct, fft"):
        ops.depthwise_conv(torch.randn(*SHAPE), torch.randn(*KERNEL))


def test_small_kernels_stay_direct_without_measuring(monkeypatch):
    runs = _timed_runs(monkeypatch, {"direct": 0.0, "fft": 0.0})
    used = _backends_used(monkeypatch)
    ops.depthwise_conv(torch.randn(*SHAPE), torch.randn(3, 1, 3, 3, 3))
    assert runs == [] and used == ["direct"]


def test_the_cpu_measures_no_backend_the_model_calls_hopeless(monkeypatch):
    """A direct 21^3 forward and backward takes tens of seconds on a CPU: it is not even tried."""
    runs = _timed_runs(monkeypatch, {"direct": 0.0, "fft": 0.0})
    _backends_used(monkeypatch)
    ops.depthwise_conv(torch.randn(1, 8, 32, 32, 32), torch.randn(8, 1, 21, 21, 21))
    assert set(runs) == {"fft"}


def _graph_ops(function, *args) -> list[str]:
    """The call targets of the FX graph torch.compile traces for ``function(*args)``."""
    targets = []

    def backend(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(function, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return targets


def test_compiled_graphs_use_the_decision_taken_before_compiling(monkeypatch):
    _timed_runs(monkeypatch, {"direct": 0.001, "fft": 0.02})
    x, weight = torch.randn(*SHAPE), torch.randn(*KERNEL)
    eager = ops.depthwise_conv(x, weight)  # measured: direct
    targets = _graph_ops(ops.depthwise_conv, x, weight)
    assert not any("fft_depthwise_conv" in t for t in targets) and any("conv3d" in t for t in targets)
    torch.testing.assert_close(torch.compile(ops.depthwise_conv, backend="eager")(x, weight), eager)


def test_a_shape_first_met_while_compiling_is_decided_by_the_model_and_eager_agrees(monkeypatch, capsys):
    runs = _timed_runs(monkeypatch, {"direct": 0.0, "fft": 0.0})
    x, weight = torch.randn(1, 4, 24, 24, 24), torch.randn(4, 1, 13, 13, 13)
    targets = _graph_ops(ops.depthwise_conv, x, weight)  # no measurement inside a trace
    (key, decision), = backend_choice.decisions().items()
    assert runs == [] and decision.source.startswith("model (first met while compiling")
    assert ("fft" if any("fft_depthwise_conv" in t for t in targets) else "direct") == decision.backend
    assert "first met while compiling, not measured" in capsys.readouterr().out
    used = _backends_used(monkeypatch)
    ops.depthwise_conv(x, weight)  # eager, same process: the same backend, still not measured
    assert runs == [] and used == [decision.backend]


def test_measuring_a_network_leaves_it_untouched(monkeypatch):
    """Our trainers measure every decision of a training step on a copy before the first (compiled) step."""
    from tests.helpers import PLANS, build_network, plan_configuration

    runs = _timed_runs(monkeypatch, {"direct": 0.001, "fft": 0.002})
    configuration = plan_configuration(*PLANS["3d"])
    network = build_network("nnUNetTrainerRep3D", configuration)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise AssertionError("the plan is expected to use instance norm")
    before = {k: v.clone() for k, v in network.state_dict().items()}
    backend_choice.measure_network(network, (2, 1, *configuration.patch_size), torch.device("cpu"))
    assert runs and backend_choice.decisions()
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert all(p.grad is None for p in network.parameters())
    runs.clear()
    network(torch.randn(2, 1, *configuration.patch_size)).__getitem__(0).sum().backward()
    assert runs == []  # everything the training step needs is decided


def _ddp_worker(rank: int, port: int, result_file: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       backend_choice.POLICY_VARIABLE: "measure"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 0 alone would pick direct (1 ms vs 20 ms), rank 1 fft (40 ms vs 5 ms); the slowest rank's times
        # (direct 40 ms, fft 20 ms) decide for both
        seconds = [{"direct": 0.001, "fft": 0.020}, {"direct": 0.040, "fft": 0.005}][rank]

        def fake(x, weight, bias, operation):
            return lambda backend: time.sleep(seconds[backend])

        ops._measurement_run = fake
        ops.depthwise_conv(torch.randn(*SHAPE), torch.randn(*KERNEL))
        (decision,) = backend_choice.decisions().values()
        torch.save(decision.backend, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_ddp_rank_takes_the_same_decision(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = str(tmp_path / "decision")
    mp.spawn(_ddp_worker, args=(port, result_file), nprocs=2, join=True)
    assert [torch.load(f"{result_file}.{rank}") for rank in range(2)] == ["fft", "fft"]


@pytest.mark.parametrize("policy", ["model", "measure"])
def test_training_and_prediction_compute_one_shape_with_one_backend(monkeypatch, policy):
    """The cost model used to weigh a forward alone in inference: a 7^3 kernel on [32, 32^3] took the FFT in training
    and torch's conv in prediction (under CUDA autocast: float32 maths against float16), so a trained model predicted
    with another function than it was trained with."""
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, policy)
    _timed_runs(monkeypatch, {"direct": 0.02, "fft": 0.001})
    used = _backends_used(monkeypatch)
    x, weight = torch.randn(1, 32, 32, 32, 32), torch.randn(32, 1, 7, 7, 7)
    ops.depthwise_conv(x.requires_grad_(), weight.requires_grad_()).sum().backward()
    with torch.inference_mode():
        ops.depthwise_conv(x.detach(), weight.detach())
    assert len(used) == 2 and used[0] == used[1] == "fft"
