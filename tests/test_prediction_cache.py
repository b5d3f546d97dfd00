"""What nnU-Net's predictor does per case (load every fold's weights, slide windows, mirror): the LRBM masks are
computed once per distinct set of weights, kernels are transformed once per weights and tile shape, and the
results stay exactly those of the uncached network and of the folded export."""

from __future__ import annotations

import copy

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from rep3d_nnunet import ops
from rep3d_nnunet.backend_choice import choose_backend
from rep3d_nnunet.blocks import ModulatedDepthwiseConv
from rep3d_nnunet.config import Rep3DSettings
from rep3d_nnunet.export import fold
from rep3d_nnunet.modulation import KernelModulation
from tests.helpers import build

PATCH = (8, 16, 16)


def _fold_weights(network: torch.nn.Module, seed: int) -> dict:
    """A state dict with every parameter moved, as a separately trained fold would have (generator gains != 0)."""
    generator = torch.Generator().manual_seed(seed)
    state = copy.deepcopy(network.state_dict())
    for key, value in state.items():
        if value.is_floating_point():
            value.add_(0.1 * torch.randn(value.shape, generator=generator))
    return state


def _predictor(network: torch.nn.Module, folds: list[dict], mirroring: bool = True) -> nnUNetPredictor:
    configuration = {"patch_size": list(PATCH), "spacing": [1.0] * 3,
                     "architecture": {"network_class_name": "built in the test", "arch_kwargs": {}}}
    plans = PlansManager({"dataset_name": "cache", "plans_name": "cache", "configurations": {"3d_fullres": configuration}})
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans, ConfigurationManager(configuration), folds,
                                    {"labels": {"background": 0, "a": 1, "b": 2}}, "test", (0, 1, 2))
    return predictor


@pytest.fixture
def mask_computations(monkeypatch):
    """Counts KernelModulation forwards, i.e. computations of a mask."""
    calls = []
    original = KernelModulation.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KernelModulation, "forward", counting)
    return calls


def test_an_ensemble_prediction_computes_each_mask_once_per_fold(mask_computations):
    torch.manual_seed(0)
    network = build(Rep3DSettings(modulation="lrbm"), patch=PATCH, deep_supervision=False).eval()
    modulations = [m for m in network.modules() if isinstance(m, KernelModulation)]
    folds = [_fold_weights(network, seed) for seed in range(3)]
    # mirroring off: the flips add forwards, not weight loads (the kernel test below covers them)
    predictor = _predictor(network, folds, mirroring=False)
    cases = [torch.randn(1, *PATCH, generator=torch.Generator().manual_seed(c)) for c in range(2)]
    logits = [predictor.predict_logits_from_preprocessed_data(case) for case in cases]
    # every case loads each fold's weights again: still one mask per block and fold
    assert len(mask_computations) == len(modulations) * len(folds)
    assert all(mask_computations.count(m) == len(folds) for m in modulations)

    # exactly what each fold's network computes without any cache (a fresh network per fold), averaged
    reference = []
    for state in folds:
        fresh = build(Rep3DSettings(modulation="lrbm"), patch=PATCH, deep_supervision=False)
        fresh.load_state_dict(state)
        reference.append(_predictor(fresh.eval(), [state], mirroring=False).predict_logits_from_preprocessed_data(
            cases[-1]))
    torch.testing.assert_close(logits[-1], sum(reference) / len(reference), rtol=0, atol=0)


def test_reloading_the_same_weights_keeps_the_mask_and_new_weights_replace_it(mask_computations):
    conv = ModulatedDepthwiseConv(4, 7, dim=3, modulation="lrbm").eval()
    with torch.no_grad():
        conv.modulation.generator.norms[-1].weight.fill_(0.5)
    state = copy.deepcopy(conv.state_dict())
    x = torch.randn(1, 4, 6, 8, 8)
    with torch.no_grad():
        first = conv(x)
        for _ in range(3):
            conv.load_state_dict(state)  # bumps every version counter, contents unchanged
            torch.testing.assert_close(conv(x), first, rtol=0, atol=0)
        assert len(mask_computations) == 1
        changed = copy.deepcopy(state)
        changed["modulation.generator.norms.1.bias"] += 0.25
        conv.load_state_dict(changed)
        second = conv(x)
    assert len(mask_computations) == 2 and not torch.allclose(first, second)
    with torch.enable_grad():  # the training path, uncached, agrees
        torch.testing.assert_close(second, conv(x).detach())


def test_the_kernel_is_transformed_once_per_weights_and_input_shape(monkeypatch):
    prepared = []
    original = ops.prepare_kernel
    monkeypatch.setattr("rep3d_nnunet.blocks.prepare_kernel",
                        lambda *args, **kwargs: prepared.append(1) or original(*args, **kwargs))
    conv = ModulatedDepthwiseConv(3, 9, dim=3, modulation="lrbm", backend="fft").eval()
    with torch.inference_mode():
        for _ in range(4):  # tiles and flips of one shape
            conv(torch.randn(1, 3, 8, 10, 12).flip(2))
        assert len(prepared) == 1
        conv(torch.randn(1, 3, 8, 10, 10))  # another shape
        assert len(prepared) == 2
    with torch.no_grad():
        conv.weight.mul_(2)  # new weights
        conv(torch.randn(1, 3, 8, 10, 10))
    assert len(prepared) == 3
    conv.train()
    conv(torch.randn(1, 3, 8, 10, 10)).sum().backward()  # training never uses it
    assert len(prepared) == 3 and conv.weight.grad is not None


