"""A Conv2d that computes in the frequency domain, or as im2col + GEMM, where this machine measured that faster.

The layer is torch's own `nn.Conv2d` (same parameters, state-dict keys, initialisation and results to
rounding); only its forward differs: on the CPU, for fp32 input or under bf16 autocast (then the
frequency-domain products run in bf16, as autocast's own conv would), square kernels, one stride for
both axes, zero padding the same on both sides (an odd kernel's 'same'), no groups or dilation, it asks
`conv_algorithm` which algorithm this problem runs fastest by, and uses it. Everything else is the
direct conv. PrimaryCaps' 9x9 stride-2 conv and the baseline CNN's 5x5 'same' convs are where the
frequency domain pays; Conv1 (one input channel) is where im2col can.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsx.models.conv_algorithm import Problem, batch_class, choose
from capsx.models.fourier_conv import fourier_conv2d


class MeasuredConv2d(nn.Conv2d):
    FOURIER_CHUNK = 256  # samples at a time without autograd (fourier_conv2d's `chunk`)

    def forward(self, x: Tensor) -> Tensor:
        padding = self._symmetric_padding()
        dtype = fourier_dtype(x)
        if (dtype is None or padding is None or x.device.type != "cpu" or x.dim() != 4
                or self.kernel_size[0] != self.kernel_size[1] or self.stride[0] != self.stride[1]
                or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"):
            return super().forward(x)
        B, C, H, W = x.shape
        problem = Problem(batch_class(B), C, H, W, self.out_channels, self.kernel_size[0], self.stride[0],
                          str(dtype).removeprefix("torch."), torch.is_grad_enabled(), padding)
        return self.compute(choose(problem, self.compute), x, self.weight, self.bias)

    def compute(self, algorithm: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This layer's conv of x with (weight, bias) by `algorithm`, under the caller's autocast."""
        if algorithm == "direct":
            return F.conv2d(x, weight, bias, self.stride, self.padding)
        if algorithm == "im2col":
            return self._im2col(x, weight, bias)
        dtype = fourier_dtype(x)
        assert dtype is not None
        with torch.autocast("cpu", enabled=False):
            return fourier_conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                  self.stride[0], self._symmetric_padding() or 0, chunk=self.FOURIER_CHUNK)

    def _im2col(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The unfolded input (B, C*k*k, L) times the kernel matrix (O, C*k*k), one batched product with
        the bias as its addend; autograd's backward is two more batched products (weight gradient: the
        output gradient times the unfolded input)."""
        B, _, H, W = x.shape
        k, s, p = self.kernel_size[0], self.stride[0], self._symmetric_padding() or 0
        ho, wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        cols = F.unfold(x, k, padding=p, stride=s)  # (B, C*k*k, ho*wo)
        kernel = weight.reshape(1, self.out_channels, -1).expand(B, -1, -1)
        if bias is None:
            y = torch.bmm(kernel, cols)
        else:
            y = torch.baddbmm(bias.view(1, -1, 1).expand(B, -1, ho * wo), kernel, cols)
        return y.view(B, self.out_channels, ho, wo)

    def _symmetric_padding(self) -> int | None:
        """The zeros on each side, the same on all four; None where they differ (an even kernel's 'same')."""
        if self.padding == "same":
            k = self.kernel_size[0]
            return (k - 1) // 2 if k % 2 == 1 and self.kernel_size[1] == k else None
        if self.padding == "valid":
            return 0
        ph, pw = self.padding  # type: ignore[str-unpack]  # a tuple of ints once 'same' and 'valid' are out
        return int(ph) if ph == pw else None  # type: ignore[call-overload]


def fourier_dtype(x: Tensor) -> torch.dtype | None:
    """bf16 under bf16 autocast, fp32 for fp32 input outside autocast; None otherwise (fp16, fp64)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    return torch.float32 if x.dtype == torch.float32 else None
