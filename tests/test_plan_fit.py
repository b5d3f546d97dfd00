"""Plans that fit: a Rep3D trainer started on plans sized for another network says, before the first iteration, how
much more memory the Rep3D network needs than the plan was sized for (both on the planner's scale, by part), and the
fix, which keeps the plan's memory target and network family; plans whose patch was bounded by the images (not by
memory) and plans our planner wrote stay silent. Plans of a residual encoder keep it: read back from a Rep3D plan
or an export's, and planned by ``rep3d-nnunet plan --planner ResEncM``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM,
)
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from rep3d_nnunet.config import REP3D_NETWORK_CLASS, Rep3DSettings, describe_translation, rep3d_architecture
from rep3d_nnunet import planning
from rep3d_nnunet.planning import memory_check
from rep3d_nnunet.training import MEMORY_WARNING_RATIO, build_rep3d_network, rep3d_deploy_architecture
from rep3d_nnunet.variants import make_trainer_class
from tests.helpers import nnunet_environment, use_nnunet_tree


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
HIPPOCAMPUS["configurations"]["3d_fullres"]["median_image_size_in_voxels"] = [36.0, 50.0, 35.0]


def _check(plans: dict, settings: Rep3DSettings = Rep3DSettings()):
    manager = PlansManager(plans)
    return memory_check(manager, manager.get_configuration("3d_fullres"), settings, 1, 3)


def test_the_default_128_plan_is_too_small_for_rep3d_and_says_what_to_do():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    check = _check(DEFAULT_128)
    # what the plan was sized for: nnU-Net's estimate of its own network at 128^3 (~453 M voxels) x batch 2 on the
    # default planner's scale (2 x 560 M voxels for 8 GB), ~6.5 GB; the Rep3D network on the same scale, by part
    architecture = DEFAULT_128["configurations"]["3d_fullres"]["architecture"]
    own = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], 1, 3, allow_init=False)
    assert check.target_gb == pytest.approx(own.compute_conv_feature_map_size([128] * 3) * 2 / (560e6 * 2) * 8)
    assert check.ratio > MEMORY_WARNING_RATIO
    line = check.line("501")
    assert ("ExperimentPlanner sized their patch [128, 128, 128] and batch 2 for ~6.5 GB (what their PlainConvUNet "
            "needs there)") in line
    assert f"needs ~{check.rep3d_gb:.1f} GB ({check.ratio:.2f}x: feature maps " in line
    assert "FFT workspace" in line and "(per sample x 2) + kernel spectra" in line and "(once)" in line
    assert line.endswith("Fix: rep3d-nnunet plan -d 501 --gpu-memory-gb 7, then train with -p Rep3DPlans.")


def test_the_batch_multiplies_the_fft_workspace_but_not_the_kernel_spectra():
    settings = Rep3DSettings(conv_backend="fft")
    plans = copy.deepcopy(DEFAULT_128)
    two = _check(plans, settings)
    plans["configurations"]["3d_fullres"]["batch_size"] = 4
    four = _check(plans, settings)
    assert four.rep3d_gb < 2 * two.rep3d_gb
    assert two.rep3d.kernel_spectra_gb > 0 and four.rep3d.kernel_spectra_gb == two.rep3d.kernel_spectra_gb
    assert four.rep3d.fft_workspace_gb == pytest.approx(2 * two.rep3d.fft_workspace_gb)
    assert four.rep3d.feature_maps_gb == pytest.approx(2 * two.rep3d.feature_maps_gb)
    # the plan's own network (no FFT) doubles with the batch, on the same scale
    assert four.plan_network.total_gb == pytest.approx(2 * two.plan_network.total_gb)


def test_a_plan_bounded_by_its_images_leaves_room_and_stays_silent():
    check = _check(HIPPOCAMPUS)
    assert check.ratio < MEMORY_WARNING_RATIO


def test_a_planner_of_unknown_budget_is_measured_by_its_own_network():
    plans = copy.deepcopy(DEFAULT_128)
    plans["experiment_planner_used"] = "MyPlanner"
    check = _check(plans)
    assert check.planner == "MyPlanner" and 0 < check.target_gb < planning.PLANNER_SCALES["ExperimentPlanner"][0] * 1.2
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


def _resenc_plans(patch=(32, 32, 32), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), features=(8, 16, 32)) -> dict:
    """nnUNetResEncUNetMPlans-like 3d_fullres configuration: ResidualEncoderUNet with ResEnc M's 1, 3, 4, 6, ...
    residual blocks per stage and one convolution per decoder stage."""
    n = len(features)
    plans = _default_plans(list(patch), [list(s) for s in strides], list(features), 2, planner="nnUNetPlannerResEncM")
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    architecture["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = architecture["arch_kwargs"]
    kwargs.pop("n_conv_per_stage")
    kwargs["n_blocks_per_stage"] = [1, 3, 4, 6, 6, 6][:n]
    kwargs["n_conv_per_stage_decoder"] = [1] * (n - 1)
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
    assert residual == [1, 3, 4] and large == [0, 1, 1] and network.encoder.stem is not None
    outputs = network(torch.randn(2, 1, 32, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 32, 32), (2, 3, 16, 16, 16)]
    assert network.compute_conv_feature_map_size([32, 32, 32]) > 0

    from rep3d_nnunet.config import describe_translation

    arch = configuration.configuration["architecture"]
    kept = describe_translation(arch["network_class_name"], arch["arch_kwargs"], settings)
    assert kept.startswith("Rep3D on the plan's ResidualEncoderUNet: kept its stages") and \
        "stem and residual blocks per stage (1, 3, 4); added after each stage's from stage 1 on (none at stage 0): " \
        "1 residual Rep3D block per stage" in kept
    replaced = describe_translation(arch["network_class_name"], arch["arch_kwargs"], Rep3DSettings(stage_convs="one"))
    assert "replaced its stem and residual blocks per stage (1, 3, 4) by one strided convolution per stage" in replaced


# ---- plans made by nnU-Net's own planners (a fingerprint of a dataset that is not there, one image for the reader) --


def _write_fingerprint(root: Path, dataset_id: int, median_shape: list[int], spacing: list[float],
                       cases: int = 100) -> str:
    """A dataset as nnU-Net's planners see it: dataset.json, one case (the image reader is chosen from it) and a
    fingerprint of ``cases`` images of ``median_shape`` voxels at ``spacing`` (z, y, x)."""
    name = f"Dataset{dataset_id:03d}_Fit"
    raw = root / "nnUNet_raw" / name
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    for array, path in ((np.zeros((4, 4, 4), np.float32), raw / "imagesTr" / "case_000_0000.nii.gz"),
                        (np.zeros((4, 4, 4), np.uint8), raw / "labelsTr" / "case_000.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": cases,
        "file_ending": ".nii.gz"}))
    preprocessed = root / "nnUNet_preprocessed" / name
    preprocessed.mkdir(parents=True)
    intensities = {"mean": 0.0, "std": 1.0, "min": 0.0, "max": 1.0, "median": 0.0, "percentile_00_5": 0.0,
                   "percentile_99_5": 1.0}
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [spacing] * cases, "shapes_after_crop": [median_shape] * cases,
        "median_relative_size_after_cropping": 1.0, "foreground_intensity_properties_per_channel": {"0": intensities}}))
    return name


def _nnunet_plans(planner, configuration: dict, dataset_name: str) -> dict:
    """Plans around one 3d_fullres configuration of ``planner`` (what its plan_experiment writes, other
    configurations left out: planning them takes seconds each)."""
    return {"dataset_name": dataset_name, "plans_name": planner.plans_identifier,
            "experiment_planner_used": type(planner).__name__, "label_manager": "LabelManager",
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": json.loads(json.dumps(configuration, default=int))}}


@pytest.fixture(scope="module")
def nnunet_planned(tmp_path_factory):
    """nnU-Net's default planner at -gpu_memory_target 24 on images of 128 x 256 x 256 voxels (memory bounds the
    patch), and nnU-Net's ResEnc M planner on images of 64 x 96 x 96 (the patch covers them)."""
    root = tmp_path_factory.mktemp("planned")
    env = nnunet_environment(root)
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_nnunet_tree(monkeypatch, env)
        large = _write_fingerprint(root, 501, [128, 256, 256], [1.0, 0.8, 0.8])
        small = _write_fingerprint(root, 502, [64, 96, 96], [1.0, 0.8, 0.8])
        planned = {}
        for key, planner, median in (("24gb", ExperimentPlanner(501, 24), [128, 256, 256]),
                                     ("resenc_m", nnUNetPlannerResEncM(502), [64, 96, 96])):
            configuration = planner.get_plans_for_configuration([1.0, 0.8, 0.8], median, "nnUNetPlans_3d_fullres",
                                                                100 * float(np.prod(median)), {})
            configuration["batch_dice"] = False
            planned[key] = _nnunet_plans(planner, configuration, large if key == "24gb" else small)
    return root, env, planned