@pytest.mark.parametrize("modulation", ["lrbm", "fixed", "none", "csla"])
def test_cached_eval_forward_equals_the_folded_export_bit_for_bit(modulation):
    torch.manual_seed(1)
    network = build(Rep3DSettings(modulation=modulation), patch=PATCH, deep_supervision=False)
    network.load_state_dict(_fold_weights(network, 3))
    network.eval()
    folded = fold(copy.deepcopy(network))
    x = torch.randn(2, 1, *PATCH)
    with torch.inference_mode():
        trained = [network(x) for _ in range(2)]
        deployed = folded(x)
    torch.testing.assert_close(trained[0], trained[1], rtol=0, atol=0)
    torch.testing.assert_close(trained[0], deployed, rtol=0, atol=0)


def test_float64_masks_never_take_torchs_slow_convolution():
    # oneDNN has no float64 convolution: a 7^3 generator conv over a 21^3 kernel must go through the FFT
    assert choose_backend((1, 32, 21, 21, 21), 7, "cpu", requires_grad=False, dtype=torch.float64) == "fft"
    assert choose_backend((1, 32, 21, 21, 21), 3, "cpu", requires_grad=False, dtype=torch.float64) == "direct"


def _eval_output(conv: ModulatedDepthwiseConv, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return conv(x)


def _uncached_output(conv: ModulatedDepthwiseConv, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        return conv(x).detach()


@pytest.mark.parametrize("write", ["data", "vector_to_parameters", "modulation_data"])
def test_cached_eval_forwards_notice_weight_writes_that_bump_no_version(write):
    """Writes through ``.data`` (EMA code, weight surgery) and ``vector_to_parameters`` change neither the version
    counter nor, for ``.data`` writes, the data pointer: the cached eval forward used to return the old output."""
    conv = ModulatedDepthwiseConv(3, 7, dim=3, modulation="lrbm", backend="fft").eval()
    with torch.no_grad():
        conv.modulation.generator.norms[-1].weight.fill_(0.5)
    x = torch.randn(1, 3, 6, 8, 8)
    before = _eval_output(conv, x)
    if write == "data":
        conv.weight.data.mul_(2.0)
    elif write == "vector_to_parameters":
        vector = torch.nn.utils.parameters_to_vector(conv.parameters())
        torch.nn.utils.vector_to_parameters(vector * 1.5, conv.parameters())
    else:
        conv.modulation.generator.norms[-1].bias.data.add_(0.3)
    after = _eval_output(conv, x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _uncached_output(conv, x), rtol=1e-5, atol=1e-6)


def test_eval_caches_stay_within_their_byte_budget_and_are_released(monkeypatch):
    from rep3d_nnunet import eval_cache

    eval_cache.release()
    convs = [ModulatedDepthwiseConv(4, 9, dim=3, modulation="lrbm", backend="fft").eval() for _ in range(3)]
    x = torch.randn(1, 4, 10, 12, 12)
    for conv in convs:
        _eval_output(conv, x)
    held = eval_cache.bytes_held()
    per_conv = [eval_cache.bytes_held(conv) for conv in convs]
    assert held == sum(per_conv) and all(b > 0 for b in per_conv)
    # each conv keeps its mask (and snapshot) and its kernel spectrum (and snapshot): at least the spectrum's bytes
    spectrum = 4 * 14 * 16 * 9 * 8  # [C, *m] complex64: FFT sizes 14 x 16 x 16 (D + 4), the last axis halved + 1
    assert min(per_conv) > spectrum

    # a budget for about two convs: storing the third evicts the least recently used (the first), results unchanged
    eval_cache.release()
    monkeypatch.setenv(eval_cache.BUDGET_VARIABLE, str(2.5 * per_conv[0] / 2 ** 20))
    outputs = [_eval_output(conv, x) for conv in convs]
    assert eval_cache.bytes_held() <= 2.5 * per_conv[0]
    assert eval_cache.bytes_held(convs[0]) < per_conv[0] and eval_cache.bytes_held(convs[2]) == per_conv[2]
    torch.testing.assert_close(_eval_output(convs[0], x), outputs[0], rtol=0, atol=0)

    eval_cache.release(convs[1])
    assert eval_cache.bytes_held(convs[1]) == 0
    convs[2].train()  # training drops a module's entries
    assert eval_cache.bytes_held(convs[2]) == 0
    eval_cache.release()
    assert eval_cache.bytes_held() == 0
    monkeypatch.setenv(eval_cache.BUDGET_VARIABLE, "0")  # nothing kept, results unchanged
    torch.testing.assert_close(_eval_output(convs[0], x), outputs[0], rtol=0, atol=0)
    assert eval_cache.bytes_held() == 0
    monkeypatch.setenv(eval_cache.BUDGET_VARIABLE, "lots")
    with pytest.raises(ValueError, match="REP3D_EVAL_CACHE_MB='lots' is not a number of megabytes"):
        _eval_output(convs[0], x)


def test_a_deleted_network_leaves_nothing_in_the_cache():
    import gc

    from rep3d_nnunet import eval_cache

    eval_cache.release()
    conv = ModulatedDepthwiseConv(4, 9, dim=3, modulation="lrbm").eval()
    _eval_output(conv, torch.randn(1, 4, 8, 8, 8))
    assert eval_cache.bytes_held() > 0
    del conv
    gc.collect()
    assert eval_cache.bytes_held() == 0
