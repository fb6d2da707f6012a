"""A strided 'valid' convolution computed in the frequency domain, with matrix products only.

Why: PrimaryCaps' 9x9 stride-2 convolution (256 -> 256 channels on a 20x20
map) is nearly all of a CapsNet's arithmetic, and oneDNN's direct kernel runs
it at about half of this CPU's matrix-product rate. In the frequency domain the
81 kernel taps become one complex product per frequency: 220 frequencies of a
20x20 map instead of 36 positions x 81 taps, 3.3x fewer multiply-adds. The
transforms are small real DFT matrices applied along the rows, then the
columns (no FFT calls: those ran at ~7 GFLOP/s on 20x20 maps here), and every
step, backward included, is a matrix product.

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
def output_dft(h: int, w: int, kh: int, kw: int, stride: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(ho*wo, 2F): per-frequency products [Re | Im] -> the output positions, the inverse DFT's real part
    with the half spectrum's Hermitian weights folded in (only the strided output positions are computed)."""
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    fu = torch.arange(h, dtype=torch.float64).view(h, 1)
    fv = torch.arange(w // 2 + 1, dtype=torch.float64).view(1, -1)
    r, c = torch.meshgrid(torch.arange(ho) * stride, torch.arange(wo) * stride, indexing="ij")
    a = (2 * math.pi * (fu * r.flatten().double().view(-1, 1, 1) / h + fv * c.flatten().double().view(-1, 1, 1) / w)
         ).flatten(1)  # (positions, F)
    # The half spectrum stands for its mirror image too: columns v = 1 .. ceil(w/2)-1 count twice.
    weight = torch.full((w // 2 + 1,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    weight = weight.repeat(h) / (h * w)
    from_y = torch.cat([a.cos() * weight, -a.sin() * weight], 1)  # y = Re(sum Y e^{+i a}) / (h w)
    return from_y.to(dtype=dtype, device=device).contiguous()


@lru_cache(maxsize=32)
def separable_dft(h: int, w: int, H: int, W: int, sign: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """The half-spectrum DFT of an h x w map zero-padded to H x W, as two small real factors.

    rows (2V, w): along each row, w -> [Re | Im] of the V = W//2 + 1 frequencies; cols (2H, 2h):
    along the columns, (h, [Re, Im]) -> ([Re | Im], H frequencies). `sign` -1 is the DFT (e^{-i a}),
    +1 its conjugate. Applied one after the other they equal the dense (h*w, 2F) DFT matrix with 8-13x
    fewer multiply-adds (a 20x20 map: 26k instead of 176k), which is what the input's transform cost."""
    V = W // 2 + 1
    a = 2 * math.pi * torch.arange(V, dtype=torch.float64).view(V, 1) * torch.arange(w, dtype=torch.float64) / W
    rows = torch.cat([a.cos(), sign * a.sin()], 0)  # (2V, w)
    phi = 2 * math.pi * torch.arange(H, dtype=torch.float64).view(H, 1) * torch.arange(h, dtype=torch.float64) / H
    c, sn = phi.cos(), sign * phi.sin()  # (H, h): Z e^{i sign phi} = (Zr c - Zi sn) + i (Zr sn + Zi c)
    cols = torch.stack([torch.stack([c, -sn], 2), torch.stack([sn, c], 2)], 0).reshape(2 * H, 2 * h)
    return rows.to(dtype=dtype, device=device), cols.to(dtype=dtype, device=device)


def half_spectrum(maps: Tensor, H: int, W: int, sign: int) -> Tensor:
    """maps (M, h, w) -> [Re, Im] of their half spectra on H x W, (2, H * (W//2 + 1), M): frequency-major,
    the layout of the per-frequency products, with no copy of the maps (the first product reads them
    transposed)."""
    M, h, w = maps.shape
    rows, cols = separable_dft(h, w, H, W, sign, maps.dtype, maps.device)
    Z = torch.bmm(rows.expand(h, *rows.shape), maps.permute(1, 2, 0))  # (h, 2V, M): (row, [Re, Im], v)
    return (cols @ Z.view(2 * h, -1)).view(2, -1, M)  # ([Re, Im], u, v, M)


def half_spectrum_adjoint(spectra: Tensor, h: int, w: int, H: int, W: int, sign: int) -> Tensor:
    """The transpose of `half_spectrum`: (2, F, M) -> (M, h, w), how a gradient goes back to the maps."""
    M = spectra.shape[-1]
    rows, cols = separable_dft(h, w, H, W, sign, spectra.dtype, spectra.device)
    gZ = (cols.t() @ spectra.reshape(2 * H, -1)).view(h, rows.shape[0], M)  # (h, 2V, M)
    return torch.bmm(gZ.transpose(1, 2), rows.expand(h, *rows.shape)).permute(1, 0, 2).contiguous()  # (M, h, w)


def _kernel_spectrum(weight: Tensor, h: int, w: int, stride: int) -> Tensor:
    """[Re, Im] of conj(DFT(weight)) on an h x w map, (2, F, O, C): paid once per call, not per image."""
    O, C, KH, KW = weight.shape
    return half_spectrum(weight.reshape(O * C, KH, KW), h, w, +1).view(2, -1, O, C)


def _products(x: Tensor, V: Tensor, bias: Tensor | None, kernel: tuple[int, int], stride: int
              ) -> tuple[Tensor, Tensor]:
    """x (B, C, H, W) and the kernel's spectrum -> (y (B, O, HO, WO), X the image spectrum (2, F, B, C))."""
    B, C, H, W = x.shape
    O, (KH, KW) = V.shape[2], kernel
    from_y = output_dft(H, W, KH, KW, stride, x.dtype, x.device)
    F2 = from_y.shape[1]
    HO, WO = (H - KH) // stride + 1, (W - KW) // stride + 1
    X = half_spectrum(x.reshape(B * C, H, W), H, W, -1).view(2, F2 // 2, B, C)  # [Re, Im] of X, (F, B, C) each
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
        from_y = output_dft(H, W, KH, KW, stride, gy.dtype, gy.device)
        F2 = from_y.shape[1]
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
            gx = half_spectrum_adjoint(gX.view(2, F2 // 2, B * C), H, W, H, W, -1).view(B, C, H, W)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            gV = torch.empty(2, F2 // 2, O, C, dtype=gy.dtype, device=gy.device)
            torch.bmm(gYr.transpose(1, 2), Xr, out=gV[0])
            gV[0].baddbmm_(gYi.transpose(1, 2), Xi)
            torch.bmm(gYi.transpose(1, 2), Xr, out=gV[1])
            gV[1].baddbmm_(gYr.transpose(1, 2), Xi, alpha=-1)
            gw = half_spectrum_adjoint(gV.view(2, F2 // 2, O * C), KH, KW, H, W, +1).view(O, C, KH, KW)
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


__all__ = ["fourier_conv2d", "half_spectrum", "half_spectrum_adjoint", "output_dft", "separable_dft"]
