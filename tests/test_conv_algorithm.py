"""The conv algorithm (frequency domain, direct, im2col): measured once per problem, cached, forced by name."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from capsx.errors import CapsxError
from capsx.models import conv_algorithm
from capsx.models.capsnet import PrimaryCaps
from capsx.models.conv_algorithm import Choice, Problem, batch_class, cache_path, choices_made, machine_key, verdict
from capsx.models.measured_conv import MeasuredConv2d


@pytest.fixture
def auto(tmp_path, monkeypatch):
    """An empty cache, no verdicts in this process, `auto`; counts the measurements made."""
    monkeypatch.setenv("CAPSX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CAPSX_CONV_ALGORITHM", raising=False)
    conv_algorithm.forget()
    measured = []
    real = conv_algorithm.measure

    def counting(problem, compute):
        measured.append(problem)
        return real(problem, compute)

    monkeypatch.setattr(conv_algorithm, "measure", counting)
    yield measured
    conv_algorithm.forget()


def _layer():
    torch.manual_seed(0)
    return PrimaryCaps(8, 2, 4, 9, 2)


def _took(y):
    name = y.grad_fn.name()
    return "fourier" if "FourierConv" in name else "direct" if "Convolution" in name else "im2col"


def test_a_problem_is_measured_once_then_read_back_by_a_later_process(auto):
    layer, x = _layer(), torch.rand(3, 8, 20, 20)
    first = layer.conv(x)
    second = layer.conv(x)
    (key, choice), = choices_made().items()
    assert key == "8x20x20->8 k9 s2 float32 train batch 4" and choice.source == "measured"
    assert len(auto) == 1 and _took(first) == _took(second) == choice.algorithm
    assert set(choice.ms) == {"fourier", "direct"} and min(choice.ms.values()) > 0  # 8*81 taps > 8 out: no im2col
    stored = json.loads(cache_path().read_text())[machine_key()][key]
    assert stored == {"algorithm": choice.algorithm, "ms": choice.ms}

    conv_algorithm.forget()  # as a new process on this machine: the file's verdict, no measurement
    assert _took(layer.conv(x)) == choice.algorithm
    assert choices_made()[key].source == "cached" and len(auto) == 1
    # described as when measured (the file keeps the times in its own order)
    assert choices_made()[key].describe() == choice.describe().replace("(measured)", "(cached)")
    with torch.no_grad():  # inference is its own problem
        layer.conv(x)
    assert len(auto) == 2 and "8x20x20->8 k9 s2 float32 infer batch 4" in choices_made()


def test_measuring_draws_nothing_from_the_global_generator_and_is_invisible_to_a_flop_counter(auto):
    layer, x = _layer(), torch.rand(5, 8, 20, 20)
    state = torch.get_rng_state()
    with FlopCounterMode(display=False) as measuring:
        layer.conv(x).sum().backward()
    assert len(auto) == 1 and torch.equal(torch.get_rng_state(), state)
    with FlopCounterMode(display=False) as again:
        layer.conv(x).sum().backward()
    assert measuring.get_total_flops() == again.get_total_flops() > 0


def test_the_first_verdict_written_wins_and_a_damaged_cache_is_replaced(auto):
    problem = Problem(4, 8, 20, 20, 8, 9, 2, "float32", True)
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text("{ not json")
    slow_fourier, slow_direct = {"fourier": 2.0, "direct": 1.0}, {"fourier": 1.0, "direct": 2.0}
    assert conv_algorithm._store(problem, Choice("direct", "measured", slow_fourier)).algorithm == "direct"
    # another process measured the opposite later: it adopts the stored verdict, so both compute alike
    assert conv_algorithm._store(problem, Choice("fourier", "measured", slow_direct)).algorithm == "direct"
    assert json.loads(cache_path().read_text())[machine_key()][problem.key]["algorithm"] == "direct"
    # an entry in an older layout (no per-algorithm times) is not trusted: measured again and replaced
    data = json.loads(cache_path().read_text())
    data[machine_key()][problem.key] = {"algorithm": "direct", "fourier_ms": 2.0, "direct_ms": 1.0}
    cache_path().write_text(json.dumps(data))
    assert conv_algorithm._stored(problem) is None


def test_an_algorithm_forced_by_name_is_taken_unmeasured_and_a_wrong_name_is_one_clear_error(auto, monkeypatch):
    layer, x = _layer(), torch.rand(3, 8, 20, 20)
    for name in ("fourier", "direct"):
        monkeypatch.setenv("CAPSX_CONV_ALGORITHM", name)
        assert _took(layer.conv(x)) == name
    assert auto == [] and not cache_path().exists()
    monkeypatch.setenv("CAPSX_CONV_ALGORITHM", "winograd")
    with pytest.raises(CapsxError, match="CAPSX_CONV_ALGORITHM='winograd': expected auto, fourier, direct or im2col"):
        layer.conv(x)


def test_what_the_transform_cannot_compute_takes_the_direct_conv_unmeasured(auto):
    x = torch.rand(2, 8, 10, 10)
    torch.manual_seed(0)
    for layer, inp in ((_layer().double().conv, torch.rand(2, 8, 20, 20, dtype=torch.double)),  # fp64
                       (MeasuredConv2d(8, 4, 4, padding="same"), x),  # an even kernel's 'same' is lopsided
                       (MeasuredConv2d(8, 4, 3, groups=2), x), (MeasuredConv2d(8, 4, 3, dilation=2), x),
                       (MeasuredConv2d(8, 4, (3, 5)), x), (MeasuredConv2d(8, 4, 3, padding=(1, 0)), x)):
        y = layer(inp)
        assert "Convolution" in y.grad_fn.name() and torch.allclose(y, torch.nn.Conv2d.forward(layer, inp))
    assert auto == []


def test_a_same_padded_stride_one_conv_is_measured_and_either_way_equals_conv2d(auto):
    torch.manual_seed(0)
    layer, x = MeasuredConv2d(8, 6, 5, padding="same"), torch.rand(3, 8, 12, 12)
    y = layer(x)
    (key, choice), = choices_made().items()
    assert key == "8x12x12->6 k5 s1 p2 float32 train batch 4" and _took(y) == choice.algorithm
    assert torch.allclose(y, torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=2), atol=1e-5)


def test_a_conv_with_a_short_reduction_also_measures_im2col_and_each_algorithm_equals_conv2d(auto):
    torch.manual_seed(0)
    layer, x = MeasuredConv2d(1, 16, 3, padding=1), torch.rand(5, 1, 10, 10, requires_grad=True)
    y = layer(x)
    (key, choice), = choices_made().items()
    assert key == "1x10x10->16 k3 s1 p1 float32 train batch 8" and set(choice.ms) == {"fourier", "direct", "im2col"}
    assert _took(y) == choice.algorithm and choice.algorithm == verdict(choice.ms)
    g = torch.randn_like(y)
    want = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    want_grads = torch.autograd.grad(want, (x, layer.weight, layer.bias), g)
    for algorithm in ("im2col", "fourier"):
        got = layer.compute(algorithm, x, layer.weight, layer.bias)
        assert _took(got) == algorithm and torch.allclose(got, want, atol=1e-5)
        for a, b in zip(torch.autograd.grad(got, (x, layer.weight, layer.bias), g), want_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-4), algorithm
    strided = MeasuredConv2d(2, 32, 3, stride=2, bias=False)  # no bias, stride 2: the plain product
    x2 = torch.rand(3, 2, 9, 9)
    assert torch.allclose(strided.compute("im2col", x2, strided.weight, None), strided.compute(
        "direct", x2, strided.weight, None), atol=1e-5)


def test_paper_layers_measure_im2col_for_conv1_only():
    from capsx.models.conv_algorithm import Problem, candidates

    conv1 = Problem(128, 1, 28, 28, 256, 9, 1, "float32", True)
    primary = Problem(128, 256, 20, 20, 256, 9, 2, "float32", True)
    assert candidates(conv1) == ("fourier", "direct", "im2col") and candidates(primary) == ("fourier", "direct")


def test_batch_classes_and_the_verdict():
    assert [batch_class(b) for b in (1, 2, 3, 96, 128, 129, 1000)] == [1, 2, 4, 128, 128, 256, 256]
    assert verdict({"fourier": 0.1, "direct": 0.2}) == "fourier"
    assert verdict({"fourier": 0.2, "direct": 0.1}) == verdict({"fourier": 0.1, "direct": 0.1}) == "direct"
    assert verdict({"fourier": 0.3, "direct": 0.2, "im2col": 0.1}) == "im2col"
    assert verdict({"fourier": 0.3, "direct": 0.1, "im2col": 0.1}) == "direct"
