"""Depthwise conv backends: the FFT path against torch's conv, gradients, autocast, the backend choice, bad inputs."""

import random

import pytest
import torch
import torch.nn.functional as F

from rep3d_nnunet.backend_choice import choose_backend
from rep3d_nnunet.fft_maths import fft_backward, fft_forward
from rep3d_nnunet.kernel_geometry import conv_plan, fft_workspace_voxels, next_smooth_size
from rep3d_nnunet.ops import depthwise_conv, fan_out_conv


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _random_cases(count: int, seed: int = 1234):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        dim = rng.choice((2, 3, 3))
        channels = rng.choice((1, 2, 3, 5, 8, 16, 64))
        # Fewer voxels for many channels keeps every case a few milliseconds.
        top = 7 if channels > 8 else 11
        spatial = tuple(rng.randint(1 if dim == 3 else 3, top) for _ in range(dim))
        kernel = tuple(rng.choice((1, 3, 5, 7, 9, 13, 21)) for _ in range(dim))
        cases.append((rng.randint(1, 2), channels, spatial, kernel))
    return cases


FIXED_CASES = [
    (1, 4, (6, 6, 6), (21, 21, 21)),  # kernel much larger than the map: cropped to 11^3
    (2, 3, (5, 12, 11), (1, 7, 7)),  # anisotropic, flat axis untransformed
    (1, 2, (7, 10, 9), (5, 9, 9)),  # anisotropic, odd and even sizes
    (2, 8, (9, 8), (7, 7)),  # 2D
    (1, 3, (13, 6), (3, 21)),  # 2D, one axis cropped
    (1, 64, (4, 5, 6), (3, 3, 3)),  # many channels
    (2, 2, (1, 9, 8), (3, 5, 5)),  # singleton depth: its radius is 0
    (1, 3, (5, 6, 7), (1, 1, 1)),  # no transformed axis at all
]


