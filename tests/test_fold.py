"""Folding: equal outputs before and after, parameter accounting, idempotence and folded state dicts.

The reference is always the training-time forward (the mask computed in the graph, float32), run in eval mode for the
norms' running statistics: the cached eval path and the folded kernel share one float64 mask, so comparing those two
would not show a train-vs-export mismatch. Inputs are large enough that every kernel tap touches them."""

import copy
import io

import pytest
import torch
from torch import nn

from rep3d_nnunet.blocks import ModulatedDepthwiseConv, Rep3DBlock, UXNetBlock
from rep3d_nnunet.export import count_parameters, fold, folded_copy

MODES = ["lrbm", "fixed", "none", "csla"]
NORMS = {
    2: {"instance": (nn.InstanceNorm2d, {"affine": True}), "batch": (nn.BatchNorm2d, {})},
    3: {"instance": (nn.InstanceNorm3d, {"affine": True}), "batch": (nn.BatchNorm3d, {})},
}
KERNELS = {2: [(7, 7), (3, 9)], 3: [(7, 7, 7), (1, 9, 9), (5, 9, 9)]}


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Moves every parameter and BatchNorm statistic away from its initial value, so folding is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
    return module


class TinyNet(nn.Module):
    def __init__(self, dim: int, kernel_size, modulation: str, norm: str, deploy: bool = False):
        super().__init__()
        norm_op, norm_kwargs = NORMS[dim][norm]
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.stem = conv(2, 6, 3, padding=1)
        self.rep3d = Rep3DBlock(6, kernel_size, dim, norm_op, norm_kwargs, modulation=modulation, deploy=deploy)
        self.uxnet = UXNetBlock(6, kernel_size, dim, norm_op, norm_kwargs, modulation=modulation, deploy=deploy)
        self.head = conv(6, 3, 1)

    def forward(self, x):
        return self.head(self.uxnet(self.rep3d(self.stem(x))))


def _input(dim: int) -> torch.Tensor:
    return torch.randn(2, 2, *([7, 8, 9][:dim] if dim == 3 else [10, 11]))


