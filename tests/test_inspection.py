"""Mask and ERF pictures: exact receptive-field bounds, Rep3D reach, model folders (trained, exported, not Rep3D)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from rep3d_nnunet.blocks import ModulatedDepthwiseConv, Rep3DBlock
from rep3d_nnunet.config import Rep3DSettings
from rep3d_nnunet.environment import trainer_folder
from rep3d_nnunet.export import export_model_folder, fold
from rep3d_nnunet.modulation import distance_from_centre
from rep3d_nnunet.erf import add_erf_arguments, effective_receptive_field, erf_radius, run_erf, write_erf
from rep3d_nnunet.inspection import build_untrained_network, load_rep3d_model
from rep3d_nnunet.masks import add_masks_arguments, block_kernels, run_masks, write_masks
from tests.helpers import CONFIGURATIONS, write_model_folder
from tests.helpers import build



def _chebyshev_distance(shape) -> np.ndarray:
    grids = np.meshgrid(*[np.abs(np.arange(s) - s // 2) for s in shape], indexing="ij")
    return np.maximum.reduce(grids)


@pytest.mark.parametrize("dim", [2, 3])
def test_erf_of_stacked_3_convs_is_zero_exactly_outside_their_receptive_field(dim):
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dim]
    torch.manual_seed(0)
    network = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, padding=1), nn.ReLU(),
                            conv(4, 3, 3, padding=1))
    erf = effective_receptive_field(network, (2, *[13] * dim), num_inputs=3, seed=1)
    distance = _chebyshev_distance(erf.shape)
    assert erf.shape == (13,) * dim and erf.max() == 1.0
    assert np.all(erf[distance > 3] == 0)
    assert erf[(6,) * dim] > 0 and np.all(erf[distance <= 1] > 0)
    assert erf_radius(erf) <= 3 * dim ** 0.5


def test_erf_of_a_rep3d_block_reaches_beyond_radius_3_and_stops_at_its_kernel():
    torch.manual_seed(0)
    # 3^3 stem (radius 1) + Rep3D 9^3 kernel (radius 4): theoretical radius 5, beyond any stack of three 3^3 convs.
    # The direct backend keeps "exactly zero" exact; the FFT backend leaves round-off (~1e-9) outside the kernel.
    block = Rep3DBlock(4, 9, modulation="lrbm", backend="direct")
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), block, nn.Conv3d(4, 2, 1))
    erf = effective_receptive_field(network, (1, 15, 15, 15), num_inputs=2, output_channel=1)
    distance = _chebyshev_distance(erf.shape)
    assert np.all(erf[distance > 5] == 0)
    assert erf[distance == 5].max() > 0 and erf[distance > 3].sum() > 0
    assert network.training  # the mode the caller had is restored


def test_erf_of_a_rep3d_unet_with_deep_supervision_outputs_reaches_beyond_radius_3():
    # (Its instance norms alone spread gradients everywhere; the block test above is the exact one.)
    network = build(Rep3DSettings(kernel_size=21), patch=(8, 16, 16), deep_supervision=True)
    erf = effective_receptive_field(network, (1, 8, 16, 16), num_inputs=1)
    assert erf[_chebyshev_distance(erf.shape) > 3].max() > 0


def test_erf_radius_of_a_point_and_of_a_shell():
    point = np.zeros((9, 9))
    point[4, 4] = 1.0
    assert erf_radius(point) == 0.0
    shell = np.zeros((9, 9, 9))
    shell[4, 4, [1, 7]] = 1.0
    shell[4, 4, 4] = 0.05
    assert erf_radius(shell, 0.9) == 3.0
    with pytest.raises(ValueError, match="zero everywhere"):
        erf_radius(np.zeros((5, 5)))


def test_erf_rejects_a_channel_the_network_does_not_have():
    with pytest.raises(ValueError, match="out of range"):
        effective_receptive_field(nn.Conv2d(1, 2, 3, padding=1), (1, 8, 8), num_inputs=1, output_channel=2)


@pytest.mark.parametrize("mode, shown", [("lrbm", "M = P + f(P)"), ("fixed", "M = P"), ("none", "|W_eff|"),
                                         ("csla", "|W_eff|")])
def test_block_kernels_show_the_mask_where_there_is_one_and_the_kernel_otherwise(mode, shown):
    # two blocks at every stage (not the default's one from stage 1 on): kernels are listed by stage and block
    network = build(Rep3DSettings(modulation=mode, kernel_size=7, blocks_per_stage=2, first_block_stage=0),
                    deep_supervision=False)
    kernels = block_kernels(network)
    assert [(k.stage, k.block) for k in kernels] == [(s, b) for s in range(3) for b in range(2)]
    assert all(k.shown.startswith(shown) for k in kernels)
    first = kernels[2]
    assert first.values.shape == first.prior.shape == first.kernel_size == (7, 7, 7)
    if mode in ("lrbm", "fixed"):
        # at initialisation the generator's last gain is 0: M == P
        np.testing.assert_allclose(first.values, first.prior, rtol=1e-6)
        assert first.summary()["centre"] == pytest.approx(1.0)
        distance = distance_from_centre((7, 7, 7)).numpy()
        edge_prior = 1 / (1 + distance[_chebyshev_distance((7, 7, 7)) == 3])
        assert first.summary()["centre_edge_ratio"] == pytest.approx(1 / edge_prior.mean(), rel=1e-6)
    assert (first.beta is not None) == (mode == "lrbm")
    conv = [m for m in network.modules() if isinstance(m, ModulatedDepthwiseConv)][2]
    with torch.no_grad():
        applied = conv.eval().effective_weight().abs().double().mean(dim=(0, 1)).numpy()
    folded = block_kernels(fold(network))
    assert all(k.shown.startswith(shown if mode == "none" else "|W_deploy|") for k in folded)
    np.testing.assert_allclose(folded[2].values, applied, rtol=1e-5)


# ---- model folders ----


@pytest.fixture
def rep3d_trainers(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_folder()))


def _assert_picture(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert matplotlib.image.imread(path).std() > 0


def _parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("dim", [3, 2])
def test_masks_and_erf_of_a_trained_model_folder_and_of_its_export(dim, tmp_path, rep3d_trainers, monkeypatch,
                                                                  capsys):
    trained = write_model_folder(tmp_path / "results", "nnUNetTrainerRep3D", dim)
    monkeypatch.chdir(tmp_path)
    assert run_masks(_parse(add_masks_arguments, [str(trained)])) == 0
    out = tmp_path / f"rep3d_masks_{trained.name}"  # default: the current directory, not the model folder
    _assert_picture(out / "masks.png")
    masks = json.loads((out / "masks.json").read_text())
    # the default network on the 3-stage test plan: one block at stages 1 and 2, the first 15 wide (stage 1's map is 8)
    assert not masks["folded"] and [(b["stage"], b["block"]) for b in masks["blocks"]] == [(1, 0), (2, 0)]
    first = masks["blocks"][0]
    assert first["mode"] == "lrbm" and first["beta"] > 0
    assert first["kernel_size"] == [15] * dim
    assert first["centre_edge_ratio"] > 1
    assert len(list(csv.DictReader((out / "masks.csv").open()))) == 2
    assert sorted(p.name for p in trained.iterdir()) == ["dataset.json", "fold_0", "plans.json"]

    size = ["8", "16", "16"] if dim == 3 else ["16", "16"]
    assert run_erf(_parse(add_erf_arguments, [str(trained), "-o", "erf", "--num-inputs", "1", "--size", *size])) == 0
    assert "untrained initialisation" in capsys.readouterr().out
    _assert_picture(tmp_path / "erf" / "erf.png")
    radius = json.loads((tmp_path / "erf" / "erf.json").read_text())["radius_voxels"]
    assert set(radius) == {"trained", "untrained"} and all(r > 0 for r in radius.values())

    exported = tmp_path / "results" / "exported"
    export_model_folder(trained, exported)
    folded = write_masks(exported, tmp_path / "folded_masks")
    assert folded.folded and all(row["mode"] == "lrbm (folded)" and row["beta"] is None for row in folded.blocks)
    assert all(row["shown"].startswith("|W_deploy|") for row in folded.blocks)
    _assert_picture(folded.figure)
    folded_erf = write_erf(exported, tmp_path / "folded_erf", num_inputs=1, device="cpu")
    _assert_picture(folded_erf.figure)
    # Folding keeps the function, so the trained ERF is the same; the untrained one is the trainer's fresh init.
    model = load_rep3d_model(trained)
    reference = effective_receptive_field(model.network, (1, *CONFIGURATIONS[dim][1]), 1, 0, model.output_channel)
    np.testing.assert_allclose(folded_erf.erfs["trained"], reference, atol=1e-4)
    untrained = effective_receptive_field(build_untrained_network(model), (1, *CONFIGURATIONS[dim][1]), 1, 0, 1)
    np.testing.assert_array_equal(folded_erf.erfs["untrained"], untrained)


def test_a_model_folder_without_rep3d_blocks_is_rejected_with_what_a_rep3d_folder_is(tmp_path, rep3d_trainers):
    plain = write_model_folder(tmp_path, "nnUNetTrainer")
    with pytest.raises(ValueError, match="not a Rep3D model folder.*ModulatedDepthwiseConv.*Rep3D trainer"):
        write_masks(plain, tmp_path / "masks")
    with pytest.raises(ValueError, match="not a Rep3D model folder"):
        write_erf(plain, tmp_path / "erf", num_inputs=1)
    assert not (tmp_path / "masks").exists() and not (tmp_path / "erf").exists()


def test_a_folder_that_is_no_model_folder_or_lacks_the_checkpoint(tmp_path, rep3d_trainers):
    with pytest.raises(FileNotFoundError, match="not an nnU-Net model folder"):
        write_masks(tmp_path, tmp_path / "masks")
    folder = write_model_folder(tmp_path, "nnUNetTrainerRep3D")
    with pytest.raises(FileNotFoundError, match="no fold_3/checkpoint_final.pth.*fold_0/checkpoint_final.pth"):
        write_masks(folder, tmp_path / "masks", fold=3)
    with pytest.raises(ValueError, match="total stride"):
        write_erf(folder, tmp_path / "erf", size=[8, 16, 18], num_inputs=1)
    with pytest.raises(ValueError, match="one per axis"):
        write_erf(folder, tmp_path / "erf", size=[16, 16], num_inputs=1)
    assert not (tmp_path / "masks").exists() and not (tmp_path / "erf").exists()


def test_a_vanilla_model_shows_its_kernel_and_is_not_mistaken_for_an_export(tmp_path, rep3d_trainers):
    # Mode none has no training-only parameters, so its trained state dict looks like a folded one.
    folder = write_model_folder(tmp_path, "nnUNetTrainerRep3DVanilla", dim=2)
    report = write_masks(folder, tmp_path / "masks")
    assert not report.folded
    assert all(row["mode"] == "none" and row["shown"].startswith("|W_eff|") for row in report.blocks)
    _assert_picture(report.figure)


def test_erf_compares_other_model_folders_of_the_configuration(tmp_path, rep3d_trainers):
    rep3d = write_model_folder(tmp_path / "a", "nnUNetTrainerRep3D", dim=2)
    plain = write_model_folder(tmp_path / "b", "nnUNetTrainer", dim=2)
    report = write_erf(rep3d, tmp_path / "erf", num_inputs=1, device="cpu", compare=[plain])
    assert list(report.radius) == ["trained", "nnUNetTrainer", "untrained"]
    with pytest.raises(ValueError, match="not a Rep3D model folder"):  # compared, though it is no Rep3D folder
        load_rep3d_model(plain)
    _assert_picture(report.figure)
    other_configuration = write_model_folder(tmp_path / "c", "nnUNetTrainer", dim=3)
    with pytest.raises(ValueError, match="compare models of one configuration"):
        write_erf(rep3d, tmp_path / "erf2", num_inputs=1, device="cpu", compare=[other_configuration])
