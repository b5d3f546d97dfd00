"""Half precision as nnU-Net runs it, per network family: float16 autocast with a GradScaler against float32.

For each family (Rep3D LRBM, fixed prior, vanilla, CSLA, UX-Net + LRBM, nnU-Net's PlainConvUNet with dual-kernel
adapters) and each large-kernel backend: the relative L2 error of one training step's gradients (autocast forward,
nnU-Net's GradScaler at 2^16, skipped steps retried at the halved scale, as in training) and of predicted logits
(eval, inference_mode, autocast) against the same network in float32, on nnU-Net's default plan for a cubic patch.
``tests/test_mixed_precision.py`` asserts the same on the CPU at toy sizes; ``gpu_check.py --sections precision``
runs this on CUDA.

    python benchmarks/bench_precision.py --device cuda --patch 64
    python benchmarks/bench_precision.py --patch 32 --max-features 32 --kernel 7     # CPU, toy sizes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_network import NUM_CLASSES, default_plan  # noqa: E402

from rep3d_nnunet.adapters import AdapterSettings, insert_adapters  # noqa: E402
from rep3d_nnunet.architecture import Rep3DUNet  # noqa: E402
from rep3d_nnunet.blocks import ModulatedDepthwiseConv  # noqa: E402
from rep3d_nnunet.config import Rep3DSettings, rep3d_architecture  # noqa: E402

FAMILIES = {
    "LRBM": Rep3DSettings(),
    "fixed prior": Rep3DSettings(modulation="fixed"),
    "vanilla": Rep3DSettings(modulation="none"),
    "CSLA": Rep3DSettings(modulation="csla"),
    "UX-Net + LRBM": Rep3DSettings(block="uxnet", modulation="lrbm", kernel_size=7),
    "DKA": None,
}


def build_family(family: str, plan: dict, backend: str, seed: int = 0, kernel_size: int | None = None
                 ) -> torch.nn.Module:
    """The family's network on the plan, every parameter moved off its initialisation (as after training);
    ``kernel_size`` replaces the Rep3D families' 21 (a CPU cannot run torch's direct 21^3 convolution in float16)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    settings = FAMILIES[family]
    if settings is not None and kernel_size is not None and settings.block == "rep3d":
        settings = settings.replace(kernel_size=kernel_size)
    if settings is None:
        network = PlainConvUNet(1, num_classes=NUM_CLASSES, deep_supervision=True, **plan["arch"])
        network.apply(PlainConvUNet.initialize)
        network = insert_adapters(network, AdapterSettings(), plan["patch_size"])
    else:
        kwargs, _ = rep3d_architecture("PlainConvUNet", plan["arch"], plan["patch_size"], [1.0] * 3, settings)
        network = Rep3DUNet(1, num_classes=NUM_CLASSES, deep_supervision=True, **kwargs)
        network.apply(Rep3DUNet.initialize)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))
    for module in network.modules():
        if isinstance(module, ModulatedDepthwiseConv):
            module.backend = backend
    return network


def gradients(network: torch.nn.Module, x: torch.Tensor, targets: list[torch.Tensor], half: bool) -> torch.Tensor:
    """All gradients of the first training step nnU-Net's GradScaler does not skip (float32 without ``half``)."""
    device_type = x.device.type
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler(device_type, init_scale=2.0 ** 16, enabled=half)
    network.train()
    for _ in range(24):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.float16, enabled=half):
            outputs = network(x)
            loss = sum(F.cross_entropy(o.float(), t) for o, t in zip(outputs, targets))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if not half or scaler.get_scale() >= scale:
            return grads
    raise RuntimeError("the GradScaler skipped 24 steps in a row")


def logits(network: torch.nn.Module, x: torch.Tensor, half: bool) -> torch.Tensor:
    network.eval()
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.float16, enabled=half):
        output = network(x)
    return (output[0] if isinstance(output, (list, tuple)) else output).float()


def compare(device: torch.device, patch: int, batch: int = 2, max_features: int = 320, kernel_size: int | None = None
            ) -> list[dict]:
    """One row per family and backend: relative errors of float16 gradients and logits against float32."""
    plan = default_plan(patch, max_features)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *plan["patch_size"], generator=generator).to(device)
    strides = plan["arch"]["strides"]
    sizes, current = [], list(plan["patch_size"])
    for stride in strides:
        current = [c // s for c, s in zip(current, stride)]
        sizes.append(current)
    targets = [torch.randint(0, NUM_CLASSES, (batch, *sizes[i]), generator=generator)
               .to(device) for i in range(len(strides) - 1)]
    rows = []
    for family in FAMILIES:
        for backend in ("fft", "direct"):
            network = build_family(family, plan, backend, kernel_size=kernel_size).to(device)
            g16, g32 = gradients(network, x, targets, True), gradients(network, x, targets, False)
            l16, l32 = logits(network, x, True), logits(network, x, False)
            rows.append({"family": family, "backend": backend,
                         "gradients": ((g16 - g32).norm() / g32.norm()).item(),
                         "logits": ((l16 - l32).norm() / l32.norm()).item()})
            del network
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", type=int, default=32, help="cubic patch of nnU-Net's default plan (multiple of 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-features", type=int, default=320)
    parser.add_argument("--kernel", type=int, default=None, help="large kernel of the Rep3D families (default 21)")
    args = parser.parse_args(argv)
    print("| family | backend | float16 gradients vs float32 | float16 logits vs float32 |")
    print("| --- | --- | --- | --- |")
    for row in compare(torch.device(args.device), args.patch, args.batch, args.max_features, args.kernel):
        print(f"| {row['family']} | {row['backend']} | {100 * row['gradients']:.2f}% | {100 * row['logits']:.3f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
