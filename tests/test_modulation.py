"""The distance prior, the LRBM generator and the gradients that reach them."""

import pytest
import torch

from rep3d_nnunet.blocks import ModulatedDepthwiseConv
from rep3d_nnunet.modulation import DistancePrior, KernelModulation, LRBMGenerator, distance_from_centre


@pytest.mark.parametrize("kernel_size", [(21, 21, 21), (1, 21, 21), (5, 21, 21), (7, 7), (3, 9)])
def test_prior_is_one_at_centre_and_one_over_one_plus_distance(kernel_size):
    prior = DistancePrior(kernel_size)()
    assert prior.shape == kernel_size
    centre = tuple(k // 2 for k in kernel_size)
    assert prior[centre].item() == pytest.approx(1.0)
    torch.testing.assert_close(prior, 1.0 / (1.0 + distance_from_centre(kernel_size)))


def test_prior_strictly_decreases_with_distance():
    distance = distance_from_centre((9, 9, 9)).flatten()
    prior = DistancePrior((9, 9, 9))().flatten()
    order = torch.argsort(distance)
    d, p = distance[order], prior[order]
    farther = d[1:] > d[:-1] + 1e-6
    assert torch.all(p[1:][farther] < p[:-1][farther])
    same = ~farther
    torch.testing.assert_close(p[1:][same], p[:-1][same])


def test_spacing_scaled_prior_is_isotropic_in_millimetres():
    # 3.0 x 0.8 x 0.8 mm: one step along z is 3.75 steps along y in physical distance.
    prior = DistancePrior((5, 21, 21), spacing=(3.0, 0.8, 0.8))()
    centre = (2, 10, 10)
    one_z_step = prior[3, 10, 10]
    assert one_z_step.item() == pytest.approx(1.0 / (1.0 + 3.75))
    assert prior[2, 10, 11].item() == pytest.approx(0.5)  # the finest axis keeps index units
    diagonal = prior[3, 11, 10].item()
    assert diagonal == pytest.approx(1.0 / (1.0 + (3.75 ** 2 + 1.0) ** 0.5))
    assert prior[centre].item() == pytest.approx(1.0)


def test_mask_equals_prior_at_initialisation():
    modulation = KernelModulation(channels=4, kernel_size=(5, 7, 7), mode="lrbm")
    expected = DistancePrior((5, 7, 7))()
    mask = modulation()
    assert mask.shape == (4, 1, 5, 7, 7)
    torch.testing.assert_close(mask, expected.expand_as(mask))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("generator_kernel", [1, 3, 5, 7])
def test_generator_shapes(depth, generator_kernel):
    generator = LRBMGenerator(channels=3, kernel_size=(1, 9, 9), depth=depth, generator_kernel=generator_kernel)
    out = generator(torch.rand(1, 9, 9))
    assert out.shape == (3, 1, 1, 9, 9)
    # the generator's kernel never exceeds the large kernel's extent (1 on the flat axis)
    assert generator.convs[0].kernel_size == (1, min(generator_kernel, 9), min(generator_kernel, 9))


def _one_training_backward(conv: ModulatedDepthwiseConv) -> torch.Tensor:
    """Returns dL/dW_eff captured by a hook, after a backward of a random loss."""
    captured = {}
    conv.train()
    conv.zero_grad()
    x = torch.randn(2, conv.channels, 9, 10, 11)
    w_eff = conv.effective_weight()
    w_eff.register_hook(lambda g: captured.setdefault("grad", g))
    y = torch.nn.functional.conv3d(x, w_eff, conv.bias, padding=[k // 2 for k in conv.kernel_size], groups=conv.channels)
    (y * torch.randn_like(y)).sum().backward()
    return captured["grad"]


def test_gradient_of_weight_is_mask_times_gradient_of_effective_weight():
    conv = ModulatedDepthwiseConv(4, (5, 7, 7), modulation="lrbm", backend="direct")
    grad_w_eff = _one_training_backward(conv)
    torch.testing.assert_close(conv.weight.grad, conv.mask().detach() * grad_w_eff)


def test_gradients_reach_beta_and_every_generator_parameter():
    conv = ModulatedDepthwiseConv(4, (5, 7, 7), modulation="lrbm", backend="direct")
    generator = conv.modulation.generator
    last_norm = generator.norms[-1]

    _one_training_backward(conv)
    beta_grad = conv.modulation.prior.beta_raw.grad
    assert beta_grad is not None and torch.isfinite(beta_grad) and beta_grad != 0
    # The last norm's gain starts at 0 (M == P): on the first step only that gate learns.
    for p in last_norm.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

    # Once the gate has moved, the gradient reaches every generator parameter.
    torch.optim.SGD(conv.parameters(), lr=0.1).step()
    _one_training_backward(conv)
    for name, p in conv.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_forward_never_replaces_the_parameter_and_is_deterministic():
    conv = ModulatedDepthwiseConv(3, 7, dim=3, modulation="lrbm", backend="direct").train()
    weight = conv.weight
    before = weight.detach().clone()
    x = torch.randn(1, 3, 8, 8, 8)
    first = conv(x)
    second = conv(x)
    assert conv.weight is weight
    torch.testing.assert_close(conv.weight.detach(), before)
    torch.testing.assert_close(first, second)


def test_eval_mask_cache_follows_parameter_updates():
    conv = ModulatedDepthwiseConv(2, 5, dim=3, modulation="lrbm", backend="direct")
    conv.modulation.generator.norms[-1].weight.data.fill_(0.5)
    conv.eval()
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.no_grad():
        first = conv(x)
        conv.modulation.generator.norms[-1].bias.add_(0.3)  # an in-place update, as an optimizer does
        second = conv(x)
    with torch.enable_grad():
        reference = conv(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, reference.detach())


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        ({"kernel_size": 20}, "odd"),
        ({"kernel_size": (5, 20, 21)}, "odd"),
        ({"modulation": "lrbm2"}, "lrbm, fixed, none, csla"),
        ({"generator_depth": 4}, "(1, 2, 3)"),
        ({"generator_depth": 0}, "(1, 2, 3)"),
        ({"generator_kernel": 9}, "(1, 3, 5, 7)"),
    ],
)
def test_bad_configuration_names_the_allowed_values(kwargs, allowed):
    arguments = {"channels": 2, "kernel_size": 7, "dim": 3, **kwargs}
    with pytest.raises(ValueError, match=allowed.replace("(", r"\(").replace(")", r"\)")):
        ModulatedDepthwiseConv(**arguments)