def test_a_plan_sized_for_24_gb_is_judged_and_replanned_at_what_it_was_sized_for(nnunet_planned):
    """nnUNetv2_plan_experiment -gpu_memory_target 24: a patch for 24 GB; the check measures it by the plan's own
    network, not by the planner's default 8 GB, and the fix keeps that target."""
    _, _, planned = nnunet_planned
    configuration = planned["24gb"]["configurations"]["3d_fullres"]
    assert configuration["patch_size"] == [128, 256, 224] and configuration["batch_size"] == 2  # shrunk: memory
    check = _check(planned["24gb"])
    assert 16 < check.target_gb <= 24 and check.target_gb == pytest.approx(check.plan_network.total_gb)
    assert check.ratio == pytest.approx(check.rep3d_gb / check.plan_network.total_gb)
    line = check.line("501")
    assert "--gpu-memory-gb 8" not in line
    assert line.endswith(f"Fix: rep3d-nnunet plan -d 501 --gpu-memory-gb {math.ceil(check.target_gb)}, then train "
                         f"with -p Rep3DPlans.")


def test_on_resenc_plans_the_fix_names_the_resenc_planner():
    """A memory-bound ResEnc M plan (nnUNetResEncUNetMPlans at 128^3): re-planning keeps the residual encoder."""
    plans = _resenc_plans([128, 128, 128], [[1, 1, 1]] + [[2, 2, 2]] * 5, [32, 64, 128, 256, 320, 320])
    check = _check(plans)
    assert check.line("501").endswith(f"Fix: rep3d-nnunet plan -d 501 --planner ResEncM --gpu-memory-gb "
                                      f"{math.ceil(check.target_gb)}, then train with -p Rep3DResEncMPlans.")
    assert check.ratio > MEMORY_WARNING_RATIO and "sized their patch [128, 128, 128] and batch 2 for" in \
        check.line("501") and "(what their ResidualEncoderUNet needs there)" in check.line("501")


