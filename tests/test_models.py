"""Contracts for every registered model, and the paper's numbers."""

import pytest
import torch

from capsx.models import MODELS, ModelOutput, build_model
from capsx.models.capsnet import CapsNet
from capsx.models.routing import RoutingTrace, dynamic_routing, routing_reference
from capsx.summary import summarize

SMALL = {  # keep every registered model cheap here; the paper sizes are checked by parameter count
    "capsnet": {"conv1_channels": 16, "primary_types": 4, "decoder_hidden": [32, 64]},
    "baseline_cnn": {"channels": [8, 8, 4], "hidden": [16, 8]},
    "convnet_small": {"channels": [4, 8], "hidden": [16]},
    "lenet": {"channels": [4, 8], "hidden": [16]},
    # the torchvision family at its own widths (cheap at 28-32 px), the classifiers narrowed
    "alexnet_small": {"classifier_width": 16},
    "vgg11": {"classifier_width": 16},
    "vgg16": {"classifier_width": 16},
    "resnet18": {},
    "resnet34": {},
    "densenet121": {},
    "googlenet": {},
    "efficient_capsnet": {"conv_channels": [8, 8, 8, 16], "decoder_hidden": [32, 64]},
    "matrix_capsnet": {"conv1_channels": 4, "primary_types": 2, "caps1_types": 4, "caps2_types": 2},
}
# Where 28x28 is too small (densenet's ImageNet stem) or too slow: 32x32 RGB, batch 2.
INPUT = {"densenet121": (2, 3, 32, 32), "googlenet": (2, 3, 32, 32)}
# Models cheap enough to train 100 steps in a test. The torchvision family is checked instead by its
# gradients here and by equivalence to torchvision's own models (test_classic.py).
OVERFIT = ["capsnet", "efficient_capsnet", "matrix_capsnet", "baseline_cnn", "convnet_small", "lenet"]


def test_every_registered_model_has_a_small_config_here():
    assert set(MODELS.names()) == set(SMALL)


@pytest.mark.parametrize("name", MODELS.names())
def test_output_shape_no_nan_and_gradient_on_every_parameter(name):
    cfg = MODELS.get(name)(**SMALL[name])
    B, *shape = INPUT.get(name, (3, 1, 28, 28))
    model = build_model(cfg, tuple(shape), num_classes=7)  # a non-default class count
    x = torch.rand(B, *shape)
    out = model(x, torch.tensor([0, 3, 6][:B]))
    assert isinstance(out, ModelOutput)
    assert out.scores.shape == (B, 7) and torch.isfinite(out.scores).all()
    loss = out.scores.sum() + (out.reconstruction.sum() if out.reconstruction is not None else 0)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"


@pytest.mark.parametrize("name", MODELS.names())
def test_non_square_multichannel_input(name):
    model = build_model(MODELS.get(name)(**SMALL[name]), (3, 32, 30), num_classes=4)
    out = model(torch.rand(2, 3, 32, 30))
    assert out.scores.shape == (2, 4)
    if out.reconstruction is not None:
        assert out.reconstruction.shape == (2, 3, 32, 30)


def test_paper_parameter_counts():
    capsnet = build_model(MODELS.get("capsnet")(), (1, 28, 28), 10)
    s = summarize(capsnet, (1, 28, 28))
    assert s.total_params == 8_215_568  # "8.2M"
    assert s.total_params - s.decoder_params == 6_804_224  # "6.8M without the decoder"
    assert [r.output_shape for r in s.layers[:3]] == [(256, 20, 20), (1152, 8), (10, 16)]
    cnn = build_model(MODELS.get("baseline_cnn")(), (1, 28, 28), 10)
    assert sum(p.numel() for p in cnn.parameters()) == 35_445_522  # "35.4M"


def test_matrix_capsnet_is_sized_as_its_paper_says_and_its_default_loss_is_spread():
    from capsx.recipe import recipe_from_dict

    model = build_model(MODELS.get("matrix_capsnet")(), (1, 32, 32), 5)  # smallNORB's 5 classes, Fig. 1
    count = sum(p.numel() for p in model.parameters())
    assert count == 316_394 and 300_000 <= count <= 320_000  # "about 310K" (A = B = C = D = 32)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.scores.shape == (2, 5) and out.capsules.shape == (2, 5, 16)
    assert ((out.scores >= 0) & (out.scores <= 1)).all()  # class activations, logistic
    raw = {"name": "m", "model": {"name": "matrix_capsnet"}, "data": {"name": "shapes"}}
    assert recipe_from_dict(raw, "t").loss_config.name == "spread"


