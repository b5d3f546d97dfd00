"""A full nnU-Net run with Rep3D on tiny synthetic data: nnU-Net's own commands, as users type them.

convert -> nnUNetv2_plan_and_preprocess -> rep3d-nnunet plan -> nnUNetv2_train (5 folds, 2d and 3d_fullres)
-> nnUNetv2_find_best_configuration -> nnUNetv2_predict (5-fold ensemble) -> rep3d-nnunet export
-> nnUNetv2_predict with the folded model (identical segmentations) -> nnUNetv2_ensemble -> zip export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from rep3d_nnunet.datasets.synthetic import generate_synthetic_dataset
from tests.helpers import (
    TINY_DKA_TRAINER,
    TINY_TRAINER,
    nnunet_environment,
    run,
    run_in_pairs,
    training_environment,
    use_nnunet_tree,
    write_tiny_trainer,
)

DATASET_ID = 971
ANISOTROPIC_ID = 972
PLANS = "Rep3DPlans"


@pytest.fixture(scope="module")
def nnunet_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_environment(root, write_tiny_trainer(root / "test_trainers"))
    dataset = generate_synthetic_dataset(Path(env["nnUNet_raw"]), DATASET_ID, task="local", num_training=10,
                                         num_test=2, size=(24, 24, 24), seed=3)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1"], env)
    run(["rep3d-nnunet", "plan", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "--base-features", "4",
         "--max-features", "16", "-np", "1"], env)
    return root, env, dataset


def _continue_training() -> dict:
    """get_trainer_from_args's resume flag: nnU-Net 2.7 added it (2.6 resumes through load_checkpoint alone)."""
    import inspect

    from nnunetv2.run.run_training import get_trainer_from_args

    return {"continue_training": True} if "continue_training" in inspect.signature(get_trainer_from_args).parameters \
        else {}


def _model_folder(env: dict, dataset: Path, plans: str, configuration: str, trainer: str = TINY_TRAINER) -> Path:
    return Path(env["nnUNet_results"]) / dataset.name / f"{trainer}__{plans}__{configuration}"


def _source_checkpoint(env: dict, dataset: Path, configuration: str) -> Path:
    """Fold 0 of the tiny Rep3D trainer (the five-fold test trains it; trained here when run alone)."""
    checkpoint = _model_folder(env, dataset, PLANS, configuration) / "fold_0" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", TINY_TRAINER, "-p", PLANS, "-device",
             "cpu"], training_environment(env))
    return checkpoint


def test_rep3d_plans_describe_a_rep3d_network(nnunet_tree):
    root, env, dataset = nnunet_tree
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / dataset.name / f"{PLANS}.json").read_text())
    for configuration in ("2d", "3d_fullres"):
        architecture = plans["configurations"][configuration]["architecture"]
        assert architecture["network_class_name"] == "rep3d_nnunet.architecture.Rep3DUNet"
        kwargs = architecture["arch_kwargs"]
        assert kwargs["features_per_stage"][0] == 4 and max(kwargs["features_per_stage"]) <= 16
        # the default kernel is never shrunk for speed: 21 wherever the feature map can use it
        assert kwargs["large_kernel_sizes"][0] == [21] * len(kwargs["kernel_sizes"][0])


