"""nnU-Net's GPU path, checked on the CPU: torch.compile sees each Rep3D network as one graph, compiled equals eager.

nnUNetTrainer compiles the network whenever it trains on CUDA. Every trainer family is built the way nnU-Net builds
it (the trainer class's ``build_network_architecture`` from a plan's configuration) on 2D, 3D and anisotropic 3D
plans, plus the paper's preset on a 3D patch it accepts:
- ``torch._dynamo.explain``: one graph, no graph break, in a training forward and in an eval (no_grad) forward;
- ``aot_eager`` (dynamo + AOTAutograd, the custom FFT operator's fake and autograd formula, no code generation):
  a compiled training step gives eager's logits and gradients; changing the batch size compiles at most one more
  graph per mode, and nnU-Net's epoch loop (train -> eval -> train) compiles nothing more;
- one real inductor compile (C++ code generation with gcc) of a training step, against eager, in float64 so that any
  difference is a bug rather than a reordered float32 sum.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from tests.helpers import FAMILIES, PLANS, assert_one_graph, build_network, plan_configuration, random_input

CASES = [(family, plan) for family in FAMILIES for plan in PLANS]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family, plan", CASES + [("paper", "3d")])
def test_training_and_eval_forwards_are_one_graph(family, plan):
    if family == "paper":
        # the smallest patch the paper's network trains on: stride 32 on every axis, and a bottleneck of more than
        # one voxel (instance norm needs two)
        trainer, configuration = "nnUNetTrainerRep3DPaper", plan_configuration(3, (64, 32, 32), (1.0,) * 3)
    else:
        trainer, configuration = FAMILIES[family], plan_configuration(*PLANS[plan])
    assert_one_graph(build_network(trainer, configuration), random_input(configuration, 2))


def _relative(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-30)).item()


def _training_step(network: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor):
    """(outputs, gradients by parameter name) of one deep-supervised forward and backward of ``module``."""
    network.train()
    network.zero_grad(set_to_none=True)
    outputs = module(x)
    # A fixed, non-uniform weighting of every output: gradients differ per voxel and per scale.
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs], {n: p.grad.clone() for n, p in network.named_parameters()}


def _assert_step_equal(compiled, eager, tolerance: float) -> None:
    (outputs_c, grads_c), (outputs_e, grads_e) = compiled, eager
    for got, expected in zip(outputs_c, outputs_e):
        assert _relative(got, expected) < tolerance
    assert grads_c.keys() == grads_e.keys()
    # Conv biases right before an instance norm have a gradient that is zero in exact arithmetic: measured against
    # the largest gradient, their rounding noise is not mistaken for a difference.
    floor = 1e-6 * max(g.norm().item() for g in grads_e.values())
    for name, expected in grads_e.items():
        assert _relative(grads_c[name], expected, floor) < tolerance, name


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_training_equals_eager_and_the_epoch_loop_does_not_recompile(family):
    configuration = plan_configuration(*PLANS["3d_anisotropic"], features=(4, 8))  # two stages: half the tracing
    network = build_network(FAMILIES[family], configuration)
    reference = copy.deepcopy(network)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(network, backend=counter)

    graphs = {}
    for batch in (2, 3, 4):  # the second size makes the batch axis dynamic; the third reuses that graph
        x = random_input(configuration, batch)
        _assert_step_equal(_training_step(network, compiled, x), _training_step(reference, reference, x), 1e-4)
    graphs["train"] = counter.frame_count
    network.eval(), reference.eval()
    with torch.no_grad():
        for batch in (2, 3, 4):
            x = random_input(configuration, batch)
            # eager eval uses its cached float64 mask, compiled eval recomputes it in the graph: the same values
            assert _relative(compiled(x)[0], reference(x)[0]) < 1e-5
    graphs["eval"] = counter.frame_count - graphs["train"]
    x = random_input(configuration, 2)
    _assert_step_equal(_training_step(network, compiled, x), _training_step(reference, reference, x), 1e-4)
    assert graphs["train"] <= 2 and graphs["eval"] <= 2, graphs
    assert counter.frame_count == graphs["train"] + graphs["eval"], "train -> eval -> train compiled again"


def test_inductor_compiled_training_step_equals_eager():
    """Real code generation (inductor's C++ backend): the FFT operator runs as an opaque call inside the graph."""
    configuration = plan_configuration(3, (8, 16, 16), (3.0, 0.8, 0.8), features=(4, 8))
    network = build_network("nnUNetTrainerRep3D", configuration).double()
    reference = copy.deepcopy(network)
    compiled = torch.compile(network)
    x = random_input(configuration, 2, torch.float64)
    # float64: eager and compiled then agree to ~1e-15 wherever the graph is right
    _assert_step_equal(_training_step(network, compiled, x), _training_step(reference, reference, x), 1e-8)
