"""CapsNet (Sabour, Frosst, Hinton, "Dynamic Routing Between Capsules", NIPS 2017).

MNIST layout: Conv1 256@9x9 ReLU (28 -> 20) -> PrimaryCaps 32 types of 8-D
capsules @9x9 stride 2 (20 -> 6; 6*6*32 = 1152 capsules) -> DigitCaps 10 x 16-D
by dynamic routing -> decoder 160 -> 512 -> 1024 -> 784 (sigmoid) from the
masked DigitCaps. 8.2M parameters, 6.8M without the decoder.

For CIFAR-10 the paper adds a "none of the above" capsule to the routing softmax:
an extra output capsule that primary capsules can send their votes to (clutter
the ten classes do not explain) but that is not a class: it is not scored, not in
the margin loss and not decoded (`none_of_the_above: true`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from capsx.models.capsule_classifier import CapsuleClassifier, make_decoder
from capsx.models.config import ModelConfig, register_model
from capsx.models.measured_conv import MeasuredConv2d
from capsx.models.routing import Routing, RoutingTrace, route, squash


@dataclass(frozen=True)
class PaperDefaults:
    """The paper's CapsNet for MNIST, written once: `CapsNet`'s arguments and `CapsNetConfig`'s fields
    default to these."""

    conv1_channels: int = 256
    conv1_kernel: int = 9
    primary_types: int = 32
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    class_dim: int = 16
    routing_iters: int = 3
    routing: Routing = "dynamic"
    none_of_the_above: bool = False
    decoder: bool = True
    decoder_hidden: tuple[int, ...] = (512, 1024)
    init_std: float = 0.01


PAPER = PaperDefaults()


class PrimaryCaps(nn.Module):
    """A conv layer whose channels are read as `types` capsules of `dim` dimensions per position."""

    summary_as_layer = True  # one row in `capsx summary`, not its inner conv

    def __init__(self, in_channels: int, types: int, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.types, self.dim = types, dim
        self.conv = MeasuredConv2d(in_channels, types * dim, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.capsules(self.conv(x))  # the conv by the algorithm this machine measured fastest

    def capsules(self, y: Tensor) -> Tensor:
        """Conv output (B, types*dim, H, W) -> squashed capsules (B, types*H*W, dim)."""
        B, _, H, W = y.shape  # no ReLU: squash is the non-linearity
        y = y.view(B, self.types, self.dim, H, W).permute(0, 1, 3, 4, 2)  # (B, types, H, W, dim)
        return squash(y.reshape(B, self.types * H * W, self.dim))  # (B, I, dim)


class ClassCaps(nn.Module):
    """Fully connected capsule layer (the paper's DigitCaps): u_hat(j|i) = W_ij u_i, then routing
    (`routing`: see `capsx.models.routing`; `routing_iters` counts for dynamic and leaky only)."""

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int, routing_iters: int,
                 init_std: float, routing: Routing = "dynamic",
                 squash_fn: Callable[[Tensor], Tensor] = squash) -> None:
        super().__init__()
        self.routing_iters = routing_iters
        self.routing = routing
        self.squash_fn = squash_fn  # attention routing's output non-linearity
        # One 8x16 matrix per (input i, output j) pair, no bias (paper).
        self.weight = nn.Parameter(torch.randn(in_caps, out_caps, out_dim, in_dim) * init_std)  # (I, J, D, d)
        # Attention routing's learned log priors b_ij (Efficient-CapsNet: zeros at the start); the other
        # routings have none, so their checkpoints keep the layer's one tensor.
        self.prior = nn.Parameter(torch.zeros(in_caps, out_caps)) if routing == "attention" else None

    def predictions(self, u: Tensor) -> Tensor:
        """u (B, I, d) -> u_hat (B, I, J, D)."""
        return torch.einsum("ijDd,bid->bijD", self.weight, u)

    INFERENCE_CHUNK = 256  # at most this many samples routed at once without autograd
    INFERENCE_BYTES = 192 * 2**20  # and no more than this in one fp32 copy of their u_hat

    @property
    def inference_chunk(self) -> int:
        """Samples routed at once without autograd: routing is per sample, so chunks give the same
        result, and u_hat's (B, I, J, D) temporaries stay bounded whatever the layer's size (one copy
        for 1000 MNIST images is 737 MB; a chunk of 256 is 189 MB; MultiMNIST's 3200 inputs: 98 images)."""
        I, J, D, _ = self.weight.shape
        return max(1, min(self.INFERENCE_CHUNK, self.INFERENCE_BYTES // (I * J * D * 4)))

    def forward(self, u: Tensor, trace: RoutingTrace | None = None) -> Tensor:
        chunk = self.inference_chunk
        if torch.is_grad_enabled() or trace is not None or u.shape[0] <= chunk:
            return self._route(u, trace)  # (B, J, D)
        return torch.cat([self._route(part) for part in u.split(chunk)])

    def _route(self, u: Tensor, trace: RoutingTrace | None = None) -> Tensor:
        """u_hat and routing in fp32 even under bf16/fp16 autocast: their bmm's are many small
        matrix-vector products, which mixed precision makes slower (a cast copy of u_hat per call;
        measured: the bf16 training step was no faster than fp32), and the routing softmax and
        agreements keep their precision. The convolutions, nearly all the FLOPs, stay in low precision."""
        if u.device.type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(u.device.type):
            return route(self.predictions(u), self.routing, self.routing_iters, self.prior, trace, self.squash_fn)
        with torch.autocast(u.device.type, enabled=False):
            return route(self.predictions(u.float()), self.routing, self.routing_iters, self.prior, trace,
                         self.squash_fn)


AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")  # where autocast exists (not "meta": `capsx summary`'s shapes)


class CapsNet(CapsuleClassifier):
    """The paper's three-layer CapsNet with its reconstruction decoder."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        conv1_channels: int = PAPER.conv1_channels,
        conv1_kernel: int = PAPER.conv1_kernel,
        primary_types: int = PAPER.primary_types,
        primary_dim: int = PAPER.primary_dim,
        primary_kernel: int = PAPER.primary_kernel,
        primary_stride: int = PAPER.primary_stride,
        class_dim: int = PAPER.class_dim,
        routing_iters: int = PAPER.routing_iters,
        routing: Routing = PAPER.routing,
        none_of_the_above: bool = PAPER.none_of_the_above,
        decoder: bool = PAPER.decoder,
        decoder_hidden: tuple[int, ...] = PAPER.decoder_hidden,
        init_std: float = PAPER.init_std,
        objects: int = 1,
    ) -> None:
        super().__init__()
        C, H, W = input_shape
        self.input_shape = input_shape
        self.num_classes, self.class_dim = num_classes, class_dim
        self.objects = objects
        self.conv1 = MeasuredConv2d(C, conv1_channels, conv1_kernel)
        self.primary_caps = PrimaryCaps(conv1_channels, primary_types, primary_dim, primary_kernel, primary_stride)
        grid_h = (H - conv1_kernel + 1 - primary_kernel) // primary_stride + 1
        grid_w = (W - conv1_kernel + 1 - primary_kernel) // primary_stride + 1
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"input {H}x{W} is too small for the conv kernels")
        self.primary_grid = (primary_types, grid_h, grid_w)
        self.routed_caps = num_classes + int(none_of_the_above)  # the extra one routes, but is no class
        self.class_caps = ClassCaps(primary_types * grid_h * grid_w, primary_dim, self.routed_caps, class_dim,
                                    routing_iters, init_std, routing)
        self.decoder = make_decoder(num_classes, class_dim, decoder_hidden, C * H * W) if decoder else None

    @property
    def inference_chunk(self) -> int:
        """Images encoded at once without autograd (`ClassCaps.inference_chunk`)."""
        return self.class_caps.inference_chunk

    def encode(self, x: Tensor, trace: RoutingTrace | None = None) -> Tensor:
        chunk = self.inference_chunk
        if not torch.is_grad_enabled() and trace is None and len(x) > chunk:
            # Each image is encoded on its own, so chunks give the same result; Conv1's output alone
            # would be 410 MB for 1000 MNIST images, and every later layer's temporaries scale alike.
            return torch.cat([self.encode(part) for part in x.split(chunk)])
        h = F.relu(self.conv1(x))  # (B, 256, 20, 20); not in place: forward hooks on conv1 see its output
        u = self.primary_caps(h)  # (B, 1152, 8)
        v = self.class_caps(u, trace)  # (B, 10 (+1 none of the above), 16)
        return v[:, :self.num_classes]  # (B, 10, 16): the class capsules

    @torch.no_grad()
    def diagnostics(self, x: Tensor) -> dict[str, float]:
        """The paper's appendix diagnostic: mean |change| of the routing logits b_ij per iteration
        (routings with logits only: dynamic and leaky)."""
        if self.class_caps.routing not in ("dynamic", "leaky"):
            return {}
        trace = RoutingTrace()
        self.encode(x, trace)
        return {f"routing/delta_b_iter{r + 1}": d for r, d in enumerate(trace.mean_abs_delta_b)}


@register_model
class CapsNetConfig(ModelConfig):
    """`model: {name: capsnet, ...}`: the paper's defaults for MNIST."""

    name: Literal["capsnet"] = "capsnet"
    outputs_capsules: ClassVar[bool] = True
    conv1_channels: int = Field(PAPER.conv1_channels, ge=1)
    conv1_kernel: int = Field(PAPER.conv1_kernel, ge=1)
    primary_types: int = Field(PAPER.primary_types, ge=1)
    primary_dim: int = Field(PAPER.primary_dim, ge=1)
    primary_kernel: int = Field(PAPER.primary_kernel, ge=1)
    primary_stride: int = Field(PAPER.primary_stride, ge=1)
    class_dim: int = Field(PAPER.class_dim, ge=1)
    routing_iters: int = Field(PAPER.routing_iters, ge=1)  # dynamic and leaky routing only
    routing: Routing = PAPER.routing  # dynamic | leaky | none | attention (capsx.models.routing)
    none_of_the_above: bool = PAPER.none_of_the_above  # an extra routed capsule that is not a class (paper, CIFAR-10)
    decoder: bool = PAPER.decoder
    decoder_hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: list(PAPER.decoder_hidden))
    init_std: float = Field(PAPER.init_std, gt=0)

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        kw = self.kwargs()
        kw["decoder_hidden"] = tuple(kw["decoder_hidden"])
        return CapsNet(input_shape, num_classes, **kw, objects=objects)


__all__ = ["PAPER", "CapsNet", "CapsNetConfig", "ClassCaps", "PaperDefaults", "PrimaryCaps"]