def test_five_folds_find_best_configuration_ensemble_export_and_predict(nnunet_tree):
    root, env, dataset = nnunet_tree
    d = str(DATASET_ID)
    # --npz keeps the validation softmax that find_best_configuration ensembles
    run_in_pairs([(["nnUNetv2_train", d, configuration, str(fold), "-tr", TINY_TRAINER, "-p", PLANS, "-device",
                    "cpu", "--npz"], training_environment(env))
                  for configuration in ("2d", "3d_fullres") for fold in range(5)])
    run(["nnUNetv2_find_best_configuration", d, "-c", "2d", "3d_fullres", "-tr", TINY_TRAINER, "-p", PLANS,
         "-np", "1"], env)
    trained = _model_folder(env, dataset, PLANS, "3d_fullres")
    assert (trained.parent / "inference_instructions.txt").is_file()
    assert (trained / "crossval_results_folds_0_1_2_3_4" / "summary.json").is_file()

    predict = ["nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-d", d, "-tr", TINY_TRAINER,
               "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities"]
    run_in_pairs([([*predict, "-o", str(root / "pred_3d"), "-c", "3d_fullres", "-p", PLANS], env),
                  ([*predict, "-o", str(root / "pred_2d"), "-c", "2d", "-p", PLANS], env)])

    result = run(["rep3d-nnunet", "export", str(trained)], env)
    exported = _model_folder(env, dataset, f"{PLANS}_folded", "3d_fullres")
    assert "parameters ->" in result.stdout and exported.is_dir()
    # tensors and plain types only: a weights-only load, no allow-list
    checkpoint = torch.load(exported / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["rep3d_folded"] and checkpoint["optimizer_state"] is None
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["rep3d_trainer_name"] == TINY_TRAINER
    assert not any(k for k in checkpoint["network_weights"] if "generator" in k or "beta" in k)
    architecture = json.loads((exported / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert architecture["network_class_name"] == "rep3d_nnunet.architecture.Rep3DUNet"
    assert architecture["arch_kwargs"]["deploy"] is True

    # A deployed model needs the package only: no nnUNet_extTrainer, at its place and installed from a zip elsewhere.
    deploy_env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    run(["nnUNetv2_export_model_to_zip", "-d", d, "-o", str(root / "folded.zip"), "-c", "3d_fullres",
         "-tr", TINY_TRAINER, "-p", f"{PLANS}_folded"], deploy_env)
    elsewhere = {**deploy_env, "nnUNet_results": str(root / "elsewhere_results")}
    (root / "elsewhere_results").mkdir()
    run(["nnUNetv2_install_pretrained_model_from_zip", str(root / "folded.zip")], elsewhere)
    run_in_pairs([([*predict, "-o", str(root / "pred_3d_folded"), "-c", "3d_fullres", "-p", f"{PLANS}_folded"],
                   deploy_env),
                  ([*predict, "-o", str(root / "pred_3d_installed"), "-c", "3d_fullres", "-p", f"{PLANS}_folded"],
                   elsewhere)])
    for case in sorted((root / "pred_3d").glob("*.nii.gz")):
        trained_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case)))
        for deployed in ("pred_3d_folded", "pred_3d_installed"):
            deployed_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(root / deployed / case.name)))
            np.testing.assert_array_equal(trained_seg, deployed_seg)
        name = case.name.replace(".nii.gz", ".npz")
        trained_prob = np.load(root / "pred_3d" / name)["probabilities"]
        folded_prob = np.load(root / "pred_3d_folded" / name)["probabilities"]
        assert np.abs(trained_prob - folded_prob).max() < 1e-4

    run(["nnUNetv2_ensemble", "-i", str(root / "pred_3d"), str(root / "pred_2d"), "-o", str(root / "ensemble"),
         "-np", "1"], env)
    assert len(list((root / "ensemble").glob("*.nii.gz"))) == 2


