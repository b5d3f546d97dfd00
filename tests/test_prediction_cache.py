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


def _write(conv: ModulatedDepthwiseConv, write: str) -> None:
    """Changes the conv's weights the way nnU-Net and ordinary training code do."""
    generator_bias = conv.modulation.generator.norms[-1].bias
    if write == "load_state_dict":
        state = copy.deepcopy(conv.state_dict())
        state["modulation.generator.norms.1.bias"] += 0.3
        conv.load_state_dict(state)
    elif write == "optimizer_step":
        optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
        for p in conv.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    elif write == "no_grad":
        with torch.no_grad():
            conv.weight.mul_(2.0)
    elif write == "vector_to_parameters":
        vector = torch.nn.utils.parameters_to_vector(conv.parameters())
        torch.nn.utils.vector_to_parameters(vector * 1.5, conv.parameters())
    elif write == "data_assignment":
        generator_bias.data = generator_bias.data + 0.3
    elif write == "to":  # a round trip through another dtype: new storages holding other values
        conv.to(torch.float64)
        with torch.no_grad():
            conv.weight.mul_(2.0)
        conv.to(torch.float32)


@pytest.mark.parametrize("write", ["load_state_dict", "optimizer_step", "no_grad", "vector_to_parameters",
                                   "data_assignment", "to"])
def test_cached_eval_forwards_notice_every_weight_change(write):
    conv = ModulatedDepthwiseConv(3, 7, dim=3, modulation="lrbm", backend="fft").eval()
    with torch.no_grad():
        conv.modulation.generator.norms[-1].weight.fill_(0.5)
    x = torch.randn(1, 3, 6, 8, 8)
    before = _eval_output(conv, x)
    _write(conv, write)
    after = _eval_output(conv, x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _uncached_output(conv, x), rtol=0, atol=0)


@pytest.mark.parametrize("parameter", ["weight", "generator"])
def test_in_place_writes_through_data_are_the_documented_boundary(parameter):
    """``p.data.mul_(2)`` changes no host-side state (``.data`` is an alias with a version counter of its own, on the
    same storage): only a content comparison, a read-back per conv and forward, could see it. The cache does not pay
    that in every forward; it serves the old kernel until ``release`` (docs/performance.md, eval_cache's docstring)."""
    from rep3d_nnunet import eval_cache

    conv = ModulatedDepthwiseConv(3, 7, dim=3, modulation="lrbm", backend="fft").eval()
    x = torch.randn(1, 3, 6, 8, 8)
    before = _eval_output(conv, x)
    tensor = conv.weight if parameter == "weight" else conv.modulation.generator.norms[-1].bias
    version = tensor._version
    tensor.data.add_(0.3)
    assert tensor._version == version  # nothing on the host records the write
    torch.testing.assert_close(_eval_output(conv, x), before, rtol=0, atol=0)
    eval_cache.release(conv)
    after = _eval_output(conv, x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _uncached_output(conv, x), rtol=0, atol=0)


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the calls that read a tensor's value back to the host (a device synchronisation on a GPU)."""
    calls = []

    def counting(name, original):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return wrapper

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("equal", "allclose", "is_nonzero"):
        monkeypatch.setattr(torch, name, counting(name, getattr(torch, name)))
    return calls


