"""Dual-kernel adapters and the fine-tuning trainers, without an nnU-Net tree: insertion, freezing, folding, compile,
source checks, low-data splits. (nnUNetv2_train -pretrained_weights end to end: tests/test_nnunet_end_to_end.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from rep3d_nnunet.adapters import (
    ADAPTER_NAME,
    AdapterSettings,
    DualKernelAdapter,
    has_adapters,
    insert_adapters,
    is_head_parameter,
)
from rep3d_nnunet import nnunet_compat
from rep3d_nnunet.export import folded_copy
from rep3d_nnunet.finetuning import FinetuneOptimizer, SourceCheckpointError, check_source, trainable_parameter_groups
from rep3d_nnunet.splits import make_split
from rep3d_nnunet.variants import METHODS, make_trainer_class
from tests.helpers import PLANS, assert_one_graph, build_network, plan_configuration, random_input


def _plain_network(plan: str = "3d_anisotropic", seed: int = 0) -> tuple[torch.nn.Module, object]:
    configuration = plan_configuration(*PLANS[plan])
    torch.manual_seed(seed)
    network = nnunet_compat.build_network(nnUNetTrainer, PlansManager({"configurations": {}}), configuration, 1, 3,
                                          True)
    return network, configuration


@pytest.mark.parametrize("plan", ["2d", "3d_anisotropic"])
def test_adapters_keep_the_source_keys_and_start_as_the_identity(plan):
    network, configuration = _plain_network(plan)
    source_keys = set(network.state_dict())
    x = random_input(configuration, 2)
    network.eval()
    with torch.no_grad():
        before = network(x)[0]
        insert_adapters(network, AdapterSettings(), configuration.patch_size)
        after = network(x)[0]
    added = set(network.state_dict()) - source_keys
    assert source_keys <= set(network.state_dict()) and added
    assert all(f".{ADAPTER_NAME}." in key for key in added)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # the up-projection starts at zero
    with pytest.raises(ValueError, match="already has adapters"):
        insert_adapters(network, AdapterSettings(), configuration.patch_size)


def test_kernels_are_capped_by_the_feature_map_and_flat_where_the_plan_is_flat():
    network, configuration = _plain_network("3d_anisotropic")  # patch 8x16x16, first stage kernel 1x3x3
    insert_adapters(network, AdapterSettings(large_kernel_3d=31, small_kernel=5), configuration.patch_size)
    kernels = [m.kernel_size for n, m in network.named_modules()
               if n.endswith("spatial") and n.startswith("encoder")]
    assert kernels == [(1, 31, 31), (15, 15, 15), (7, 7, 7)]
    small = [m.small_kernel_size for n, m in network.named_modules()
             if n.startswith("encoder") and n.endswith("spatial")]
    assert small == [(1, 5, 5), (5, 5, 5), (5, 5, 5)]


@pytest.mark.parametrize("kind, spatial_kernel, small", [("dual", (9, 9), True), ("large", (9, 9), False),
                                                         ("small", (5, 5), False), ("bottleneck", None, False)])
def test_each_adapter_kind_has_the_branches_it_names(kind, spatial_kernel, small):
    adapter = DualKernelAdapter(16, 4, 2, kind, [9, 9], 5)
    if spatial_kernel is None:
        assert adapter.spatial is None
    else:
        assert adapter.spatial.kernel_size == spatial_kernel
        assert (adapter.spatial.small_weight is not None) == small


def _trainable_step(network, configuration, settings):
    groups = trainable_parameter_groups(network, settings, FinetuneOptimizer())
    optimizer = torch.optim.AdamW(groups)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    network.train()
    outputs = network(random_input(configuration, 2))
    sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outputs).backward()
    optimizer.step()
    return before, network.state_dict(), {id(p): g["lr"] for g in groups for p in g["params"]}


@pytest.mark.parametrize("head", ["seg_layers", "decoder"])
def test_a_step_moves_adapters_and_head_only_at_their_rates(head):
    network, configuration = _plain_network()
    settings = AdapterSettings(head=head)
    insert_adapters(network, settings, configuration.patch_size)
    # move the up-projections off zero so that the layers before them receive gradients too
    for module in network.modules():
        if isinstance(module, DualKernelAdapter):
            torch.nn.init.normal_(module.up.weight, std=0.01)
    before, after, rates = _trainable_step(network, configuration, settings)
    parameters = dict(network.named_parameters())
    for key in (k for k in before if not k.endswith("_extra_state")):  # the convs' structure records, not weights
        adapter, in_head = f".{ADAPTER_NAME}." in key, is_head_parameter(key, head)
        changed = not torch.equal(before[key], after[key])
        if adapter:
            assert changed, f"{key}: the adapter did not train"
            assert key not in parameters or rates[id(parameters[key])] == 1e-3
        elif in_head and key in parameters and parameters[key].grad is not None and key.endswith("weight"):
            assert changed and rates[id(parameters[key])] == 1e-4, key
        elif not in_head:
            assert not changed, f"{key}: a frozen weight changed"
    assert all(p.grad is not None for n, p in parameters.items() if f".{ADAPTER_NAME}." in n)


def test_full_finetuning_trains_everything_and_linear_probing_the_head_only():
    for settings, frozen_expected in ((AdapterSettings(kind="none", train_backbone=True), False),
                                      (AdapterSettings(kind="none"), True)):
        network, configuration = _plain_network()
        insert_adapters(network, settings, configuration.patch_size)
        assert not has_adapters(network)
        before, after, _ = _trainable_step(network, configuration, settings)
        encoder_key = next(k for k in before if k.startswith("encoder.") and k.endswith("conv.weight"))
        assert torch.equal(before[encoder_key], after[encoder_key]) == frozen_expected


@pytest.mark.parametrize("trainer", ["nnUNetTrainer", "nnUNetTrainerRep3D"])
def test_folding_merges_the_two_kernels_exactly(trainer):
    configuration = plan_configuration(*PLANS["3d_anisotropic"])
    if trainer == "nnUNetTrainer":
        network, _ = _plain_network()
    else:
        network = build_network(trainer, configuration)
    insert_adapters(network, AdapterSettings(), configuration.patch_size)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    network.eval()
    folded = folded_copy(network)
    adapter_convs = [m for n, m in folded.named_modules() if n.endswith(f"{ADAPTER_NAME}.spatial")]
    assert adapter_convs and all(m.is_folded and m.small_weight is None for m in adapter_convs)
    x = random_input(configuration, 2)
    with torch.no_grad():
        expected, got = network(x)[0], folded(x)[0]
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("plan", ["2d", "3d_anisotropic"])
def test_the_adapted_network_is_one_graph(plan):
    network, configuration = _plain_network(plan)
    insert_adapters(network, AdapterSettings(), configuration.patch_size)
    assert_one_graph(network, random_input(configuration, 2))


def _checkpoint(network, configuration="3d_fullres"):
    return {"network_weights": network.state_dict(), "init_args": {"configuration": configuration,
                                                                    "plans": {"plans_name": "nnUNetPlans"}},
            "trainer_name": "nnUNetTrainer"}


def test_source_checks_name_configuration_plan_and_fine_tuned_sources():
    network, _ = _plain_network()
    check_source(network, _checkpoint(network), "source.pth", "3d_fullres")
    with pytest.raises(SourceCheckpointError, match="trained on configuration '2d'.*runs on '3d_fullres'"):
        check_source(network, _checkpoint(network, "2d"), "source.pth", "3d_fullres")
    other, _ = _plain_network("3d")  # another plan: cubic first stage
    with pytest.raises(SourceCheckpointError, match="different plan.*nnUNetv2_move_plans_between_datasets"):
        check_source(network, _checkpoint(other), "source.pth", "3d_fullres")
    adapted = copy.deepcopy(network)
    insert_adapters(adapted, AdapterSettings(), [8, 16, 16])
    with pytest.raises(SourceCheckpointError, match="already fine-tuned"):
        check_source(network, _checkpoint(adapted), "source.pth", "3d_fullres")
    # a source with other classes: nnU-Net does not transfer the segmentation layers, neither do we check them
    with_other_classes = nnunet_compat.build_network(
        nnUNetTrainer, PlansManager({"configurations": {}}), plan_configuration(*PLANS["3d_anisotropic"]), 1, 5, True)
    check_source(network, _checkpoint(with_other_classes), "source.pth", "3d_fullres")


def test_the_variant_table_has_the_papers_comparison_with_both_heads():
    kinds = {name: METHODS[name].adapters for name in METHODS if name.startswith("nnUNetTrainerDKA")}
    assert {a.kind for a in kinds.values()} == {"dual", "large", "small", "bottleneck", "none"}
    assert {a.head for a in kinds.values()} == {"seg_layers", "decoder"}
    dka = make_trainer_class("nnUNetTrainerDKA_250epochs")
    assert dka.adapters.kind == "dual" and dka.optim.adapter_lr == 1e-3 and dka.optim.head_lr == 1e-4
    assert dka.num_epochs_override == 250
    with pytest.raises(ValueError, match="Unknown"):  # fine-tuning has no benchmark loop (it needs weights)
        make_trainer_class("nnUNetTrainerDKABenchmark_5epochs")


# ---- low-data splits ----

CASES = [f"case_{i:03d}" for i in range(30)]


def test_low_data_split_fixes_the_test_set_and_samples_a_fraction_per_fold():
    split = make_split(CASES, 0.1, seed=1)
    assert len(split.test) == 6 and len(split.folds) == 5
    remaining = sorted(set(CASES) - set(split.test))
    assert sorted(c for fold in split.folds for c in fold["val"]) == remaining  # validation parts partition them
    for fold in split.folds:
        assert len(fold["train"]) == round(0.1 * 24) == 2
        assert not set(fold["train"]) & set(fold["val"]) and not set(fold["train"]) & set(split.test)
    other = make_split(CASES, 0.25, seed=2)
    assert other.test == split.test and [f["val"] for f in other.folds] == [f["val"] for f in split.folds]
    assert [f["train"] for f in other.folds] != [f["train"] for f in split.folds]
    assert make_split(CASES, 0.1, seed=1) == split  # deterministic
    assert all(len(f["train"]) == 1 for f in make_split(CASES, 0.001).folds)  # at least one case


@pytest.mark.parametrize("fraction, test_fraction, match", [
    (0.0, 0.2, "leaves no training case"), (1.5, 0.2, "leaves no training case"),
    (0.9, 0.2, r"asks for 22 training cases, but a fold has 19.*<= 0\.79"), (0.1, 1.0, "must be in"),
])
def test_low_data_split_refuses_what_leaves_no_case(fraction, test_fraction, match):
    with pytest.raises(ValueError, match=match):
        make_split(CASES, fraction, test_fraction=test_fraction)
    with pytest.raises(ValueError, match="fewer than 6"):
        make_split(CASES[:6], 0.5)


def test_split_command_writes_nnunets_file_and_never_overwrites(tmp_path, monkeypatch, capsys):
    from rep3d_nnunet.cli import main

    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    raw = tmp_path / "nnUNet_raw" / "Dataset501_Tiny"
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    for case in CASES:
        (raw / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    (tmp_path / "nnUNet_preprocessed").mkdir()
    assert main(["split", "-d", "501", "--fraction", "0.1"]) == 2
    assert "Plan it first" in capsys.readouterr().err
    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset501_Tiny"
    preprocessed.mkdir()
    assert main(["split", "-d", "501", "--fraction", "0.1", "--seed", "3"]) == 0
    folds = json.loads((preprocessed / "splits_final.json").read_text())
    lowdata = json.loads((preprocessed / "lowdata_split.json").read_text())
    assert len(folds) == 5 and len(folds[0]["train"]) == 2 and len(lowdata["test"]) == 6
    assert main(["split", "-d", "501", "--fraction", "0.2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert json.loads((preprocessed / "splits_final.json").read_text()) == folds
    assert main(["split", "-d", "501", "--fraction", "0.2", "--force"]) == 0
    assert len(json.loads((preprocessed / "splits_final.json").read_text())[0]["train"]) == 5
