"""The frequency-domain convolution against torch's own conv2d, and its use in PrimaryCaps."""

import pytest
import torch
import torch.nn.functional as F

from capsx.models import MODELS, build_model, fourier_conv
from capsx.models.fourier_conv import expanding_mm, fourier_conv2d, half_spectrum, half_spectrum_adjoint
from capsx.models.reference import ReferenceCapsNet

pytestmark = pytest.mark.numerics  # run again under a lower CPU capability (tests/lower_isa.py)

CASES = [  # (B, C, H, W), (O, kh, kw), stride, padding
    ((2, 3, 20, 20), (4, 9, 9), 2, 0),  # the paper's PrimaryCaps shape, narrowed
    ((3, 2, 13, 11), (5, 5, 3), 2, 0),  # odd sizes, a non-square kernel: the half spectrum's odd width
    ((1, 4, 10, 12), (2, 3, 3), 1, 0),
    ((2, 2, 17, 16), (3, 4, 6), 3, 0),  # strides that leave input rows unused
    ((2, 1, 7, 7), (3, 7, 7), 2, 0),  # kernel as large as the input: one output position
    ((2, 3, 12, 12), (4, 5, 5), 1, 2),  # the baseline CNN's 'same' 5x5, narrowed
    ((2, 2, 9, 8), (3, 3, 5), 1, (1, 2)),  # 'same' for a non-square kernel on an odd-by-even map
    ((1, 2, 11, 10), (3, 5, 5), 2, 1),  # padding with a stride
    ((1, 2, 3, 3), (2, 5, 5), 1, 2),  # kernel larger than the map, padding makes room
]


@pytest.mark.parametrize("xs, ws, stride, padding", CASES)
def test_output_and_gradients_equal_conv2d(xs, ws, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(*xs, dtype=torch.double, requires_grad=True)
    w = torch.randn(ws[0], xs[1], ws[1], ws[2], dtype=torch.double, requires_grad=True)
    b = torch.randn(ws[0], dtype=torch.double, requires_grad=True)
    y = fourier_conv2d(x, w, b, stride, padding)
    ref = F.conv2d(x, w, b, stride=stride, padding=padding)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-10)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for name, got, want in zip("xwb", grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-10), name


def test_chunked_inference_with_padding_equals_conv2d():
    torch.manual_seed(0)
    x, w = torch.randn(5, 3, 8, 8, dtype=torch.double), torch.randn(4, 3, 5, 5, dtype=torch.double)
    with torch.no_grad():
        assert torch.allclose(fourier_conv2d(x, w, None, 1, 2, chunk=2), F.conv2d(x, w, padding=2), atol=1e-10)


@pytest.mark.parametrize("h, w, H, W", [(20, 20, 20, 20), (7, 10, 7, 10), (9, 9, 20, 20), (3, 4, 7, 10)])
def test_the_separable_half_spectrum_is_torchs_rfft2_and_its_conjugate(h, w, H, W):
    torch.manual_seed(0)
    maps = torch.randn(3, h, w, dtype=torch.double)
    want = torch.fft.rfft2(maps, s=(H, W))  # zero-padded to H x W
    for sign, expect in ((-1, want), (+1, want.conj())):
        X = half_spectrum(maps, H, W, sign).view(3, H, W // 2 + 1, 3).permute(0, 3, 1, 2)
        assert torch.allclose(X[0], expect.real, atol=1e-10) and torch.allclose(X[1], expect.imag, atol=1e-10)
        assert torch.allclose(X[2], expect.real + expect.imag, atol=1e-10)  # the sum Gauss's third product takes


def test_the_half_spectrum_adjoint_is_its_transpose():
    torch.manual_seed(0)
    maps, spectra = torch.randn(4, 5, 3, dtype=torch.double), torch.randn(3, 8 * 4, 4, dtype=torch.double)
    # <A x, y> = <x, A^T y> for the linear map A
    lhs = (half_spectrum(maps, 8, 6, -1) * spectra).sum()
    rhs = (maps * half_spectrum_adjoint(spectra, 5, 3, 8, 6, -1)).sum()
    assert torch.allclose(lhs, rhs, atol=1e-10)


def test_gradcheck_without_bias():
    x = torch.randn(2, 2, 8, 7, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 2, 3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fourier_conv2d(x, w, None, 2), (x, w))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="larger than the padded input"):
        fourier_conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="expected x"):
        fourier_conv2d(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2, 2))