def test_anisotropic_dataset_trains_and_predicts(tmp_path):
    env = nnunet_environment(tmp_path, write_tiny_trainer(tmp_path / "test_trainers"))
    dataset = generate_synthetic_dataset(Path(env["nnUNet_raw"]), ANISOTROPIC_ID, task="local", num_training=5,
                                         num_test=1, size=(8, 40, 40), spacing=(3.0, 0.8, 0.8), seed=5)
    d = str(ANISOTROPIC_ID)
    # rep3d-nnunet plan alone: nnU-Net's fingerprint, the Rep3D plans and nnU-Net's preprocessing in one command
    run(["rep3d-nnunet", "plan", "-d", d, "-c", "3d_fullres", "--base-features", "4", "--max-features", "16",
         "-np", "1"], env)
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / dataset.name / f"{PLANS}.json").read_text())
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    for plan_kernel, large_kernel in zip(kwargs["kernel_sizes"], kwargs["large_kernel_sizes"]):
        for plan_k, large_k in zip(plan_kernel, large_kernel):
            assert (large_k == 1) == (plan_k == 1)
    assert any(1 in k for k in kwargs["large_kernel_sizes"]), "the anisotropic stages keep a flat z kernel"

    run(["nnUNetv2_train", d, "3d_fullres", "0", "-tr", TINY_TRAINER, "-p", PLANS, "-device", "cpu"],
        training_environment(env))
    trained = _model_folder(env, dataset, PLANS, "3d_fullres")
    run(["rep3d-nnunet", "export", str(trained), "-o", str(tmp_path / "folded")], env)
    run(["nnUNetv2_predict_from_modelfolder", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "pred"),
         "-m", str(tmp_path / "folded"), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    prediction = sitk.ReadImage(str(next((tmp_path / "pred").glob("*.nii.gz"))))
    assert prediction.GetSize() == (40, 40, 8)
    np.testing.assert_allclose(prediction.GetSpacing(), (0.8, 0.8, 3.0))


def test_resume_restores_the_lrbm_state_exactly(nnunet_tree, monkeypatch):
    root, env, dataset = nnunet_tree
    use_nnunet_tree(monkeypatch, env)
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 4, "nnUNetTrainerRep3D", PLANS,
                                    device=torch.device("cpu"))
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    x = torch.randn(2, 1, *patch)
    trainer.network.train()
    for _ in range(2):  # move beta, the generator and the optimizer's moments away from their initial values
        trainer.optimizer.zero_grad()
        outputs = trainer.network(x)
        sum(o.square().mean() for o in outputs).backward()
        trainer.optimizer.step()
    checkpoint = root / "resume_checkpoint.pth"
    trainer.save_checkpoint(str(checkpoint))

    resumed = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 4, "nnUNetTrainerRep3D", PLANS,
                                    **_continue_training(), device=torch.device("cpu"))
    resumed.load_checkpoint(str(checkpoint))
    original_state, resumed_state = trainer.network.state_dict(), resumed.network.state_dict()
    lrbm_keys = [k for k in original_state if "generator" in k or "beta" in k]
    assert lrbm_keys
    for key in original_state:
        assert torch.equal(original_state[key], resumed_state[key]), key
    for group_a, group_b in zip(trainer.optimizer.state_dict()["state"].values(),
                                resumed.optimizer.state_dict()["state"].values()):
        for name in group_a:
            assert torch.equal(torch.as_tensor(group_a[name]), torch.as_tensor(group_b[name]))
    trainer.network.eval(), resumed.network.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.network(x)[0], resumed.network(x)[0], rtol=0, atol=0)


def test_benchmark_trainer_writes_nnunets_benchmark_json(nnunet_tree, monkeypatch):
    """nnUNetTrainerRep3DBenchmark_5epochs_noDataLoading runs nnU-Net's own benchmark loop and json.

    nnU-Net's benchmark trainers refuse to start without CUDA; on this CPU the CUDA queries they make are answered
    by stand-ins, and the epochs are shortened, so that nnU-Net's loop and its on_train_end really run.
    """
    root, env, dataset = nnunet_tree
    use_nnunet_tree(monkeypatch, env)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "CPU stand-in")
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.nnUNetTrainer.variants.benchmarking.nnUNetTrainerBenchmark_5epochs import (
        nnUNetTrainerBenchmark_5epochs,
    )

    name = "nnUNetTrainerRep3DBenchmark_5epochs_noDataLoading"
    with monkeypatch.context() as construction:  # only the constructor's assertion; torch itself must see no GPU
        construction.setattr(torch.cuda, "is_available", lambda: True)
        trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, name, PLANS, device=torch.device("cpu"))
    assert isinstance(trainer, nnUNetTrainerBenchmark_5epochs) and trainer.num_epochs == 5
    assert any("ModulatedDepthwiseConv" in type(m).__name__ for m in trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 3, True).modules())
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 2, 1
    trainer.run_training()
    assert not trainer.crashed_with_runtime_error
    results = json.loads((Path(trainer.output_folder) / "benchmark_result.json").read_text())
    (entry,) = results.values()
    assert set(entry) == {"torch_version", "cudnn_version", "gpu_name", "fastest_epoch", "num_gpus", "hostname"}
    assert entry["gpu_name"] == "CPU stand-in" and entry["num_gpus"] == 1 and entry["fastest_epoch"] > 0


