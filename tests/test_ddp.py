"""nnU-Net's multi-GPU wrapping (``-num_gpus 2``) of a Rep3D network, reproduced on the CPU with the gloo backend.

nnUNetTrainer.initialize converts BatchNorm to SyncBatchNorm and wraps the network in DistributedDataParallel
(``find_unused_parameters`` off); every worker takes its share of the global batch. Two spawned processes here each
take half of a batch; their averaged gradients must equal one process's gradients over the whole batch, for two
steps in a row (DDP reports parameters that got no gradient at the start of the next step). In float64, so that
the only difference left is the order of the batch sums. SyncBatchNorm cannot
train on the CPU, so the distributed test uses nnU-Net's default instance norm and a separate test folds a network
whose BatchNorms were converted. Validation runs on each rank's own cases: nothing inside its forward may wait for
another rank (the large-kernel backends are agreed before training, ``backend_measurement``).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from rep3d_nnunet.export import folded_copy
from tests.helpers import PLANS, build_network, plan_configuration, random_input

TRAINERS = ("nnUNetTrainerRep3D", "nnUNetTrainerRep3DCSLA")
BATCH = 4
STEPS = 2


def _loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    """A mean over the samples of a fixed weighting of every output voxel (what DDP's gradient average expects)."""
    return sum((o * torch.linspace(-1, 1, o[0].numel()).view_as(o[0])).sum() for o in outputs) / outputs[0].shape[0]


def _steps(network: torch.nn.Module, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """Gradients of ``STEPS`` forward/backward passes (no optimizer step: the weights stay comparable)."""
    grads = []
    for _ in range(STEPS):
        network.zero_grad(set_to_none=True)
        _loss(network(x)).backward()
        grads.append([p.grad.detach().clone() for p in network.parameters()])
    return grads


def _worker(rank: int, world_size: int, port: int, trainer: str, result_file: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        configuration = plan_configuration(*PLANS["3d_anisotropic"])
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_network(trainer, configuration)).double()
        network.train()
        ddp = DistributedDataParallel(network)
        share = BATCH // world_size
        x = random_input(configuration, BATCH, torch.float64)[rank * share:(rank + 1) * share]
        grads = _steps(ddp, x)
        if rank == 0:
            torch.save(grads, result_file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_ddp_workers_give_the_single_process_gradients(trainer, tmp_path):
    result_file = str(tmp_path / "rank0_grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), trainer, result_file), nprocs=2, join=True)
    distributed = torch.load(result_file)

    configuration = plan_configuration(*PLANS["3d_anisotropic"])
    network = build_network(trainer, configuration).double().train()
    single = _steps(network, random_input(configuration, BATCH, torch.float64))
    names = [name for name, _ in network.named_parameters()]
    largest = max(g.norm().item() for g in single[0])
    for step in range(STEPS):
        for name, got, expected in zip(names, distributed[step], single[step]):
            error = (got - expected).norm().item() / max(expected.norm().item(), 1e-6 * largest)
            assert error < 1e-8, (step, name, error)


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce")


def _one_rank_validates(rank: int, port: int, result_file: str) -> None:
    """A training step on both ranks, then a validation on rank 0 alone (rank 1 has no validation case): whatever
    the forward meets for the first time there (eval-mode shapes, the LRBM mask's convolutions in the eval path, a
    new tile shape) must not wait for the other rank, so every collective is made to fail from that point."""
    from rep3d_nnunet.backend_choice import POLICY_VARIABLE

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), POLICY_VARIABLE: "measure"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        configuration = plan_configuration(*PLANS["3d_anisotropic"])
        network = build_network("nnUNetTrainerRep3D", configuration).train()
        _loss(network(random_input(configuration, 2))).backward()
        originals = {name: getattr(dist, name) for name in COLLECTIVES}

        def refuse(*args, **kwargs):
            raise AssertionError("a collective ran inside a forward")

        for name in COLLECTIVES:
            setattr(dist, name, refuse)
        try:
            if rank == 0:
                with torch.no_grad():
                    network.eval()(random_input(configuration, 1))
                with torch.inference_mode():  # a tile shape training never met
                    network(torch.randn(1, 1, 8, 32, 32))
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
        torch.save("validated", f"{result_file}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_no_collective_runs_inside_a_validation_forward(tmp_path):
    result_file = str(tmp_path / "validated")
    mp.spawn(_one_rank_validates, args=(_free_port(), result_file), nprocs=2, join=True)
    assert [torch.load(f"{result_file}.{rank}") for rank in range(2)] == ["validated"] * 2


def _randomise_batchnorm_statistics(network: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=generator))
            module.bias.data.copy_(torch.randn(module.bias.shape, generator=generator))


def test_a_network_with_syncbatchnorm_folds_with_equal_logits():
    configuration = plan_configuration(*PLANS["3d_anisotropic"])
    kwargs = configuration.network_arch_init_kwargs
    kwargs["norm_op"] = "torch.nn.BatchNorm3d"
    kwargs["norm_op_kwargs"] = {"eps": 1e-5, "affine": True}
    network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_network("nnUNetTrainerRep3D", configuration))
    _randomise_batchnorm_statistics(network)
    network.eval()
    sync_norms = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in network.modules())
    assert sync_norms > 0
    folded = folded_copy(network)
    # the BatchNorm after each large depthwise conv is fused into it; the others stay
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in folded.modules()) < sync_norms
    x = random_input(configuration, 2)
    with torch.no_grad():
        expected, got = network(x)[0], folded(x)[0]
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