def test_eval_forwards_read_nothing_back_while_the_weights_stay_and_once_per_conv_after_a_reload(host_reads):
    """Issue 30.2: the validity check used to compare every conv's weights with a snapshot in every forward (12 syncs
    per forward on nnU-Net's default 3D plan, times 8 mirror flips per tile). Now host-side state decides while the
    weights stay; after nnU-Net's predictor reloads a fold (same contents, new version counters) each cache entry is
    compared once (one read-back per conv), then served without one again."""
    torch.manual_seed(0)
    network = build(Rep3DSettings(modulation="lrbm"), patch=PATCH, deep_supervision=False).eval()
    convs = [m for m in network.modules() if isinstance(m, ModulatedDepthwiseConv)]
    state = copy.deepcopy(network.state_dict())
    x = torch.randn(1, 1, *PATCH)
    with torch.inference_mode():
        first = network(x)  # fills the cache
        host_reads.clear()
        for flip in range(3):  # the tiles and mirror flips of a case
            network(x.flip(2 + flip))
        assert host_reads == []
        network.load_state_dict(state)
        host_reads.clear()
        again = network(x)
        assert host_reads == ["__bool__"] * len(convs), host_reads  # one comparison per conv
        host_reads.clear()
        network(x)
        assert host_reads == []
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_eval_paths_compute_one_kernel_and_training_computes_it_to_rounding():
    """One eval formula: eval without autograd (cached), eval with autograd and a compiled-style uncached eval forward
    give the same numbers bit for bit (the export folds exactly what prediction applies); a training forward (float32
    mask) agrees to float rounding."""
    torch.manual_seed(0)
    conv = ModulatedDepthwiseConv(4, 9, dim=3, modulation="lrbm", backend="fft")
    with torch.no_grad():
        conv.modulation.generator.norms[-1].weight.fill_(0.5)
    x = torch.randn(2, 4, 7, 8, 9)
    training = conv.train()(x).detach()
    conv.eval()
    with torch.inference_mode():
        cached = [conv(x) for _ in range(2)]
    with torch.enable_grad():
        with_grad = conv(x).detach()
    for output in (cached[1], with_grad):
        torch.testing.assert_close(output, cached[0], rtol=0, atol=0)
    torch.testing.assert_close(cached[0], training, rtol=1e-5, atol=1e-6)


def test_the_eval_mask_does_not_depend_on_the_thread_count():
    """The folded kernels of an export (one process) are the kernels the training folder applies in another
    (nnUNetv2_predict, another thread count): the eval mask is the same whatever the threads."""
    torch.manual_seed(0)
    conv = ModulatedDepthwiseConv(16, 21, dim=3, modulation="lrbm", backend="fft").eval()
    with torch.no_grad():
        for parameter in conv.modulation.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    threads = torch.get_num_threads()
    masks = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            with torch.no_grad():
                masks.append(conv._eval_mask())
    finally:
        torch.set_num_threads(threads)
    for mask in masks[1:]:
        torch.testing.assert_close(mask, masks[0], rtol=0, atol=0)


def test_a_budget_below_the_working_set_still_serves_what_fits(mask_computations, monkeypatch):
    """Issue 30.2: least-recently-used eviction over the convolutions' cyclic order evicted every entry just before
    its next use (0 hits per pass). Now what fits stays and the rest is recomputed."""
    from rep3d_nnunet import eval_cache

    eval_cache.release()
    convs = [ModulatedDepthwiseConv(4, 9, dim=3, modulation="lrbm", backend="fft").eval() for _ in range(3)]
    x = torch.randn(1, 4, 10, 12, 12)
    _eval_output(convs[0], x)
    per_conv = eval_cache.bytes_held(convs[0])
    eval_cache.release()
    monkeypatch.setenv(eval_cache.BUDGET_VARIABLE, str(2.5 * per_conv / 2 ** 20))
    outputs = [_eval_output(conv, x) for conv in convs]
    mask_computations.clear()
    for _ in range(2):  # the next passes over the network's convs
        assert [_eval_output(conv, x) for conv in convs] and eval_cache.bytes_held() <= 2.5 * per_conv
    assert len(mask_computations) == 0  # every mask fits, and so do two of the three kernel spectra
    assert [eval_cache.bytes_held(conv) == per_conv for conv in convs] == [True, True, False]
    for conv, output in zip(convs, outputs):
        torch.testing.assert_close(_eval_output(conv, x), output, rtol=0, atol=0)

    # another network's convs take the budget over once the old entries sat unused for one of their passes
    others = [ModulatedDepthwiseConv(4, 9, dim=3, modulation="lrbm", backend="fft").eval() for _ in range(2)]
    for _ in range(2):
        for conv in others:
            _eval_output(conv, x)
    assert all(eval_cache.bytes_held(conv) == per_conv for conv in others)


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

    eval_cache.release(convs[1])
    assert eval_cache.bytes_held(convs[1]) == 0
    convs[2].train()  # training drops a module's entries
    assert eval_cache.bytes_held(convs[2]) == 0
    eval_cache.release()
    assert eval_cache.bytes_held() == 0
    reference = _uncached_output(convs[0], x)
    monkeypatch.setenv(eval_cache.BUDGET_VARIABLE, "0")  # nothing kept, results unchanged
    torch.testing.assert_close(_eval_output(convs[0], x), reference, rtol=0, atol=0)
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
