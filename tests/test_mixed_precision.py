"""nnU-Net's AMP path on every network family, on the CPU: float16 autocast with a GradScaler (what nnU-Net's CUDA
training runs) and bfloat16, training steps and predictions against float32.

nnUNetTrainer.train_step runs the forward under autocast, scales the loss, unscales the gradients before clipping
them and steps through the scaler; nnU-Net's predictor runs the forward under autocast. The FFT convolutions run in
float32 inside autocast (half-precision FFTs need power-of-two sizes, bfloat16 FFTs do not exist) and hand back the
autocast dtype, exactly as torch's own convolution does; the LRBM masks are computed in float32 (in every mode, cached
for prediction). So the FFT path must add nothing to the precision autocast costs anyway: its errors against float32
are compared with those of the same network on torch's convolution (``direct``).

Tolerances (relative L2 norm against float32, mean over three inputs; small random networks with every parameter moved
off its initialisation, both backends): float16 gradients of a whole step measured 3-12% per input (the network
amplifies rounding; which backend is closer varies with the input), bounded here by 15%; float16 logits of a
prediction ~0.3%, bounded by 1%; bfloat16 (8 significant bits) gradients ~16-20%, bounded by 35%. A single FFT
convolution in float16 autocast is closer to float32 than torch's (0.03% vs 0.04-0.2%: it computes in float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from rep3d_nnunet import nnunet_compat
from rep3d_nnunet.adapters import AdapterSettings, insert_adapters
from rep3d_nnunet.blocks import ModulatedDepthwiseConv
from tests.helpers import PLANS, build_network, plan_configuration

FAMILIES = {
    "LRBM": "nnUNetTrainerRep3D",
    "fixed prior": "nnUNetTrainerRep3DFixedPrior",
    "vanilla": "nnUNetTrainerRep3DVanilla",
    "CSLA": "nnUNetTrainerRep3DCSLA",
    "UX-Net + LRBM": "nnUNetTrainerUXNetLRBM",
    "DKA": None,  # nnU-Net's PlainConvUNet with dual-kernel adapters
}
TOLERANCES = {torch.float16: {"gradients": 0.15, "logits": 0.01}, torch.bfloat16: {"gradients": 0.35}}


def _network(family: str, backend: str, configuration) -> torch.nn.Module:
    if FAMILIES[family] is None:
        torch.manual_seed(0)
        network = nnunet_compat.build_network(nnUNetTrainer, PlansManager({"configurations": {}}), configuration, 1,
                                              3, True)
        network = insert_adapters(network, AdapterSettings(), configuration.patch_size)
    else:
        network = build_network(FAMILIES[family], configuration)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as after training: generator gains and adapter up-projections away from zero
        for p in network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    for module in network.modules():
        if isinstance(module, ModulatedDepthwiseConv):
            module.backend = backend
    return network


def _training_step(network: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, seed: int = 0
                   ) -> torch.Tensor:
    """nnUNetTrainer.train_step's gradient path (autocast forward, scaled backward, unscale_, the scaler's step and
    update) -> all gradients of the first step the scaler does not skip. nnU-Net's GradScaler starts at 2^16: where
    float16 gradients overflow there, the scaler skips the step and halves the scale, as in training."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=dtype is not None)
    network.train()
    for _ in range(24):
        optimizer.zero_grad(set_to_none=True)
        targets = torch.Generator().manual_seed(seed)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = network(x)
            loss = sum(F.cross_entropy(o.float(), torch.randint(0, o.shape[1], (o.shape[0], *o.shape[2:]),
                                                                 generator=targets)) for o in outputs)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in network.parameters() if p.requires_grad]
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if dtype is None or scaler.get_scale() >= scale:  # not skipped: every gradient finite
            break
    else:
        raise AssertionError("the GradScaler skipped 24 steps in a row")
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    return torch.cat([g.flatten() for g in grads])


def _prediction(network: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """nnU-Net's predictor: eval mode, inference_mode, autocast on the device (float16 on CUDA)."""
    network.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        output = network(x)
    output = output[0] if isinstance(output, (list, tuple)) else output
    return output.float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _errors(family: str, backend: str, dtype: torch.dtype, seeds=(0, 1, 2)) -> tuple[float, float]:
    """Mean relative error of a training step's gradients and of predicted logits against float32, over inputs."""
    configuration = plan_configuration(*PLANS["3d_anisotropic"])
    network = _network(family, backend, configuration)
    output_dtypes = []
    hooks = [m.register_forward_hook(lambda module, args, out: output_dtypes.append(out.dtype))
             for m in network.modules() if isinstance(m, ModulatedDepthwiseConv)]
    gradients, logits = [], []
    for seed in seeds:
        x = torch.randn(2, 1, *configuration.patch_size, generator=torch.Generator().manual_seed(10 + seed))
        gradients.append(_relative(_training_step(network, x, dtype, seed), _training_step(network, x, None, seed)))
        logits.append(_relative(_prediction(network, x, dtype), _prediction(network, x, None)))
    for hook in hooks:
        hook.remove()
    assert dtype in output_dtypes, "large-kernel convs hand back the autocast dtype"
    return sum(gradients) / len(gradients), sum(logits) / len(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_float16_autocast_with_a_grad_scaler_trains_and_predicts_like_float32(family):
    errors = {backend: _errors(family, backend, torch.float16) for backend in ("fft", "direct")}
    for gradients, logits in errors.values():
        assert gradients < TOLERANCES[torch.float16]["gradients"], (family, errors)
        assert logits < TOLERANCES[torch.float16]["logits"], (family, errors)
    # the FFT path adds nothing to what autocast costs torch's own convolution
    assert errors["fft"][0] < 1.3 * errors["direct"][0] + 0.01, (family, errors)
    assert errors["fft"][1] < 1.3 * errors["direct"][1] + 0.001, (family, errors)


@pytest.mark.parametrize("family", ["LRBM", "CSLA"])
def test_bfloat16_autocast_training_step_is_as_close_to_float32_as_torchs_conv(family):
    errors = {backend: _errors(family, backend, torch.bfloat16, seeds=(0,))[0] for backend in ("fft", "direct")}
    assert max(errors.values()) < TOLERANCES[torch.bfloat16]["gradients"], errors
    assert errors["fft"] < 1.3 * errors["direct"] + 0.02, errors


def test_one_fft_convolution_under_float16_autocast_is_at_least_as_precise_as_torchs():
    """The FFT island computes in float32: output and both gradients of one 7^3 conv stay closer to float32 than
    torch's float16 convolution (measured 0.02-0.03% vs 0.04-0.2%)."""
    from rep3d_nnunet.ops import depthwise_conv

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 10, 12, 12, generator=generator).half().float()  # what a float16 layer hands on
    w0, gy = 0.05 * torch.randn(4, 1, 7, 7, 7, generator=generator), torch.randn(2, 4, 10, 12, 12, generator=generator)

    def run(backend: str, amp: bool) -> list[torch.Tensor]:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            y = depthwise_conv(x, w, None, backend)
        (y.float() * gy).sum().backward()
        return [y.float().detach(), x.grad, w.grad]

    reference = run("direct", False)
    fft = [_relative(a, b) for a, b in zip(run("fft", True), reference)]
    direct = [_relative(a, b) for a, b in zip(run("direct", True), reference)]
    assert max(fft) < 1e-3 and all(f <= d for f, d in zip(fft, direct)), (fft, direct)
