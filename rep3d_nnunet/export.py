"""Deploy folding: turn a trained Rep3D network into plain convolutions (generator, prior and CSLA branch gone)."""

from __future__ import annotations

import copy

from torch import nn


def fold(network: nn.Module) -> nn.Module:
    """Folds every module that has a training-only form, in place, and returns the network in eval mode.

    W_deploy = W * M for modulated kernels, CSLA branches merged, a BatchNorm right after a depthwise conv fused
    (exact with its running statistics, hence eval mode). Idempotent: folding a folded network changes nothing.
    """
    network.eval()
    # Materialise the list first: reparameterize() replaces submodules while we walk.
    for module in list(network.modules()):
        reparameterize = getattr(module, "reparameterize", None)
        if module is not network and callable(reparameterize):
            reparameterize()
    if callable(getattr(network, "reparameterize", None)):
        network.reparameterize()
    return network


def folded_copy(network: nn.Module) -> nn.Module:
    """A folded deep copy; the original network is left untouched (timm's ``reparameterize_model(inplace=False)``)."""
    return fold(copy.deepcopy(network))


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())