def _training_path(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits as a training step computes them (W * M built in the graph), norms in eval mode."""
    with torch.enable_grad():
        return net.eval()(x).detach()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _training_only_parameters(net: nn.Module) -> int:
    count = 0
    for m in net.modules():
        if isinstance(m, ModulatedDepthwiseConv):
            count += sum(p.numel() for p in m.modulation.parameters()) if m.modulation is not None else 0
            count += sum(p.numel() for p in m.small_branch_parameters())
    return count


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_fold_keeps_outputs_and_drops_exactly_the_training_only_parameters(dim, mode, norm):
    for kernel_size in KERNELS[dim]:
        net = _randomise(TinyNet(dim, kernel_size, mode, norm)).eval()
        x = _input(dim)
        before = _training_path(net, x)
        params_before = count_parameters(net)
        training_only = _training_only_parameters(net)
        fold(net)
        with torch.no_grad():
            after = net(x)
        assert _relative_error(after, before) < 1e-5, (kernel_size, mode, norm)

        expected_drop = training_only
        if norm == "batch":  # BN's gain and shift fold into a conv bias the block already had
            expected_drop += 2 * 2 * 6
        assert params_before - count_parameters(net) == expected_drop
        remaining = [name for name, _ in net.named_parameters()]
        assert not any(k in name for name in remaining for k in ("modulation", "generator", "beta", "small_"))
        if norm == "batch":
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_fold_is_idempotent_and_leaves_a_copy_source_untouched():
    net = _randomise(TinyNet(3, (5, 9, 9), "lrbm", "batch")).eval()
    original_state = copy.deepcopy(net.state_dict())
    folded = folded_copy(net)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, original_state[key])
    assert any("generator" in k for k in net.state_dict())

    state_once = copy.deepcopy(folded.state_dict())
    fold(folded)
    assert folded.state_dict().keys() == state_once.keys()
    for key, value in folded.state_dict().items():
        assert torch.equal(value, state_once[key])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_folded_state_dicts_load_into_the_deploy_form_only(mode, norm):
    """A trained state loads into a fresh network, a folded one into the deploy form; a folded state offered to the
    training form is refused naming the module and both structures (it used to fold the network silently, so a
    resume or fine-tune from an export trained another model than the one it asked for)."""
    trained = _randomise(TinyNet(3, (5, 9, 9), mode, norm)).eval()
    x = _input(3)
    expected = _training_path(trained, x)

    unfolded_state = copy.deepcopy(trained.state_dict())
    folded_state = fold(copy.deepcopy(trained)).state_dict()
    buffer = io.BytesIO()
    torch.save(unfolded_state, buffer)
    buffer.seek(0)
    fresh = TinyNet(3, (5, 9, 9), mode, norm)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # strict
    assert _relative_error(_training_path(fresh, x), expected) < 1e-5

    deployed = TinyNet(3, (5, 9, 9), mode, norm, deploy=True)
    deployed.load_state_dict(folded_state)  # strict
    with torch.no_grad():
        assert _relative_error(deployed.eval()(x), expected) < 1e-5

    same_structure = mode == "none" and norm == "instance"  # a vanilla kernel is its own folded form
    if same_structure:
        TinyNet(3, (5, 9, 9), mode, norm).load_state_dict(folded_state)
        return
    with pytest.raises(RuntimeError) as refused:
        TinyNet(3, (5, 9, 9), mode, norm).load_state_dict(folded_state)
    if mode != "none":
        assert "rep3d.conv: the weights hold a plain kernel" in str(refused.value)
        assert "this network has a" in str(refused.value) and "Load them into the network their own plans build" \
            in str(refused.value)


@pytest.mark.parametrize("mode", ["lrbm", "fixed"])
def test_a_vanilla_checkpoint_does_not_load_into_a_modulated_network(mode):
    """The silent failure of issue 25: strict loading of a vanilla state (no modulation keys) into an LRBM network
    reported every key matched and dropped the generator."""
    vanilla = TinyNet(3, (5, 9, 9), "none", "instance")
    with pytest.raises(RuntimeError, match=f"rep3d.conv: the weights hold a plain kernel .* \\({mode}"):
        TinyNet(3, (5, 9, 9), mode, "instance").load_state_dict(vanilla.state_dict())
    with pytest.raises(RuntimeError, match="uxnet.conv: the weights hold a plain kernel"):
        TinyNet(3, (5, 9, 9), mode, "instance").load_state_dict(vanilla.state_dict(), strict=False)


def test_csla_small_branch_has_its_own_parameters_and_merges_exactly():
    conv = ModulatedDepthwiseConv(4, (5, 9, 9), modulation="csla", small_kernel=3, csla_scales=(0.7, 1.3))
    _randomise(conv)
    assert [p.shape for p in conv.small_branch_parameters()] == [(4, 1, 3, 3, 3), (4,)]
    x = torch.randn(1, 4, 6, 9, 9)
    two_branches = 0.7 * nn.functional.conv3d(x, conv.weight, conv.bias, padding=(2, 4, 4), groups=4) + \
        1.3 * nn.functional.conv3d(x, conv.small_weight, conv.small_bias, padding=1, groups=4)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), two_branches, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("pointwise", [False, True])
def test_residual_blocks_fold_like_plain_ones(norm, pointwise):
    """Residual Rep3D blocks (a per-channel scale on the branch, optionally a 1x1 mixing after the nonlinearity) fold
    their conv (and a BatchNorm) the same way; the scale and the 1x1 conv stay."""
    norm_op, norm_kwargs = NORMS[3][norm]
    block = Rep3DBlock(6, (5, 9, 9), 3, norm_op, norm_kwargs, layer_scale_init=0.0, pointwise=pointwise)
    _randomise(block).eval()
    x = torch.randn(2, 6, 7, 8, 9)
    expected = _training_path(block, x)
    assert _relative_error(expected, x) > 1e-3  # the branch contributes once the scale has moved
    fold(block)
    with torch.no_grad():
        assert _relative_error(block(x), expected) < 1e-5
    deployed = Rep3DBlock(6, (5, 9, 9), 3, norm_op, norm_kwargs, layer_scale_init=0.0, pointwise=pointwise,
                          deploy=True)
    deployed.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert _relative_error(deployed.eval()(x), expected) < 1e-5


def _network(structure: str) -> nn.Module:
    """The default Rep3D network with kernels of ``structure``: a modulation mode, or ``folded`` (an export's)."""
    from rep3d_nnunet.config import Rep3DSettings
    from tests.helpers import build

    torch.manual_seed(0)
    if structure == "folded":
        return fold(build(Rep3DSettings(modulation="lrbm")))
    return build(Rep3DSettings(modulation=structure))


# (weights, receiving network): each pair's kernels mean something else (W * M, merged branches, another mask)
OTHER_KERNELS = [("lrbm", "none"), ("fixed", "none"), ("csla", "none"), ("lrbm", "folded"), ("csla", "folded"),
                 ("lrbm", "fixed")]


@pytest.mark.parametrize("source, target", OTHER_KERNELS)
def test_a_modulated_checkpoint_does_not_load_into_a_network_of_other_kernels(tmp_path, source, target):
    """Issue 30.5: nnU-Net's -pretrained_weights (load_pretrained_weights keeps the keys the receiving network has)
    and load_state_dict(strict=False) loaded an LRBM state into a vanilla or folded network as W alone: no error,
    outputs far from the trained model's. The refusal names the module and both structures."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    weights = _randomise(_network(source)).state_dict()
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": weights}, path)
    receiving = _network(target)
    words = {"lrbm": r"\(lrbm", "fixed": r"\(fixed", "csla": "a CSLA pair", "none": "a plain kernel \\(vanilla",
             "folded": "a plain kernel folded from a trained one"}
    refusal = rf"encoder\.stages\.\d+\.\d+\.conv: the weights hold .*{words[source]}.*, but this network has .*" \
              rf"{words[target]}"
    with pytest.raises(RuntimeError, match=refusal):
        load_pretrained_weights(receiving, str(path))
    with pytest.raises(RuntimeError, match=refusal):
        receiving.load_state_dict(weights, strict=False)
    # a state without the structure record (written before it existed) is judged by its keys
    unrecorded = {k: v for k, v in weights.items() if not k.endswith("_extra_state")}
    with pytest.raises(RuntimeError, match="the weights hold"):
        receiving.load_state_dict(unrecorded, strict=False)


@pytest.mark.parametrize("source, target", [("folded", "none"), ("none", "folded"), ("lrbm", "lrbm")])
def test_states_of_the_same_kernels_still_load(tmp_path, source, target):
    """A folded kernel is a plain kernel: it loads into a vanilla network and back; nnU-Net's pretrained-weights path
    and states written before the structure record (no ``_extra_state``) load as before."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    weights = _randomise(_network(source)).state_dict()
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": weights}, path)
    receiving = _network(target)
    load_pretrained_weights(receiving, str(path))
    key = next(k for k in weights if k.endswith("conv.weight"))
    assert torch.equal(receiving.state_dict()[key], weights[key])
    _network(target).load_state_dict({k: v for k, v in weights.items() if not k.endswith("_extra_state")})