def _residual_blocks(network) -> list[int]:
    return [sum(isinstance(m, BasicBlockD) for m in stage.modules()) for stage in network.encoder.stages]


def _shapes(network) -> dict:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


@pytest.mark.parametrize("source", ["resenc_like", "nnunet_resenc_m"])
def test_rep3d_plans_written_from_a_resenc_plan_keep_its_residual_blocks(nnunet_planned, source):
    """The plans a Rep3D planner writes from a ResEnc plan, and the export's plans, name Rep3DUNet: read back, the
    network has the plan's residual blocks, the same network as from the ResEnc plan, and the start-up line says so."""
    plans = _resenc_plans() if source == "resenc_like" else copy.deepcopy(nnunet_planned[2]["resenc_m"])
    settings = Rep3DSettings()
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    residual = list(configuration.network_arch_init_kwargs["n_blocks_per_stage"])
    with torch.device("meta"):  # structure only: ResEnc M's 320-feature stages without allocating them
        from_resenc = build_rep3d_network(manager, configuration, 1, 3, True, settings)
    assert _residual_blocks(from_resenc) == residual

    kwargs, req_import = rep3d_architecture(configuration.network_arch_class_name,
                                            configuration.network_arch_init_kwargs, configuration.patch_size,
                                            configuration.spacing, settings)
    planner_entry = {"network_class_name": REP3D_NETWORK_CLASS, "arch_kwargs": json.loads(json.dumps(kwargs)),
                     "_kw_requires_import": req_import}  # as Rep3DPlanner writes it
    export_entry = rep3d_deploy_architecture(configuration, settings)
    export_entry["arch_kwargs"].pop("deploy")  # the export's folded form aside, the same entry
    for entry in (planner_entry, export_entry):
        rep3d_plans = copy.deepcopy(plans)
        rep3d_plans["configurations"]["3d_fullres"]["architecture"] = entry
        rep3d_manager = PlansManager(rep3d_plans)
        rep3d_configuration = rep3d_manager.get_configuration("3d_fullres")
        with torch.device("meta"):
            read_back = build_rep3d_network(rep3d_manager, rep3d_configuration, 1, 3, True, settings)
        assert _residual_blocks(read_back) == residual and read_back.encoder.stem is not None
        assert _shapes(read_back) == _shapes(from_resenc)
        line = describe_translation(entry["network_class_name"], entry["arch_kwargs"], settings)
        assert f"and its stem and residual blocks per stage ({', '.join(map(str, residual))}); added" in line


def test_the_rep3d_planner_keeps_a_resenc_users_residual_encoder(nnunet_planned, monkeypatch):
    """rep3d-nnunet plan --planner ResEncM: nnU-Net's ResEnc M planner sizing the Rep3D network; the Rep3D network
    keeps ResEnc M's residual blocks per stage and shares nnU-Net's preprocessed data."""
    from rep3d_nnunet.cli import main

    root, env, planned = nnunet_planned
    use_nnunet_tree(monkeypatch, env)
    assert main(["plan", "-d", "502", "--planner", "ResEncM", "-c", "3d_fullres", "--base-features", "8",
                 "--max-features", "32", "--no-preprocess"]) == 0
    written = json.loads((root / "nnUNet_preprocessed" / "Dataset502_Fit" / "Rep3DResEncMPlans.json").read_text())
    assert written["experiment_planner_used"] == "Rep3DResEncMPlanner"
    configuration = written["configurations"]["3d_fullres"]
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert configuration["architecture"]["network_class_name"] == REP3D_NETWORK_CLASS
    assert configuration["data_identifier"] == "nnUNetPlans_3d_fullres"
    expected = list(nnUNetPlannerResEncM(502).UNet_blocks_per_stage_encoder[:kwargs["n_stages"]])
    assert kwargs["n_residual_blocks_per_stage"] == expected
    assert kwargs["features_per_stage"][0] == 8 and max(kwargs["features_per_stage"]) == 32
    manager = PlansManager(written)
    network = build_rep3d_network(manager, manager.get_configuration("3d_fullres"), 1, 3, True, Rep3DSettings())
    assert _residual_blocks(network) == expected