@pytest.mark.parametrize("batch,channels,spatial,kernel", FIXED_CASES + _random_cases(14))
def test_fft_matches_direct_outputs_and_gradients(batch, channels, spatial, kernel):
    torch.manual_seed(hash((batch, channels, spatial, kernel)) % 2 ** 31)
    x = torch.randn(batch, channels, *spatial, requires_grad=True)
    weight = torch.randn(channels, 1, *kernel, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    grad_out = torch.randn(batch, channels, *spatial)

    results = {}
    for backend in ("direct", "fft"):
        y = depthwise_conv(x, weight, bias, backend=backend)
        results[backend] = (y, *torch.autograd.grad(y, (x, weight, bias), grad_out))
    conv = F.conv3d if len(spatial) == 3 else F.conv2d
    reference = conv(x, weight, bias, padding=[k // 2 for k in kernel], groups=channels)
    reference = (reference, *torch.autograd.grad(reference, (x, weight, bias), grad_out))

    for name, direct, ref in zip(("output", "grad x", "grad w", "grad b"), results["direct"], reference):
        assert _relative(direct, ref) < 1e-5, name  # cropping the direct conv's kernel is exact
    for name, fft, direct in zip(("output", "grad x", "grad w", "grad b"), results["fft"], results["direct"]):
        assert fft.shape == direct.shape and fft.dtype == direct.dtype, name
        assert _relative(fft, direct) < 1e-4, name


@pytest.fixture
def one_thread():
    """Hundreds of tiny FFTs: with 2 OpenMP threads on a busy 2-core machine each call waits ~30x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("spatial,kernel", [((2, 3, 4), (5, 3, 3)), ((4, 5), (9, 3))])  # the first axis is cropped
def test_fft_gradcheck_float64(spatial, kernel, one_thread):
    torch.manual_seed(0)
    x = torch.randn(1, 1, *spatial, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 1, *kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: depthwise_conv(a, w, b, backend="fft"), (x, weight, bias))


@pytest.mark.parametrize("backend", ["fft", "direct"])
def test_cropped_taps_get_exactly_zero_gradient(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 6)
    weight = torch.randn(3, 1, 21, 21, 21, requires_grad=True)
    depthwise_conv(x, weight, backend=backend).square().sum().backward()
    # Radii min(10, D - 1) = (3, 4, 5) around the centre 10.
    inside = torch.zeros_like(weight, dtype=torch.bool)
    inside[:, :, 7:14, 6:15, 5:16] = True
    assert torch.all(weight.grad[~inside] == 0)
    assert torch.all(weight.grad[inside] != 0)


def test_fft_size_bound_is_tight():
    """n = D + r is exact along every axis; one less aliases (checks the derivation in the module docstring)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 5, requires_grad=True)
    weight = torch.randn(2, 1, 5, 5, requires_grad=True)
    expected = F.conv2d(x, weight, padding=2, groups=2)
    grads_expected = torch.autograd.grad(expected, (x, weight), torch.ones_like(expected))
    plan = conv_plan((6, 5), (5, 5))
    # Sizes need not be smooth for correctness; the plan rounds them up only for speed.
    for sizes, exact in (((8, 7), True), ((7, 7), False), ((8, 6), False)):
        sized = plan._replace(fft_sizes=sizes)
        y = fft_forward(x, weight, None, sized, torch.float32)
        grads = fft_backward(torch.ones_like(y), x, weight, sized, torch.float32, need_x=True, need_w=True)
        errors = [_relative(y, expected)] + [_relative(g, e) for g, e in zip(grads, grads_expected)]
        assert (max(errors) < 1e-5) == exact, (sizes, errors)


def test_autocast_bfloat16_on_cpu_follows_the_direct_conv_dtype():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 10, 11, requires_grad=True)
    weight = torch.randn(4, 1, 7, 7, 7, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    reference = depthwise_conv(x, weight, bias, backend="direct")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        direct = depthwise_conv(x, weight, bias, backend="direct")
        fft = depthwise_conv(x, weight, bias, backend="fft")
    assert direct.dtype == torch.bfloat16 and fft.dtype == direct.dtype
    assert _relative(fft.float(), reference) < 1e-2  # bf16 rounding of the result only; the FFT ran in float32
    fft.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32 and bias.grad is not None


def test_autocast_with_half_precision_activation_saves_it_uncast():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 7, 8).bfloat16().requires_grad_()  # as a previous autocast layer would hand it over
    weight = torch.randn(3, 1, 9, 9, 9, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = depthwise_conv(x, weight, backend="fft")
    node = y.grad_fn
    while "fft_depthwise_conv" not in type(node).__name__:
        node = node.next_functions[0][0]
    # Only x and the weight, uncast: the same memory torch's conv would hold for backward.
    assert [t.data_ptr() for t in node.saved_tensors] == [x.data_ptr(), weight.data_ptr()]
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32


def test_half_precision_inputs_outside_autocast_keep_their_dtype():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 7, 8)
    weight = torch.randn(2, 1, 5, 5, 5)
    y = depthwise_conv(x.bfloat16(), weight.bfloat16(), backend="fft")
    assert y.dtype == torch.bfloat16
    assert _relative(y.float(), depthwise_conv(x, weight, backend="direct")) < 2e-2


def test_channels_last_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, 7).to(memory_format=torch.channels_last_3d)
    weight = torch.randn(3, 1, 5, 5, 5)
    assert _relative(depthwise_conv(x, weight, backend="fft"), depthwise_conv(x, weight, backend="direct")) < 1e-5


def test_auto_backend_choice():
    shape = (1, 32, 32, 32, 32)
    assert choose_backend(shape, 3, "cpu") == "direct"
    assert choose_backend(shape, 1, "cpu") == "direct"
    assert choose_backend(shape, 21, "cpu") == "fft"
    assert choose_backend(shape, (5, 21, 21), "cpu") == "fft"
    assert choose_backend((2, 48, 64, 64, 64), 3, "cuda") == "direct"
    assert choose_backend((2, 48, 64, 64, 64), 21, "cuda") == "fft"
    assert choose_backend((1, 4, 6, 6, 6), 7, "cuda") == "direct"  # tiny work: fixed per-call costs dominate
    assert choose_backend((1, 48, 21, 21, 21), 7, "cuda") == "direct"  # a 7^3 generator conv on a kernel tensor
    # A 21^3 kernel on a 1^3 map is one tap after cropping.
    assert choose_backend((2, 384, 1, 1, 1), 21, "cpu") == "direct"


def test_auto_backend_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, 8)
    weight = torch.randn(2, 1, 21, 21, 21)
    expected = F.conv3d(x, weight, padding=10, groups=2)
    assert _relative(depthwise_conv(x, weight, backend="auto"), expected) < 1e-5


