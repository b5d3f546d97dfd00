"""nnU-Net's AMP training step on a Rep3D network, on the CPU with bfloat16 autocast and a GradScaler.

nnUNetTrainer.train_step runs the forward under autocast, scales the loss, unscales the gradients before clipping
them and steps through the scaler. The FFT convolutions run in float32 inside autocast and hand back the autocast
dtype, exactly as torch's own convolution does, so the next layer sees what it would see with the direct backend.

What "equal within AMP tolerance" means here: bfloat16 keeps 8 significant bits, and on these small random networks
the whole gradient of a bfloat16 step differs from float32 by ~20% (measured, both backends). The FFT path must add
nothing to that: its gradients are as close to float32 as those of the same network on torch's convolution.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rep3d_nnunet.blocks import ModulatedDepthwiseConv
from tests.test_compile import PLANS, _configuration, _input, build_network

AMP_DTYPE = torch.bfloat16


def _training_step(network: torch.nn.Module, x: torch.Tensor, amp: bool) -> torch.Tensor:
    """nnUNetTrainer.train_step's gradient path (autocast forward, scaled backward, unscale_) -> all gradients."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=amp)
    network.train()
    optimizer.zero_grad(set_to_none=True)
    targets = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=AMP_DTYPE, enabled=amp):
        outputs = network(x)
        loss = sum(F.cross_entropy(o.float(), torch.randint(0, o.shape[1], (o.shape[0], *o.shape[2:]),
                                                             generator=targets)) for o in outputs)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    return torch.cat([g.flatten() for g in grads])


def _with_backend(network: torch.nn.Module, backend: str) -> torch.nn.Module:
    for module in network.modules():
        if isinstance(module, ModulatedDepthwiseConv):
            module.backend = backend
    return network


@pytest.mark.parametrize("trainer", ["nnUNetTrainerRep3D", "nnUNetTrainerRep3DCSLA"])
def test_autocast_training_step_is_as_close_to_float32_as_torchs_conv(trainer):
    configuration = _configuration(*PLANS["3d_anisotropic"])
    x = _input(configuration, 2)
    network = _with_backend(build_network(trainer, configuration), "fft")
    output_dtypes = []
    hooks = [m.register_forward_hook(lambda module, args, out: output_dtypes.append(out.dtype))
             for m in network.modules() if isinstance(m, ModulatedDepthwiseConv)]
    amp = _training_step(network, x, amp=True)
    for hook in hooks:
        hook.remove()
    assert set(output_dtypes) == {AMP_DTYPE}, "the FFT convs hand back the autocast dtype"
    assert torch.isfinite(amp).all()

    reference = _training_step(network, x, amp=False)
    direct = _with_backend(build_network(trainer, configuration), "direct")
    direct_amp, direct_reference = _training_step(direct, x, amp=True), _training_step(direct, x, amp=False)
    assert (reference - direct_reference).norm() / direct_reference.norm() < 1e-4  # same network, same float32 step

    fft_error = ((amp - reference).norm() / reference.norm()).item()
    direct_error = ((direct_amp - direct_reference).norm() / direct_reference.norm()).item()
    assert fft_error < 0.35 and direct_error < 0.35, (fft_error, direct_error)
    assert fft_error < 1.25 * direct_error + 0.02, (fft_error, direct_error)