def test_dka_finetunes_a_pretrained_rep3d_network_exports_and_predicts(nnunet_tree):
    """nnUNetv2_train -pretrained_weights with a DKA trainer, 2D and 3D: the Rep3D source is rebuilt from the
    checkpoint's trainer, frozen weights stay the source's key by key, the export predicts like the trained folder."""
    root, env, dataset = nnunet_tree
    d = str(DATASET_ID)
    configurations = ("2d", "3d_fullres")
    sources = {c: _source_checkpoint(env, dataset, c) for c in configurations}
    run_in_pairs([(["nnUNetv2_train", d, c, "0", "-tr", TINY_DKA_TRAINER, "-p", PLANS, "-device", "cpu",
                    "-pretrained_weights", str(sources[c])], training_environment(env)) for c in configurations])
    deploy_env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    tuned_folders = {c: _model_folder(env, dataset, PLANS, c, TINY_DKA_TRAINER) for c in configurations}
    exported_folders = {c: root / f"dka_folded_{c}" for c in configurations}
    run_in_pairs([(["rep3d-nnunet", "export", str(tuned_folders[c]), "-o", str(exported_folders[c])], env)
                  for c in configurations])
    predictions = []
    for c in configurations:
        tuned, exported = tuned_folders[c], exported_folders[c]
        architecture = json.loads((tuned / "plans.json").read_text())["configurations"][c]["architecture"]
        assert architecture["dka"] == {"source_trainer": TINY_TRAINER}
        tuned_weights = torch.load(tuned / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
        source_weights = torch.load(sources[c], weights_only=False)["network_weights"]
        assert any(".dka_adapter." in k for k in tuned_weights) and set(source_weights) <= set(tuned_weights)
        for key, value in source_weights.items():
            if ".seg_layers." not in key:  # the head trains; everything else is the frozen source
                assert torch.equal(tuned_weights[key], value), (c, key)
        assert any(not torch.equal(tuned_weights[k], v) for k, v in source_weights.items() if ".seg_layers." in k)
        for folder, folder_env, output in ((tuned, env, "dka_trained"), (exported, deploy_env, "dka_exported")):
            predictions.append((["nnUNetv2_predict_from_modelfolder", "-i", str(dataset / "imagesTs"), "-o",
                                 str(root / f"{output}_{c}"), "-m", str(folder), "-f", "0", "-device", "cpu", "-npp",
                                 "1", "-nps", "1"], folder_env))
    run_in_pairs(predictions)
    for c in configurations:
        for case in sorted((root / f"dka_trained_{c}").glob("*.nii.gz")):
            trained_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case)))
            exported_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(root / f"dka_exported_{c}" / case.name)))
            np.testing.assert_array_equal(trained_seg, exported_seg)


def test_dka_refuses_a_missing_or_mismatched_pretrained_network(nnunet_tree, monkeypatch, capsys):
    root, env, dataset = nnunet_tree
    use_nnunet_tree(monkeypatch, env)
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    source_2d = _source_checkpoint(env, dataset, "2d")
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, "nnUNetTrainerDKA", PLANS,
                                    device=torch.device("cpu"))
    with pytest.raises(SystemExit) as exit_info:
        maybe_load_checkpoint(trainer, False, False, str(source_2d))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "trained on configuration '2d'" in message[0] and "runs on '3d_fullres'" in message[0]

    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, "nnUNetTrainerDKA", PLANS,
                                    device=torch.device("cpu"))
    with pytest.raises(SystemExit) as exit_info:
        trainer.on_train_start()  # nnUNetv2_train without -pretrained_weights
    assert exit_info.value.code == 2
    assert "add -pretrained_weights" in capsys.readouterr().err


def test_dka_resumes_from_its_own_checkpoint(nnunet_tree, monkeypatch):
    """--c and --val load a fine-tuned checkpoint: source network, adapters and the adapted optimizer first."""
    root, env, dataset = nnunet_tree
    use_nnunet_tree(monkeypatch, env)
    from nnunetv2.run.run_training import get_trainer_from_args

    tuned = _model_folder(env, dataset, PLANS, "3d_fullres", TINY_DKA_TRAINER) / "fold_0" / "checkpoint_final.pth"
    if not tuned.is_file():
        pytest.skip("needs the fine-tuning of test_dka_finetunes_a_pretrained_rep3d_network_exports_and_predicts")
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, TINY_DKA_TRAINER, PLANS, **_continue_training(),
                                    device=torch.device("cpu"))
    trainer.load_checkpoint(str(tuned))
    saved = torch.load(tuned, weights_only=False)
    state = trainer.network.state_dict()
    assert set(state) == set(saved["network_weights"])
    assert all(torch.equal(state[k], v) for k, v in saved["network_weights"].items())
    trained = {n for n, p in trainer.network.named_parameters() if p.requires_grad}
    assert trained and all(".dka_adapter." in n or ".seg_layers." in n for n in trained)
    assert trainer.optimizer.state_dict()["state"], "the adapted optimizer's moments are restored"