def test_next_smooth_size():
    def smooth(n):
        for p in (2, 3, 5, 7):
            while n % p == 0:
                n //= p
        return n == 1

    for m in range(1, 300):
        n = next_smooth_size(m)
        assert n >= m and smooth(n) and not any(smooth(j) for j in range(m, n))


def test_fft_workspace_voxels():
    # D = 32, r = 10: n = 42; the half-spectrum has 42 * 42 * 22 complex values.
    spectrum = 42 * 42 * 22
    assert fft_workspace_voxels((32, 32, 32), 21) == 4 * 2 * spectrum + 42 ** 3
    assert fft_workspace_voxels((8, 8, 8), (1, 1, 1)) == 0
    # A flat axis (radius 0) is not transformed and is not padded.
    assert fft_workspace_voxels((1, 16, 16), (1, 7, 7)) == 4 * 2 * 20 * 11 + 20 * 20  # n = 20 >= 16 + 3
    assert fft_workspace_voxels((16, 16), 21) > 0


@pytest.mark.parametrize(
    "x_shape,w_shape,bias_shape,backend,match",
    [
        ((1, 2, 5, 5, 5), (2, 1, 3, 3, 3), None, "fast", "allowed values are 'auto', 'direct', 'fft'"),
        ((1, 2, 5, 5, 5), (2, 1, 4, 3, 3), None, "fft", "positive odd"),
        ((1, 2, 5, 5, 5), (3, 1, 3, 3, 3), None, "auto", "2 channels"),
        ((1, 2, 5, 5, 5), (2, 2, 3, 3, 3), None, "direct", r"\[C, 1, \*k\]"),
        ((1, 2, 5, 5, 5), (2, 1, 3, 3), None, "fft", r"\[C, 1, \*k\]"),
        ((1, 2, 5), (2, 1, 3), None, "fft", "2 or 3 spatial axes"),
        ((1, 2, 5, 5, 5), (2, 1, 3, 3, 3), (3,), "fft", "Bias must have shape"),
    ],
)
def test_bad_inputs_raise_value_error(x_shape, w_shape, bias_shape, backend, match):
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=match):
        depthwise_conv(torch.zeros(x_shape), torch.zeros(w_shape), bias, backend=backend)


def test_even_kernel_rejected_by_choose_backend():
    with pytest.raises(ValueError, match="positive odd"):
        choose_backend((1, 2, 8, 8, 8), 4, "cpu")


@pytest.mark.parametrize("backend", ["fft", "direct"])
@pytest.mark.parametrize(
    "spatial,kernel",
    [((9, 10, 11), (7, 7, 7)), ((1, 12, 12), (1, 5, 5)), ((3, 5, 6), (7, 7, 7)), ((8, 9), (5, 5)), ((4, 4, 4), (1, 1, 1))],
)
def test_fan_out_conv_matches_depthwise_conv_on_the_expanded_input(backend, spatial, kernel):
    """The LRBM generator's first conv: one input channel read by every filter."""
    torch.manual_seed(0)
    channels = 4
    x = torch.randn(2, 1, *spatial, requires_grad=True)
    weight = torch.randn(channels, 1, *kernel, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    grad_y = torch.randn(2, channels, *spatial)
    results = []
    for conv in (
        lambda: fan_out_conv(x, weight, bias, backend=backend),
        lambda: depthwise_conv(x.expand(2, channels, *spatial), weight, bias, backend="direct"),
    ):
        for t in (x, weight, bias):
            t.grad = None
        y = conv()
        (y * grad_y).sum().backward()
        results.append((y.detach(), x.grad.clone(), weight.grad.clone(), bias.grad.clone()))
    for name, got, expected in zip(("output", "grad x", "grad w", "grad b"), *results):
        assert got.shape == expected.shape, name
        assert _relative(got, expected) < 1e-4, name


def test_fan_out_conv_gradcheck_float64(one_thread):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 3, 5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: fan_out_conv(a, w, b, backend="fft"), (x, weight, bias))


@pytest.mark.parametrize(
    "x_shape,w_shape,match",
    [((1, 3, 5, 5, 5), (4, 1, 3, 3, 3), "one channel"), ((1, 1, 5, 5, 5), (4, 2, 3, 3, 3), r"\[C, 1, \*k\]")],
)
def test_fan_out_conv_bad_inputs(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        fan_out_conv(torch.zeros(x_shape), torch.zeros(w_shape))
