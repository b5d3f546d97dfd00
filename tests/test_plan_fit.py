"""Plans that fit: a Rep3D trainer started on plans sized for another network says, before the first iteration, how
much more memory the Rep3D network needs than the plan's planner sized it for, and the fix; plans whose patch was
bounded by the images (not by memory) and plans our planner wrote stay silent."""

from __future__ import annotations

import copy

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from rep3d_nnunet.config import Rep3DSettings
from rep3d_nnunet.planning import PLANNER_BUDGETS, memory_check
from rep3d_nnunet.training import MEMORY_WARNING_RATIO
from rep3d_nnunet.variants import make_trainer_class


def _default_plans(patch: list[int], strides: list[list[int]], features: list[int], batch: int,
                   planner: str = "ExperimentPlanner") -> dict:
    """A 3d_fullres configuration as nnU-Net's default planner writes it (PlainConvUNet, 2 convs per stage)."""
    n = len(features)
    return {
        "dataset_name": "Dataset501_Fit", "plans_name": "nnUNetPlans", "experiment_planner_used": planner,
        "label_manager": "LabelManager", "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": batch, "patch_size": patch, "spacing": [1.0, 1.0, 1.0],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * n, "strides": strides, "n_conv_per_stage": [2] * n,
                    "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }},
    }


# nnU-Net's default 3d_fullres plan for a 128^3 patch (6 stages, features 32-320, batch 2): it fills the 8 GB target
DEFAULT_128 = _default_plans([128, 128, 128], [[1, 1, 1]] + [[2, 2, 2]] * 5, [32, 64, 128, 256, 320, 320], 2)
# MSD Hippocampus (benchmarks/plans): the patch is bounded by the images, far below the memory target
HIPPOCAMPUS = _default_plans([40, 56, 40], [[1, 1, 1]] + [[2, 2, 2]] * 3, [32, 64, 128, 256], 7)


def _check(plans: dict, settings: Rep3DSettings = Rep3DSettings()):
    manager = PlansManager(plans)
    return memory_check(manager, manager.get_configuration("3d_fullres"), settings, 1, 3)


def test_the_default_128_plan_is_too_small_for_rep3d_and_says_what_to_do():
    check = _check(DEFAULT_128)
    assert check.target_gb == 8 and check.ratio > MEMORY_WARNING_RATIO
    line = check.line("501")
    assert "ExperimentPlanner sized their patch and batch for ~8.0 GB" in line
    assert f"needs ~{check.rep3d_gb:.1f} GB" in line
    assert line.endswith("Fix: rep3d-nnunet plan -d 501 --gpu-memory-gb 8, then train with -p Rep3DPlans.")


def test_a_plan_bounded_by_its_images_leaves_room_and_stays_silent():
    check = _check(HIPPOCAMPUS)
    assert check.ratio < MEMORY_WARNING_RATIO


def test_a_planner_of_unknown_budget_is_measured_by_its_own_network():
    plans = copy.deepcopy(DEFAULT_128)
    plans["experiment_planner_used"] = "MyPlanner"
    check = _check(plans)
    assert check.planner == "MyPlanner" and 0 < check.target_gb < PLANNER_BUDGETS["ExperimentPlanner"][0] * 1.2
    assert check.ratio > MEMORY_WARNING_RATIO


def test_plans_written_by_the_rep3d_planner_are_not_checked():
    plans = copy.deepcopy(DEFAULT_128)
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "rep3d_nnunet.architecture.Rep3DUNet"
    assert _check(plans) is None


@pytest.mark.parametrize("plans, warns", [(DEFAULT_128, True), (HIPPOCAMPUS, False)])
def test_the_trainer_prints_one_line_before_training(tmp_path, monkeypatch, capsys, plans, warns):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    trainer_class = make_trainer_class("nnUNetTrainerRep3D")
    dataset = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
               "file_ending": ".nii.gz"}
    trainer = trainer_class({**copy.deepcopy(plans), "continue_training": False}, "3d_fullres", 0, dataset,
                            torch.device("cpu"))
    trainer.num_input_channels = 1  # what initialize() sets, without building the network
    capsys.readouterr()
    trainer.check_plan()
    lines = [line for line in capsys.readouterr().out.splitlines() if "Rep3D on these plans" in line]
    assert len(lines) == (1 if warns else 0)


def _resenc_plans() -> dict:
    """nnUNetResEncUNetMPlans-like 3d_fullres configuration: ResidualEncoderUNet with 1-4 residual blocks per stage."""
    plans = _default_plans([32, 32, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [8, 16, 32], 2,
                           planner="nnUNetPlannerResEncM")
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    architecture["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = architecture["arch_kwargs"]
    kwargs.pop("n_conv_per_stage")
    kwargs["n_blocks_per_stage"] = [1, 3, 4]
    kwargs["n_conv_per_stage_decoder"] = [1, 1]
    return plans


def test_on_resenc_plans_the_plan_stage_option_keeps_the_residual_encoder():
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD

    from rep3d_nnunet.blocks import Rep3DBlock
    from rep3d_nnunet.training import build_rep3d_network

    manager = PlansManager(_resenc_plans())
    configuration = manager.get_configuration("3d_fullres")
    settings = Rep3DSettings(stage_convs="plan", block_layer_scale=0.0)
    network = build_rep3d_network(manager, configuration, 1, 3, True, settings)
    residual = [sum(isinstance(m, BasicBlockD) for m in stage.modules()) for stage in network.encoder.stages]
    large = [sum(isinstance(m, Rep3DBlock) for m in stage.modules()) for stage in network.encoder.stages]
    assert residual == [1, 3, 4] and large == [2, 2, 2] and network.encoder.stem is not None
    outputs = network(torch.randn(2, 1, 32, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 32, 32), (2, 3, 16, 16, 16)]
    assert network.compute_conv_feature_map_size([32, 32, 32]) > 0

    from rep3d_nnunet.config import describe_translation

    arch = configuration.configuration["architecture"]
    kept = describe_translation(arch["network_class_name"], arch["arch_kwargs"], settings)
    assert kept.startswith("Rep3D on the plan's ResidualEncoderUNet: kept its stages") and \
        "stem and residual blocks per stage (1, 3, 4); added after each stage's: 2 residual Rep3D blocks" in kept
    replaced = describe_translation(arch["network_class_name"], arch["arch_kwargs"], Rep3DSettings(stage_convs="one"))
    assert "replaced its stem and residual blocks per stage (1, 3, 4) by one strided convolution per stage" in replaced