def test_efficient_capsnet_is_sized_as_its_paper_says():
    model = build_model(MODELS.get("efficient_capsnet")(), (1, 28, 28), 10)
    s = summarize(model, (1, 28, 28))
    assert s.total_params - s.decoder_params == 161_824  # Mazzia et al. 2021: "161K", the authors' Keras count
    # the decoder: 160 -> 512 -> 1024 -> 784
    assert s.decoder_params == 160 * 512 + 512 + 512 * 1024 + 1024 + 1024 * 784 + 784
    caps = model.class_caps
    assert caps.weight.shape == (16, 10, 16, 8) and caps.prior.shape == (16, 10)  # 16 primary capsules of 8-D
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert model.features(x).shape == (2, 128, 9, 9) and model.primary(model.features(x)).shape == (2, 128, 1, 1)


@pytest.mark.numerics
def test_capsnet_forward_equals_reference_routing():
    model = build_model(MODELS.get("capsnet")(**SMALL["capsnet"]), (1, 28, 28), 10).double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.double)
    caps = model.class_caps
    h = torch.relu(model.conv1(x))
    u = model.primary_caps(h)
    # the public code's broadcast product: W (1, I, J, D, d) @ u (B, I, 1, d, 1)
    u_hat_ref = (caps.weight.unsqueeze(0) @ u[:, :, None, :, None]).squeeze(-1)
    assert torch.allclose(caps.predictions(u), u_hat_ref, atol=1e-12)
    assert torch.allclose(model.encode(x), routing_reference(u_hat_ref, caps.routing_iters), atol=1e-12)


@pytest.mark.numerics
@pytest.mark.parametrize("routing", ["leaky", "none", "attention"])
def test_capsnet_with_each_routing_equals_the_reference_model_and_trains_its_priors(routing):
    from capsx.models.reference import ReferenceCapsNet
    model = build_model(MODELS.get("capsnet")(**SMALL["capsnet"], routing=routing), (1, 28, 28), 10).double()
    assert (model.class_caps.prior is not None) == (routing == "attention")  # only attention adds a tensor
    if routing == "attention":
        assert model.class_caps.prior.shape == (model.class_caps.weight.shape[0], 10)
        with torch.no_grad():
            model.class_caps.prior.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    reference = ReferenceCapsNet((1, 28, 28), 10, **SMALL["capsnet"], routing=routing).double()
    reference.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 28, 28, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    out = model(x)
    assert torch.allclose(out.capsules, reference(x).capsules, atol=1e-12)
    out.scores.sum().backward()
    if routing == "attention":
        assert model.class_caps.prior.grad.abs().sum() > 0
    diagnosed = model.diagnostics(x)  # routing logits b_ij exist for dynamic and leaky only
    assert (sorted(diagnosed) == ["routing/delta_b_iter1", "routing/delta_b_iter2", "routing/delta_b_iter3"]
            if routing == "leaky" else diagnosed == {})


def test_decoder_is_masked_by_target_in_training_and_by_prediction_at_test():
    model: CapsNet = build_model(MODELS.get("capsnet")(**SMALL["capsnet"]), (1, 28, 28), 10)
    x = torch.rand(2, 1, 28, 28)
    out = model(x)
    assert torch.allclose(out.reconstruction, model.reconstruct(out.capsules, out.prediction))
    forced = torch.tensor([3, 3])
    assert torch.allclose(model(x, forced).reconstruction, model.reconstruct(out.capsules, forced))
    assert out.reconstruction.min() >= 0 and out.reconstruction.max() <= 1  # sigmoid output


def test_trace_through_the_model():
    model = build_model(MODELS.get("capsnet")(**SMALL["capsnet"]), (1, 28, 28), 10)
    u = model.primary_caps(torch.relu(model.conv1(torch.rand(2, 1, 28, 28))))
    trace = RoutingTrace()
    v = model.class_caps(u, trace)
    assert torch.allclose(v, dynamic_routing(model.class_caps.predictions(u), 3))
    assert trace.couplings[0].shape == (2, u.shape[1], 10)


@pytest.mark.numerics
@pytest.mark.parametrize("name", OVERFIT)
def test_tiny_model_overfits_a_tiny_batch(name):
    torch.manual_seed(0)
    kwargs = dict(SMALL[name])
    if "dropout" in MODELS.get(name).model_fields:
        kwargs["dropout"] = 0.0  # memorising 8 random images is the point here
    model = build_model(MODELS.get(name)(**kwargs), (1, 28, 28), 4)
    from capsx.recipe import LOSSES, _default_loss_name

    criterion = LOSSES[_default_loss_name(MODELS.get(name), 1)]()  # the loss a recipe gives it by default
    if criterion.name == "spread":  # EM's logistic activations at lambda 0.01 need far more than 100 steps
        criterion = criterion.model_copy(update={"margin_end": 0.2})  # to part by 0.9: the start's margin
    x, y = torch.rand(8, 1, 28, 28), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    steps, lr = (50, 1e-2) if name == "matrix_capsnet" else (100, 3e-3)  # EM's many small ops: 33 ms a step
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        terms = criterion(model(x, y), x, y)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).prediction == y).all()
    assert terms.total.item() < 0.05


