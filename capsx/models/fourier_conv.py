"""A strided 'valid' convolution computed in the frequency domain, with matrix products only.

Why: PrimaryCaps' 9x9 stride-2 convolution (256 -> 256 channels on a 20x20
map) is nearly all of a CapsNet's arithmetic, and oneDNN's direct kernel runs
it at about half of this CPU's matrix-product rate. In the frequency domain the
81 kernel taps become one complex product per frequency: 220 frequencies of a
20x20 map instead of 36 positions x 81 taps, 3.3x fewer multiply-adds. The
transforms are small real DFT matrices (no FFT calls: those ran at ~7 GFLOP/s
on 20x20 maps here), and every step, backward included, is a large GEMM.

Cross-correlation y[p, q] = sum_{k,l} w[k, l] x[s p + k, s q + l] is exact in a
DFT of the input's own size: the indices s p + k never wrap around. With
X = DFT(x) and V = conj(DFT(w)) on the real-input half spectrum (rfft2's
H x (W//2 + 1) frequencies), Y[f] = X[f] @ V[f] per frequency f, and y is
the real part of the inverse DFT at the output positions only.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx


@lru_cache(maxsize=16)
def dft_matrices(h: int, w: int, kh: int, kw: int, stride: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The three real linear maps, [real parts | imaginary parts] along the frequency axis (2F columns):

    to_x (h*w, 2F): image -> its DFT; to_v (kh*kw, 2F): kernel -> the conjugate of its DFT (zero-padded
    to h x w); from_y (ho*wo, 2F): per-frequency products -> the output positions (the inverse DFT's real
    part, Hermitian weights folded in)."""
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    fu = torch.arange(h, dtype=torch.float64).view(h, 1)
    fv = torch.arange(w // 2 + 1, dtype=torch.float64).view(1, -1)

    def angles(rows: Tensor, cols: Tensor) -> Tensor:  # (positions,) -> (positions, F)
        a = 2 * math.pi * (fu * rows.view(-1, 1, 1) / h + fv * cols.view(-1, 1, 1) / w)
        return a.flatten(1)

    def grid(nr: int, nc: int, step: int = 1) -> tuple[Tensor, Tensor]:
        r, c = torch.meshgrid(torch.arange(nr) * step, torch.arange(nc) * step, indexing="ij")
        return r.flatten().double(), c.flatten().double()

    ax = angles(*grid(h, w))
    to_x = torch.cat([ax.cos(), -ax.sin()], 1)  # X = sum x e^{-i a}
    ak = angles(*grid(kh, kw))
    to_v = torch.cat([ak.cos(), ak.sin()], 1)  # conj(W) = sum w e^{+i a}
    # The half spectrum stands for its mirror image too: columns v = 1 .. ceil(w/2)-1 count twice.
    weight = torch.full((w // 2 + 1,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    weight = weight.repeat(h) / (h * w)
    ay = angles(*grid(ho, wo, stride))
    from_y = torch.cat([ay.cos() * weight, -ay.sin() * weight], 1)  # y = Re(sum Y e^{+i a}) / (h w)
    return tuple(m.to(dtype=dtype, device=device).contiguous() for m in (to_x, to_v, from_y))  # type: ignore[return-value]


def _kernel_spectrum(weight: Tensor, h: int, w: int, stride: int) -> Tensor:
    """[Re, Im] of conj(DFT(weight)) on an h x w map, (2, F, O, C): paid once per call, not per image."""
    O, C, KH, KW = weight.shape
    _, to_v, _ = dft_matrices(h, w, KH, KW, stride, weight.dtype, weight.device)
    return (to_v.t() @ weight.reshape(O * C, KH * KW).t()).view(2, -1, O, C)


def _products(x: Tensor, V: Tensor, bias: Tensor | None, kernel: tuple[int, int], stride: int
              ) -> tuple[Tensor, Tensor]:
    """x (B, C, H, W) and the kernel's spectrum -> (y (B, O, HO, WO), X the image spectrum (2, F, B, C))."""
    B, C, H, W = x.shape
    O, (KH, KW) = V.shape[2], kernel
    to_x, _, from_y = dft_matrices(H, W, KH, KW, stride, x.dtype, x.device)
    F2 = to_x.shape[1]
    HO, WO = (H - KH) // stride + 1, (W - KW) // stride + 1
    X = (to_x.t() @ x.reshape(B * C, H * W).t()).view(2, F2 // 2, B, C)  # [Re, Im] of X, (F, B, C) each
    Xr, Xi, Vr, Vi = X[0], X[1], V[0].transpose(1, 2), V[1].transpose(1, 2)
    Y = torch.empty(2, F2 // 2, B, O, dtype=x.dtype, device=x.device)
    torch.bmm(Xr, Vr, out=Y[0])
    Y[0].baddbmm_(Xi, Vi, alpha=-1)  # Re(X V) = Xr Vr - Xi Vi
    torch.bmm(Xr, Vi, out=Y[1])
    Y[1].baddbmm_(Xi, Vr)  # Im(X V) = Xr Vi + Xi Vr
    y = (from_y @ Y.view(F2, B * O)).view(HO, WO, B, O).permute(2, 3, 0, 1)
    if bias is not None:
        y = y + bias.view(1, O, 1, 1)
    return y.contiguous(), X


class _FourierConv(torch.autograd.Function):
    """Forward and backward written out: 8 real batched products per pass instead of autograd's
    slices and copies of complex tensors, which dominate the layer's time otherwise."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int) -> Tensor:
        B, C, H, W = x.shape
        O, _, KH, KW = weight.shape
        V = _kernel_spectrum(weight, H, W, stride)
        y, X = _products(x, V, bias, (KH, KW), stride)
        ctx.save_for_backward(X, V)
        ctx.shape = (B, C, H, W, O, KH, KW, stride, bias is not None)  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        X, V = ctx.saved_tensors  # type: ignore[attr-defined]
        B, C, H, W, O, KH, KW, stride, has_bias = ctx.shape  # type: ignore[attr-defined]
        to_x, to_v, from_y = dft_matrices(H, W, KH, KW, stride, gy.dtype, gy.device)
        F2 = to_x.shape[1]
        HO, WO = gy.shape[2], gy.shape[3]
        gY = (from_y.t() @ gy.permute(2, 3, 0, 1).reshape(HO * WO, B * O)).view(2, F2 // 2, B, O)
        gYr, gYi = gY[0], gY[1]
        Xr, Xi, Vr, Vi = X[0], X[1], V[0], V[1]  # V as (F, O, C)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            gX = torch.empty(2, F2 // 2, B, C, dtype=gy.dtype, device=gy.device)
            torch.bmm(gYr, Vr, out=gX[0])
            gX[0].baddbmm_(gYi, Vi)
            torch.bmm(gYi, Vr, out=gX[1])
            gX[1].baddbmm_(gYr, Vi, alpha=-1)
            gx = (gX.view(F2, B * C).t() @ to_x.t()).view(B, C, H, W)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            gV = torch.empty(2, F2 // 2, O, C, dtype=gy.dtype, device=gy.device)
            torch.bmm(gYr.transpose(1, 2), Xr, out=gV[0])
            gV[0].baddbmm_(gYi.transpose(1, 2), Xi)
            torch.bmm(gYi.transpose(1, 2), Xr, out=gV[1])
            gV[1].baddbmm_(gYr.transpose(1, 2), Xi, alpha=-1)
            gw = (gV.view(F2, O * C).t() @ to_v.t()).view(O, C, KH, KW)
        if has_bias and ctx.needs_input_grad[2]:  # type: ignore[attr-defined]
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None


def fourier_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1,
                   chunk: int | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, stride) without padding, dilation or groups; same result to fp32 rounding.

    `chunk`: without autograd, take the batch this many samples at a time (the kernel's spectrum computed
    once for all of them), which bounds the frequency-domain temporaries."""
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x (B, C, H, W) and weight (O, C, kh, kw); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if weight.shape[2] > x.shape[2] or weight.shape[3] > x.shape[3]:
        raise ValueError(f"kernel {tuple(weight.shape[2:])} is larger than the input {tuple(x.shape[2:])}")
    if chunk is not None and len(x) > chunk and not torch.is_grad_enabled():
        V = _kernel_spectrum(weight, x.shape[2], x.shape[3], stride)
        kernel = (weight.shape[2], weight.shape[3])
        return torch.cat([_products(part, V, bias, kernel, stride)[0] for part in x.split(chunk)])
    out: Tensor = _FourierConv.apply(x, weight, bias, stride)
    return out


__all__ = ["dft_matrices", "fourier_conv2d"]
