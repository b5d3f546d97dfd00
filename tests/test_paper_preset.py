"""The paper's preset: ablation trainers from one table, the paper's network, its preprocessing as nnU-Net plans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from rep3d_nnunet.blocks import ModulatedDepthwiseConv, UXNetBlock
from rep3d_nnunet.config import PAPER_FEATURES, Rep3DSettings, paper_topology, rep3d_architecture
from rep3d_nnunet.preprocessing import PAPER_PRESETS, PaperWindowNormalization
from rep3d_nnunet.training import parameter_groups
from rep3d_nnunet.variants import METHODS, PAPER_SCHEDULE, make_trainer_class
from tests.helpers import TINY_TRAINER, nnunet_environment, run, training_environment, use_nnunet_tree, write_tiny_trainer
from tests.helpers import PLAIN, plain_plan_kwargs

PAPER_TRAINERS = [name for name in METHODS if name.startswith("nnUNetTrainerRep3DPaper")]


def _paper_network(settings: Rep3DSettings, patch=(32, 32, 32)):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kwargs, req_import = rep3d_architecture(PLAIN, plain_plan_kwargs(3), patch, [1.0] * 3, settings)
    return get_network_from_plans("rep3d_nnunet.architecture.Rep3DUNet", kwargs, req_import, 1, 4,
                                  allow_init=False, deep_supervision=False)


def _distinct_networks() -> dict:
    """One trainer per distinct network setting (Table 8's rows differ only in their optimizer)."""
    chosen = {}
    for name in PAPER_TRAINERS:
        chosen.setdefault(METHODS[name].rep3d, name)
    return {name: settings for settings, name in chosen.items()}


@pytest.mark.parametrize("name", sorted(_distinct_networks()))
def test_each_paper_variant_builds_the_intended_network(name):
    settings = make_trainer_class(name).rep3d
    network = _paper_network(settings)
    convs = [m for m in network.modules() if isinstance(m, ModulatedDepthwiseConv)]
    assert len(convs) == 8, "4 stages of 2 large-kernel blocks, as in the paper"
    assert list(network.encoder.output_channels) == list(PAPER_FEATURES)
    assert {c.modulation_mode for c in convs} == {settings.modulation}
    assert any(isinstance(m, UXNetBlock) for m in network.modules()) == (settings.block == "uxnet")
    # at a 32^3 patch the first large-kernel stage sees 16^3: the requested kernel fits there
    assert convs[0].kernel_size == (settings.kernel_size,) * 3
    if settings.modulation == "lrbm":
        generator = convs[0].modulation.generator
        assert len(generator.convs) == settings.generator_depth
        assert generator.convs[0].kernel_size == (settings.generator_kernel,) * 3


def test_ablation_table_covers_the_papers_tables():
    names = set(PAPER_TRAINERS)
    assert {f"nnUNetTrainerRep3DPaper_UXNet_k{k}" for k in range(3, 22, 2)} <= names  # Table 4
    assert {f"nnUNetTrainerRep3DPaper_gk{g}" for g in (1, 3, 5, 7)} <= names  # Table 3
    assert {f"nnUNetTrainerRep3DPaper_depth{d}" for d in (1, 2, 3)} <= names  # Table 9
    assert {"nnUNetTrainerRep3DPaper_FixedPrior", "nnUNetTrainerRep3DPaper_Vanilla",
            "nnUNetTrainerRep3DPaper_UXNetLRBM"} <= names  # Tables 1, 2, 3, 7
    assert len([n for n in names if "_CSLA_" in n]) == 10 and len([n for n in names if "_Single_" in n]) == 10


def test_paper_trainer_uses_the_papers_optimizer_and_schedule():
    trainer = make_trainer_class("nnUNetTrainerRep3DPaper")
    assert trainer.optim.name == "adamw" and trainer.optim.lr == 1e-4 and trainer.optim.weight_decay == 0.08
    assert trainer.optim.betas == (0.9, 0.999) and trainer.optim.eps == 1e-8
    assert trainer.num_epochs_override * 250 == 60_000 == PAPER_SCHEDULE.epochs * 250
    assert make_trainer_class("nnUNetTrainerRep3DPaper_250epochs").num_epochs_override == 250


def test_table8_csla_rows_give_each_branch_its_rate():
    trainer = make_trainer_class("nnUNetTrainerRep3DPaper_CSLA_sgd_lrS6e4")
    assert trainer.optim.name == "sgd" and trainer.rep3d.modulation == "csla"
    network = _paper_network(trainer.rep3d)
    groups = parameter_groups(network, trainer.optim)
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([2e-4, 6e-4])
    single = make_trainer_class("nnUNetTrainerRep3DPaper_Single_adamw_lr3e4")
    assert single.rep3d.modulation == "none" and single.optim.lr == 3e-4


def test_paper_topology_rejects_patches_it_cannot_divide():
    with pytest.raises(ValueError, match="divisible by 32.*--preset"):
        paper_topology([80, 192, 160])
    with pytest.raises(ValueError, match="3D patch"):
        paper_topology([96, 96])


def test_paper_normalization_clips_then_scales_by_percentiles():
    image = np.linspace(-1000, 1000, 10_001, dtype=np.float32)
    normalized = PaperWindowNormalization((-175, 250)).run(image.copy())
    clipped = np.clip(image, -175, 250)
    low, high = np.percentile(clipped, [1, 99])
    np.testing.assert_allclose(normalized, (clipped - low) / (high - low), rtol=1e-5, atol=1e-6)
    assert normalized.dtype == np.float32
    with pytest.raises(ValueError, match="low < high"):
        PaperWindowNormalization((250, -175))


def _write_ct_dataset(raw: Path, dataset_id: int, cases: int = 6) -> Path:
    """A tiny CT-like dataset in HU (-1000..1000) at 1 x 0.8 x 0.8 mm, a bright box labelled 1."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = raw / f"Dataset{dataset_id:03d}_PaperCT"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(cases):
        image = rng.normal(-100, 50, (16, 20, 20)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        z, y = rng.integers(3, 8, 2)
        label[z:z + 6, y:y + 8, 6:14] = 1
        image[label == 1] += 200
        image[0] = -1000  # air: clipped to the window's low end
        for array, path in ((image, folder / "imagesTr" / f"ct_{i:03d}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"ct_{i:03d}.nii.gz")):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((0.8, 0.8, 1.0))
            sitk.WriteImage(volume, str(path))
    sitk.WriteImage(sitk.ReadImage(str(folder / "imagesTr" / "ct_000_0000.nii.gz")),
                    str(folder / "imagesTs" / "new_000_0000.nii.gz"))
    generate_dataset_json(str(folder), {"0": "CT"}, {"background": 0, "organ": 1}, cases, ".nii.gz")
    return folder


def test_paper_preset_plans_preprocesses_trains_and_predicts(tmp_path):
    """rep3d-nnunet plan --preset writes the paper's plans and data; training reads them; predict preprocesses."""
    env = nnunet_environment(tmp_path, write_tiny_trainer(tmp_path / "test_trainers"))
    dataset = _write_ct_dataset(Path(env["nnUNet_raw"]), 961)
    run(["rep3d-nnunet", "plan", "-d", "961", "--preset", "kits21", "-np", "1"], env)
    preprocessed = Path(env["nnUNet_preprocessed"]) / dataset.name
    plans = json.loads((preprocessed / "Rep3DPaperPlans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    assert configuration["spacing"] == [2.0, 1.5, 1.5]  # 1.5 x 1.5 x 2.0 mm (x, y, z), nnU-Net's z-first order
    assert configuration["patch_size"] == [96, 96, 96] and configuration["batch_size"] == 2
    assert configuration["normalization_schemes"] == ["PaperWindowNormalization"]
    assert configuration["rep3d_intensity_window"] == list(PAPER_PRESETS["kits21"].window)
    assert configuration["preprocessor_name"] == "Rep3DPaperPreprocessor"
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"] == list(PAPER_FEATURES)
    assert "3d_lowres" not in plans["configurations"]

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data_folder = preprocessed / configuration["data_identifier"]
    dataset_class = infer_dataset_class(str(data_folder))
    data, seg, _, _ = dataset_class(str(data_folder)).load_case("ct_000")
    data = np.asarray(data[:])
    assert data.shape[1:] == (8, 11, 11)  # 16 x 20 x 20 voxels at 1 x 0.8 x 0.8 mm -> 2 x 1.5 x 1.5 mm
    assert np.percentile(data, 1) == pytest.approx(0.0, abs=0.05) and np.percentile(data, 99) == pytest.approx(1.0, abs=0.05)

    # A CPU-sized variant of the same plans (smaller patch and features), trained briefly by the tiny trainer.
    configuration["patch_size"] = [16, 16, 16]
    configuration["architecture"]["arch_kwargs"].update(
        {"features_per_stage": [4, 4, 8, 16], "n_stages": 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
         "kernel_sizes": [[3, 3, 3]] * 4, "n_conv_per_stage_decoder": [1] * 3,
         "n_conv_per_stage": [2, 1, 1, 2], "n_blocks_per_stage": [0, 2, 2, 0]})
    plans["plans_name"] = "Rep3DPaperPlansCPU"
    (preprocessed / "Rep3DPaperPlansCPU.json").write_text(json.dumps(plans))
    run(["nnUNetv2_train", "961", "3d_fullres", "0", "-tr", TINY_TRAINER, "-p", "Rep3DPaperPlansCPU",
         "-device", "cpu"], training_environment(env))
    model = Path(env["nnUNet_results"]) / dataset.name / f"{TINY_TRAINER}__Rep3DPaperPlansCPU__3d_fullres"
    run(["rep3d-nnunet", "predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "pred"), "-m", str(model),
         "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    prediction = sitk.ReadImage(str(tmp_path / "pred" / "new_000.nii.gz"))
    assert prediction.GetSize() == (20, 20, 16)
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1}


def test_unknown_preset_is_refused_before_any_work(capsys):
    from rep3d_nnunet.cli import main
    from rep3d_nnunet.planning import plan_and_preprocess

    with pytest.raises(SystemExit):
        main(["plan", "-d", "961", "--preset", "amos"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="allowed values are amos_ct"):
        plan_and_preprocess(961, preset="amos")


# ---- the paper's trainers on nnU-Net's own plans ----

ANISOTROPIC_DATASET = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
                       "file_ending": ".nii.gz"}


def _anisotropic_nnunet_plans(patch: list[int]) -> dict:
    """3d_fullres as nnU-Net's default planner writes it for thick slices: the first stages stride in-plane only."""
    kwargs = plain_plan_kwargs(3, (4, 8, 16, 32, 32))
    kwargs["kernel_sizes"] = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    kwargs["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    return {
        "dataset_name": "Dataset963_Thick", "plans_name": "nnUNetPlans", "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 1,
            "patch_size": patch, "spacing": [3.0, 0.8, 0.8], "batch_dice": False,
            "median_image_size_in_voxels": patch,
            "architecture": {"network_class_name": PLAIN, "arch_kwargs": kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}},
    }


def test_a_paper_trainer_trains_on_nnunets_anisotropic_plans(tmp_path, monkeypatch):
    """The paper's encoder strides 2 on every axis where the plan strides in-plane only: nnU-Net's deep-supervision
    targets and loss weights follow the network's strides. One training step as nnUNetTrainer runs it, with targets
    made by nnU-Net's own transforms."""
    env = nnunet_environment(tmp_path)
    use_nnunet_tree(monkeypatch, env)
    trainer = make_trainer_class("nnUNetTrainerRep3DPaper")(
        {**_anisotropic_nnunet_plans([32, 32, 64]), "continue_training": False}, "3d_fullres", 0, ANISOTROPIC_DATASET,
        torch.device("cpu"))
    # what initialize() does, without a preprocessed dataset to infer the dataset class from
    trainer.num_input_channels = 1
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    transforms = trainer.get_validation_transforms(trainer._get_deep_supervision_scales(), foreground_labels=[1])
    generator = torch.Generator().manual_seed(0)
    sample = transforms(image=torch.randn(1, 32, 32, 64, generator=generator),
                        segmentation=(torch.rand(1, 32, 32, 64, generator=generator) > 0.5).to(torch.int16))
    batch = {"data": sample["image"][None], "target": [t[None] for t in sample["segmentation"]]}
    assert np.isfinite(trainer.train_step(batch)["loss"])
    assert [tuple(t.shape[2:]) for t in batch["target"]] == [(32, 32, 64), (16, 16, 32), (8, 8, 16), (4, 4, 8),
                                                             (2, 2, 4)]


def test_a_paper_trainer_stops_before_nnunet_starts_on_a_patch_it_cannot_divide(tmp_path, monkeypatch, capsys):
    """nnU-Net's plan patch of 40 x 80 x 80 voxels: nnUNetv2_train's run_training stops before nnU-Net starts
    anything (nnUNetv2_train prints the traceback, whose last line is this message, and exits 1)."""
    from nnunetv2.run.run_training import run_training

    env = nnunet_environment(tmp_path)
    use_nnunet_tree(monkeypatch, env)
    plans = _anisotropic_nnunet_plans([40, 80, 80])
    preprocessed = Path(env["nnUNet_preprocessed"]) / plans["dataset_name"]
    preprocessed.mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans))
    (preprocessed / "dataset.json").write_text(json.dumps(ANISOTROPIC_DATASET))
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"^The paper's network needs a 3D patch divisible by 32 on every axis.*"
                                         r"rep3d-nnunet plan -d ID --preset NAME") as error:
        run_training("963", "3d_fullres", 0, "nnUNetTrainerRep3DPaper", device=torch.device("cpu"))
    assert "\n" not in str(error.value)
    assert "Please cite" not in capsys.readouterr().out  # nnUNetTrainer's start-up: never reached
