"""Rep3DUNet from nnU-Net plans: topology, kernels per stage, deep supervision, variants and memory estimates."""

from __future__ import annotations

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from rep3d_nnunet.blocks import ModulatedDepthwiseConv, UXNetBlock
from rep3d_nnunet.config import REP3D_NETWORK_CLASS, Rep3DSettings, rep3d_architecture
from rep3d_nnunet.kernel_geometry import stage_kernel_sizes
from rep3d_nnunet.training import build_optimizer
from rep3d_nnunet.variants import METHODS, make_trainer_class
from tests.helpers import PLAIN, build, plain_plan_kwargs

def test_kernels_are_capped_by_the_feature_map_and_flat_where_the_plan_is_flat():
    kernels = stage_kernel_sizes([8, 64, 64], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], 21)
    assert kernels == [[1, 21, 21], [15, 21, 21], [7, 21, 21]]


def test_a_patch_the_network_cannot_divide_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="total stride"):
        rep3d_architecture(PLAIN, plain_plan_kwargs(), [8, 18, 18], [1.0] * 3, Rep3DSettings())


def test_an_architecture_without_unet_topology_is_rejected():
    with pytest.raises(ValueError, match="Cannot derive a Rep3D network"):
        rep3d_architecture("some.other.Net", plain_plan_kwargs(), [8, 16, 16], [1.0] * 3, Rep3DSettings())


@pytest.mark.parametrize("dim, patch", [(3, (8, 16, 16)), (2, (16, 24))])
def test_deep_supervision_outputs_match_nnunet_scales(dim, patch):
    network = build(Rep3DSettings(), dim, patch)
    outputs = network(torch.randn(2, 1, *patch))
    assert len(outputs) == 2  # one per resolution but the lowest
    assert outputs[0].shape == (2, 3, *patch)
    network.decoder.deep_supervision = False
    assert network(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.rep3d is not None and m.rep3d.topology == "plan"])
def test_every_method_builds_the_intended_network(name):
    # (the paper-topology methods need 32-divisible patches: tests/test_paper_preset.py)
    settings = METHODS[name].rep3d
    network = build(settings)
    convs = [m for m in network.modules() if isinstance(m, ModulatedDepthwiseConv)]
    assert len(convs) == (3 - settings.first_block_stage) * settings.blocks_per_stage
    assert {c.modulation_mode for c in convs} == {settings.modulation}
    # the first block's stage: 8 x 16 x 16 at stage 0 (kernels flat along the plan's flat first axis), 8^3 at stage 1
    first_map = [(1, 31, 31), (15, 15, 15)][settings.first_block_stage]
    assert convs[0].kernel_size == tuple(min(settings.kernel_size, m) for m in first_map)
    assert any(isinstance(m, UXNetBlock) for m in network.modules()) == (settings.block == "uxnet")
    outputs = network(torch.randn(1, 1, 8, 16, 16))
    sum(o.mean() for o in outputs).backward()
    assert all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)


def test_csla_trainer_gives_the_small_branch_its_own_learning_rate():
    trainer = make_trainer_class("nnUNetTrainerRep3DCSLA")
    optimizer, scheduler = build_optimizer(build(trainer.rep3d), trainer.optim, num_epochs=10)
    rates = sorted({group["lr"] for group in optimizer.param_groups})
    assert rates == pytest.approx([2e-4, 3e-4])
    scheduler.step(5)
    decayed = sorted({group["lr"] for group in optimizer.param_groups})
    assert decayed[1] / decayed[0] == pytest.approx(1.5)


def test_schedule_variants_follow_nnunet_naming():
    trainer = make_trainer_class("nnUNetTrainerUXNetLRBM_250epochs")
    assert trainer.num_epochs_override == 250 and trainer.rep3d.block == "uxnet"
    assert trainer.rep3d.modulation == "lrbm" and trainer.rep3d.kernel_size == 7


def test_unknown_trainer_variant_lists_what_exists():
    with pytest.raises(ValueError, match="nnUNetTrainerRep3DFixedPrior.*_250epochs"):
        make_trainer_class("nnUNetTrainerRep3D_251epochs")


def test_memory_estimate_counts_the_large_kernel_blocks_and_fft_workspace():
    direct = build(Rep3DSettings(conv_backend="direct", blocks_per_stage=2), deep_supervision=False)
    fft = build(Rep3DSettings(conv_backend="fft", blocks_per_stage=2), deep_supervision=False)
    fewer_blocks = build(Rep3DSettings(conv_backend="direct", blocks_per_stage=1), deep_supervision=False)
    size = (8, 16, 16)
    # feature maps (nnU-Net's measure) do not depend on the backend; the FFT workspace is counted apart
    assert fft.compute_conv_feature_map_size(size) == direct.compute_conv_feature_map_size(size)
    assert direct.compute_conv_feature_map_size(size) > fewer_blocks.compute_conv_feature_map_size(size)
    per_sample, spectra = fft.fft_workspace(size)
    assert per_sample > 0 and spectra > 0 and direct.fft_workspace(size) == (0, 0)


def test_spacing_aware_prior_uses_each_stage_spacing():
    kwargs, _ = rep3d_architecture(PLAIN, plain_plan_kwargs(), [8, 16, 16], [3.0, 0.8, 0.8],
                                   Rep3DSettings(spacing_aware_prior=True, first_block_stage=0))
    assert kwargs["stage_spacings"] == [[3.0, 0.8, 0.8], [3.0, 1.6, 1.6], [6.0, 3.2, 3.2]]
    network = get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, ["conv_op", "norm_op", "nonlin"], 1, 2)
    first = next(m for m in network.modules() if isinstance(m, ModulatedDepthwiseConv))
    prior = first.modulation.prior()
    assert prior[0, 10, 11].item() == pytest.approx(0.5)  # one finest-axis step: index units kept


def test_first_block_stage_leaves_the_first_stages_to_the_plans_convolutions():
    # the cheaper designs of docs/hippocampus.md: no large-kernel blocks where most voxels are
    full = build(Rep3DSettings(conv_backend="direct", blocks_per_stage=2, first_block_stage=0))
    later = build(Rep3DSettings(conv_backend="direct", blocks_per_stage=2, first_block_stage=1))
    def blocks_per_stage(network):
        return [sum(isinstance(m, ModulatedDepthwiseConv) for m in stage.modules()) for stage in network.encoder.stages]

    assert blocks_per_stage(later) == [0, 2, 2] and blocks_per_stage(full) == [2, 2, 2]
    # the plan's own convolutions stay: the same stage 0 as the full network's, less its blocks
    assert len(later.encoder.stages[0]) == 1 and len(full.encoder.stages[0]) == 3
    outputs = later(torch.randn(1, 1, 8, 16, 16))
    sum(o.mean() for o in outputs).backward()
    assert all(torch.isfinite(p.grad).all() for p in later.parameters() if p.grad is not None)


def test_a_first_block_stage_past_the_plans_stages_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="first_block_stage 3 leaves no stage of this plan's 3 with Rep3D blocks; "
                                         "use a first_block_stage below 3"):
        rep3d_architecture(PLAIN, plain_plan_kwargs(), [8, 16, 16], [1.0] * 3, Rep3DSettings(first_block_stage=3))
    with pytest.raises(ValueError, match="first_block_stage must be at least 0"):
        Rep3DSettings(first_block_stage=-1)