def _graph(t):
    """The names of every autograd node that produced t."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return names


def _paper_like_pair():
    kwargs = {"conv1_channels": 32, "primary_types": 4, "decoder_hidden": [32, 64]}
    torch.manual_seed(0)
    fast = build_model(MODELS.get("capsnet")(**kwargs), (1, 28, 28), 10)
    ref = ReferenceCapsNet((1, 28, 28), 10, **{**kwargs, "decoder_hidden": (32, 64)})
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def test_fp32_capsnet_takes_the_fourier_path_and_matches_the_direct_reference(monkeypatch):
    fast, ref = _paper_like_pair()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 5, 9, 0])
    h = torch.relu(fast.conv1(x))
    monkeypatch.setenv("CAPSX_CONV_ALGORITHM", "direct")
    assert "Convolution" in fast.primary_caps.conv(h).grad_fn.name()
    monkeypatch.setenv("CAPSX_CONV_ALGORITHM", "fourier")
    assert "FourierConv" in fast.primary_caps.conv(h).grad_fn.name()
    assert not any("FourierConv" in name for name in _graph(ref(x, y).capsules))  # the reference stays direct
    of, orf = fast(x, y), ref(x, y)
    assert torch.allclose(of.capsules, orf.capsules, rtol=1e-4, atol=1e-6)
    assert torch.allclose(of.reconstruction, orf.reconstruction, rtol=1e-4, atol=1e-6)
    (of.scores.sum() + of.reconstruction.sum()).backward()
    (orf.scores.sum() + orf.reconstruction.sum()).backward()
    for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.allclose(pf.grad, pr.grad, rtol=1e-3, atol=1e-6 * pr.grad.abs().max()), name


def test_bf16_autocast_runs_the_fourier_path_in_bf16_within_bf16_error(monkeypatch):
    fast, _ = _paper_like_pair()
    monkeypatch.setenv("CAPSX_CONV_ALGORITHM", "fourier")
    h = torch.rand(4, 32, 20, 20)
    exact = torch.nn.functional.conv2d(
        h.double(), fast.primary_caps.conv.weight.double(), fast.primary_caps.conv.bias.double(), stride=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast.primary_caps.conv(h)
        conv = fast.primary_caps.conv
        direct = F.conv2d(h, conv.weight, conv.bias, conv.stride)  # oneDNN's bf16 conv
    assert "FourierConv" in got.grad_fn.name() and got.dtype == direct.dtype == torch.bfloat16
    def rel(y):
        return ((y.double() - exact).norm() / exact.norm()).item()

    # measured with Gauss's three products: 5.6e-3 against oneDNN's 2.75e-3 on an AVX-512 CPU (4.8e-3 with
    # the complex product's four; bf16's own rounding step is 7.8e-3): the frequency-domain path within
    # 2.5x of the direct bf16 conv's error, under one bf16 rounding step
    assert rel(got) < 7e-3 and rel(direct) < 4e-3 and rel(got) < 2.5 * rel(direct)


def test_chunked_inference_equals_one_pass(monkeypatch):
    fast, _ = _paper_like_pair()
    h = torch.rand(7, 32, 20, 20)
    monkeypatch.setenv("CAPSX_CONV_ALGORITHM", "fourier")
    with torch.no_grad():
        whole = fast.primary_caps(h)
        monkeypatch.setattr(fast.primary_caps.conv, "FOURIER_CHUNK", 3)  # 7 samples -> chunks of 3, 3, 1
        chunked = fast.primary_caps(h)
    assert torch.allclose(whole, chunked, atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
def test_expanding_mm_in_column_blocks_equals_one_product(monkeypatch, transposed):
    monkeypatch.setattr(fourier_conv, "EXPANDING_COLUMNS", 7)  # blocks of 7 columns, the last one short
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 4, generator=g, dtype=torch.double)
    a = a.t().contiguous().t() if transposed else a  # the backward passes a transposed view
    b = torch.randn(4, 40, generator=g, dtype=torch.double)
    assert torch.allclose(expanding_mm(a, b), a @ b, atol=1e-12)
    narrow = torch.randn(4, 14, generator=g, dtype=torch.double)  # too few columns for two blocks
    assert torch.allclose(expanding_mm(a, narrow), a @ narrow, atol=1e-12)


def test_expanding_mm_under_autograd_keeps_the_gradient(monkeypatch):
    monkeypatch.setattr(fourier_conv, "EXPANDING_COLUMNS", 7)  # mm(out=) has no backward: one product
    g = torch.Generator().manual_seed(1)
    a = torch.randn(9, 4, generator=g, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, 40, generator=g, dtype=torch.double)
    expanding_mm(a, b).sum().backward()
    assert torch.allclose(a.grad, b.sum(dim=1).expand(9, 4), atol=1e-12)