@pytest.mark.numerics
@pytest.mark.parametrize("shape, extra", [((1, 28, 28), {}), ((3, 24, 24), {"none_of_the_above": True}),
                                          ((2, 32, 32), {"primary_dim": 6, "class_dim": 8})],
                         ids=["mnist", "cifar10-none-of-the-above", "smallnorb-stereo-6d-8d"])
def test_fast_capsnet_matches_the_plain_reference_in_outputs_and_gradients(shape, extra):
    from capsx.models.reference import ReferenceCapsNet

    kwargs = {**SMALL["capsnet"], **extra}
    fast = build_model(MODELS.get("capsnet")(**kwargs), shape, 10).double()
    ref = ReferenceCapsNet(shape, 10, **{**kwargs, "decoder_hidden": tuple(kwargs["decoder_hidden"])}).double()
    ref.load_state_dict(fast.state_dict())
    x, y = torch.rand(3, *shape, dtype=torch.double), torch.tensor([1, 5, 9])
    of, orf = fast(x, y), ref(x, y)
    assert of.capsules.shape[1] == 10 and of.reconstruction.shape == (3, *shape)
    assert torch.allclose(of.capsules, orf.capsules, atol=1e-12)
    assert torch.allclose(of.reconstruction, orf.reconstruction, atol=1e-12)
    (of.scores.sum() + of.reconstruction.sum()).backward()
    (orf.scores.sum() + orf.reconstruction.sum()).backward()
    for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.allclose(pf.grad, pr.grad, atol=1e-10), name


def test_he_init_scales_hidden_layers_by_fan_in_and_leaves_the_output_layer():
    torch.manual_seed(0)
    model = build_model(MODELS.get("baseline_cnn")(channels=[64, 64], hidden=[256], init="he"), (1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    fan_in = 64 * 5 * 5
    assert abs(convs[1].weight.std().item() - (2 / fan_in) ** 0.5) < 0.05 * (2 / fan_in) ** 0.5
    assert convs[1].bias.abs().max() == 0
    last = model.classifier[-1]
    default = build_model(MODELS.get("baseline_cnn")(channels=[64, 64], hidden=[256]), (1, 28, 28), 10)
    assert last.weight.std().item() < 1.5 * default.classifier[-1].weight.std().item()  # output layer untouched


@pytest.mark.numerics
def test_chunked_inference_equals_whole_batch_routing():
    from capsx.models.capsnet import ClassCaps

    caps = ClassCaps(in_caps=50, in_dim=8, out_caps=4, out_dim=6, routing_iters=3, init_std=0.1)
    u = torch.randn(ClassCaps.INFERENCE_CHUNK * 2 + 17, 50, 8) * 0.3
    with torch.no_grad():
        chunked = caps(u)
        whole = dynamic_routing(caps.predictions(u), 3)
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_none_of_the_above_routes_but_is_not_a_class():
    cfg = MODELS.get("capsnet")(**SMALL["capsnet"], none_of_the_above=True)
    model: CapsNet = build_model(cfg, (3, 24, 24), 10).double()
    caps = model.class_caps
    assert caps.weight.shape[1] == 11  # ten classes and the extra capsule
    assert model.decoder[0].in_features == 10 * 16  # the decoder never sees the extra capsule
    x = torch.rand(4, 3, 24, 24, dtype=torch.double)
    out = model(x, torch.tensor([0, 1, 2, 3]))
    assert out.scores.shape == (4, 10) and out.capsules.shape == (4, 10, 16)
    u = model.primary_caps(torch.relu(model.conv1(x)))
    u_hat = caps.predictions(u)  # (B, I, 11, D)
    # the classes are the first ten of routing over all eleven ...
    assert torch.allclose(out.capsules, routing_reference(u_hat, 3)[:, :10], atol=1e-12)
    # ... which is not routing over the ten alone: the extra capsule takes part in the softmax
    assert not torch.allclose(out.capsules, routing_reference(u_hat[:, :, :10], 3), rtol=1e-3, atol=0)
    # and it learns through routing although no loss term names it
    from capsx.train.losses import MarginLossConfig
    MarginLossConfig()(out, x, torch.tensor([0, 1, 2, 3])).total.backward()
    assert caps.weight.grad[:, 10].abs().sum() > 0


@pytest.mark.numerics
def test_routing_stays_fp32_under_bf16_autocast_while_the_convolutions_do_not():
    torch.manual_seed(0)
    model = CapsNet((1, 28, 28), 10, conv1_channels=16, primary_types=4, primary_dim=8, class_dim=8,
                    decoder_hidden=(16,))
    x = torch.rand(3, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.relu(model.conv1(x))
        u = model.primary_caps(h)
        v_mixed = model.class_caps(u)
    assert h.dtype == torch.bfloat16  # the convolutions run in bf16 ...
    assert v_mixed.dtype == torch.float32  # ... the capsule predictions and routing in fp32,
    torch.testing.assert_close(v_mixed, model.class_caps(u.float()), rtol=0, atol=0)  # exactly as without autocast
