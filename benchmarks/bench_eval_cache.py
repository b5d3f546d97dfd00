"""Eval forwards of the Rep3D network with and without the eval cache, on nnU-Net's default 3d_fullres plan.

nnU-Net's predictor runs the network under ``torch.inference_mode()`` on every tile and mirror flip of a case, and
loads every fold's weights (``load_state_dict``) before every case. Three ways of running one eval forward:

    no cache       REP3D_EVAL_CACHE_MB=0: every forward computes its masks and transforms its kernels
    cache          the weights unchanged since the last forward (every tile and flip after a case's first)
    cache, reload  the same weights loaded again just before (a case's first forward per fold)

One process, one torch thread, the three interleaved in every round, medians of the rounds; CPU time of the process
(``time.process_time``: other processes on a shared machine do not inflate it) and wall time. Host read-backs per
forward (``Tensor.__bool__``/``item``/``torch.equal``...: a device synchronisation each on a GPU) are counted too.
Run it from a checkout to time that checkout's code (it imports the ``rep3d_nnunet`` beside it):

    python benchmarks/bench_eval_cache.py                 # 128^3, nnU-Net's default plan for it
    python benchmarks/bench_eval_cache.py --patch 64 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_predict import _moved, plans_for_patch  # noqa: E402

VARIANTS = ("no cache", "cache", "cache, reload")
HOST_READS = {torch.Tensor: ("__bool__", "item", "tolist", "__int__", "__float__"), torch: ("equal", "is_nonzero")}


class HostReadCounter:
    """Counts calls that read a tensor's value back to the host while active."""

    def __enter__(self):
        self.count, self._originals = 0, []
        for owner, names in HOST_READS.items():
            for name in names:
                original = getattr(owner, name)
                self._originals.append((owner, name, original))
                setattr(owner, name, self._counting(original))
        return self

    def _counting(self, original):
        def counting(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        return counting

    def __exit__(self, *exc):
        for owner, name, original in self._originals:
            setattr(owner, name, original)


def build_network(patch: int) -> tuple[torch.nn.Module, dict]:
    """The network ``nnUNetTrainerRep3D`` builds for nnU-Net's default plan of an isotropic ``patch``, in eval mode,
    with moved ("trained") weights, and those weights as a state dict."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from rep3d_nnunet.nnunet_compat import find_trainer_class

    plans_manager = PlansManager(plans_for_patch(patch))
    configuration = plans_manager.get_configuration("3d_fullres")
    torch.manual_seed(0)
    network = find_trainer_class("nnUNetTrainerRep3D").build_network_architecture(
        plans_manager, configuration, 1, 3, False)
    state = _moved(network.state_dict(), 1)
    network.load_state_dict(state)
    return network.eval(), state


def measure(patch: int, rounds: int) -> dict:
    """{variant: ([CPU seconds], [wall seconds], [host reads])} over ``rounds`` interleaved rounds (after a warm-up)."""
    from rep3d_nnunet import eval_cache

    cached, state = build_network(patch)
    uncached = copy.deepcopy(cached)  # its own entries: none are kept under a budget of 0, the other's stay
    same_weights = copy.deepcopy(state)
    x = torch.randn(1, 1, patch, patch, patch, generator=torch.Generator().manual_seed(0))
    results = {variant: ([], [], []) for variant in VARIANTS}

    def run(variant: str, record: bool) -> None:
        network = uncached if variant == "no cache" else cached
        if variant == "no cache":
            os.environ[eval_cache.BUDGET_VARIABLE] = "0"
        else:
            os.environ.pop(eval_cache.BUDGET_VARIABLE, None)
            if variant == "cache, reload":
                network.load_state_dict(same_weights)
        with torch.inference_mode(), HostReadCounter() as reads:
            cpu, wall = time.process_time(), time.perf_counter()
            network(x)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if record:
            for values, value in zip(results[variant], (cpu, wall, reads.count)):
                values.append(value)
        print(f"  {variant:14s} {cpu:7.2f} s CPU {wall:7.2f} s wall {reads.count:3d} host reads"
              f"{'' if record else ' (warm-up)'}", flush=True)

    run("cache", record=False)  # warm-up: backend decisions, allocator, the cache filled
    for _ in range(rounds):
        for variant in VARIANTS:
            run(variant, record=True)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=128, help="isotropic patch of nnU-Net's default plan")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import rep3d_nnunet

    print(f"rep3d_nnunet from {Path(rep3d_nnunet.__file__).parent}; torch {torch.__version__}, 1 thread; "
          f"eval forward of the Rep3D network, nnU-Net's default 3d_fullres plan, {args.patch}^3, batch 1")
    results = measure(args.patch, args.rounds)
    baseline = statistics.median(results["no cache"][0])
    print(f"{'variant':14s} {'CPU s (median)':>15s} {'wall s':>8s} {'host reads':>11s} {'CPU vs no cache':>16s}")
    for variant, (cpu, wall, reads) in results.items():
        print(f"{variant:14s} {statistics.median(cpu):15.2f} {statistics.median(wall):8.2f} "
              f"{statistics.median(reads):11.0f} {statistics.median(cpu) / baseline:16.3f}")


if __name__ == "__main__":
    main()
