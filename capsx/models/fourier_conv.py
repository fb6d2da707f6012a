"""A strided, zero-padded convolution computed in the frequency domain, with matrix products only.

Why: PrimaryCaps' 9x9 stride-2 convolution (256 -> 256 channels on a 20x20
map) is nearly all of a CapsNet's arithmetic, and the baseline CNN's 5x5
'same' convolutions (256 channels on 28x28) are nearly all of the CNN's. In
the frequency domain the kernel taps become one complex product per
frequency: PrimaryCaps' 81 taps x 36 positions become 220 frequencies (3.3x
fewer multiply-adds), the CNN's 25 taps x 784 positions 480 frequencies (41x
fewer, before the transforms). The transforms are small real DFT matrices
applied along one axis, then the other (no FFT calls: those ran at ~7 GFLOP/s
on 20x20 maps here), and every step, backward included, is a matrix product.

Cross-correlation y[p, q] = sum_{k,l} w[k, l] x[s p + k - P, s q + l - P]
(x zero outside its h x w) is exact in a DFT of size (h + P) x (w + P): the
indices that fall outside the map land on the transform's zero rows, never on
the map (P is the padding on each side; 0 for a 'valid' conv). With X =
DFT(x) and V = conj(DFT(w)) on the real-input half spectrum (rfft2's
N x (N'//2 + 1) frequencies), Y[f] = X[f] @ V[f] per frequency f, and y is
the real part of the inverse DFT at the output positions only, (s p - P) mod
N. Each complex product is Gauss's three real ones, Xr Vr, Xi Vi and
(Xr + Xi)(Vr + Vi), whose sums and differences are folded into the
transform matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx


@lru_cache(maxsize=32)
def inverse_dft(H: int, W: int, rows_out: tuple[int, ...], cols_out: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Gauss's three per-frequency products -> the real output at the given positions, as two factors.

    first (2 ho, 3H): along the column frequencies u, (block, u) -> (output row, [Re, Im]) of Z(r, v) =
    sum_u Y(u, v) e^{+2 pi i u r / H}, with Y = [P1 - P2 | P3 - P1 - P2] (Gauss's recombination: it
    costs nothing, it is in this matrix); second (wo, 2V): along the row frequencies v, ([Re, Im], v) ->
    output column, y = Re(sum_v Z e^{+2 pi i v c / W}) / (H W) with the half spectrum's Hermitian
    weights (v = 1 .. ceil(W/2) - 1 stand for their mirror images too)."""
    V = W // 2 + 1
    theta = 2 * math.pi * torch.tensor(rows_out, dtype=torch.float64).view(-1, 1) * torch.arange(H) / H  # (ho, H)
    c, sn = theta.cos(), theta.sin()
    re = torch.cat([c + sn, sn - c, -sn], 1)  # Zr = sum_u (P1 (cos + sin) + P2 (sin - cos) - P3 sin)
    im = torch.cat([sn - c, -sn - c, c], 1)  # Zi = sum_u (P1 (sin - cos) - P2 (sin + cos) + P3 cos)
    first = torch.stack([re, im], 1).reshape(2 * len(rows_out), 3 * H)  # rows (r, [Re, Im])
    weight = torch.full((V,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if W % 2 == 0:
        weight[-1] = 1.0
    phi = 2 * math.pi * torch.tensor(cols_out, dtype=torch.float64).view(-1, 1) * torch.arange(V) / W  # (wo, V)
    second = torch.cat([phi.cos() * weight, -phi.sin() * weight], 1) / (H * W)  # Re(Z e^{i phi})
    return first.to(dtype=dtype, device=device), second.to(dtype=dtype, device=device)


@lru_cache(maxsize=32)
def separable_dft(h: int, w: int, H: int, W: int, sign: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """The half-spectrum DFT of an h x w map zero-padded to H x W, as two small real factors.

    rows (2V, w): along each row, w -> [Re | Im] of the V = W//2 + 1 frequencies; cols (3H, 2h):
    along the columns, (h, [Re, Im]) -> ([Re | Im | Re + Im], H frequencies), the third block the
    sum Gauss's third product multiplies. `sign` -1 is the DFT (e^{-i a}), +1 its conjugate. Applied
    one after the other they equal the dense DFT matrix with 8-13x fewer multiply-adds (a 20x20 map:
    26k instead of 176k for [Re | Im]), which is what the input's transform cost."""
    V = W // 2 + 1
    a = 2 * math.pi * torch.arange(V, dtype=torch.float64).view(V, 1) * torch.arange(w, dtype=torch.float64) / W
    rows = torch.cat([a.cos(), sign * a.sin()], 0)  # (2V, w)
    phi = 2 * math.pi * torch.arange(H, dtype=torch.float64).view(H, 1) * torch.arange(h, dtype=torch.float64) / H
    c, sn = phi.cos(), sign * phi.sin()  # (H, h): Z e^{i sign phi} = (Zr c - Zi sn) + i (Zr sn + Zi c)
    re, im = torch.stack([c, -sn], 2).reshape(H, 2 * h), torch.stack([sn, c], 2).reshape(H, 2 * h)
    cols = torch.cat([re, im, re + im], 0)
    return rows.to(dtype=dtype, device=device), cols.to(dtype=dtype, device=device)


EXPANDING_COLUMNS = 16384  # columns per product in `expanding_mm`


def expanding_mm(a: Tensor, b: Tensor) -> Tensor:
    """a (m, k) @ b (k, n) for a transform that makes more rows than it reads (m > k), n in the 100,000s,
    by column blocks written into one result: each block's output is still in cache when the product
    ends. Measured on an AMD EPYC (AVX2) CPU: (60, 18) @ (18, 720896) 67 ms in one call, 32 ms in
    blocks of 16384 columns; the contracting products (m < k) gain nothing, so they stay one call."""
    n = b.shape[1]
    if a.shape[0] <= a.shape[1] or n <= 2 * EXPANDING_COLUMNS or torch.is_grad_enabled() and (
            a.requires_grad or b.requires_grad):
        return a @ b
    out = b.new_empty(a.shape[0], n)
    for start in range(0, n, EXPANDING_COLUMNS):
        end = min(n, start + EXPANDING_COLUMNS)
        torch.mm(a, b[:, start:end], out=out[:, start:end])
    return out


def half_spectrum(maps: Tensor, H: int, W: int, sign: int) -> Tensor:
    """maps (M, h, w) -> [Re, Im, Re + Im] of their half spectra on H x W, (3, H * (W//2 + 1), M):
    frequency-major, the layout of the per-frequency products, with no copy of the maps (the first
    product reads them transposed)."""
    M, h, w = maps.shape
    rows, cols = separable_dft(h, w, H, W, sign, maps.dtype, maps.device)
    Z = torch.bmm(rows.expand(h, *rows.shape), maps.permute(1, 2, 0))  # (h, 2V, M): (row, [Re, Im], v)
    return expanding_mm(cols, Z.view(2 * h, -1)).view(3, -1, M)  # ([Re, Im, Re + Im], u, v, M)


def half_spectrum_adjoint(spectra: Tensor, h: int, w: int, H: int, W: int, sign: int) -> Tensor:
    """The transpose of `half_spectrum`: (3, F, M) -> (M, h, w), how a gradient goes back to the maps."""
    M = spectra.shape[-1]
    rows, cols = separable_dft(h, w, H, W, sign, spectra.dtype, spectra.device)
    gZ = (cols.t() @ spectra.reshape(3 * H, -1)).view(h, rows.shape[0], M)  # (h, 2V, M)
    return torch.bmm(gZ.transpose(1, 2), rows.expand(h, *rows.shape)).permute(1, 0, 2).contiguous()  # (M, h, w)


def _kernel_spectrum(weight: Tensor, H: int, W: int) -> Tensor:
    """[Re, Im, Re + Im] of conj(DFT(weight)) on an H x W transform, (3 F, C, O), the layout the forward
    product reads as it lies: paid once per call, not per image."""
    O, C, KH, KW = weight.shape
    return half_spectrum(weight.transpose(0, 1).reshape(C * O, KH, KW), H, W, +1).view(-1, C, O)


@dataclass(frozen=True)
class _Geometry:
    """Sizes of one convolution: the input's, the kernel's, the transform's and the output's."""

    h: int
    w: int
    kh: int
    kw: int
    stride: int
    ph: int
    pw: int

    @property
    def transform(self) -> tuple[int, int]:  # (h + P) x (w + P'): nothing wraps onto the map
        return self.h + self.ph, self.w + self.pw

    @property
    def out(self) -> tuple[int, int]:
        return (self.h + 2 * self.ph - self.kh) // self.stride + 1, (self.w + 2 * self.pw - self.kw) // self.stride + 1

    def inverse(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        (H, W), (ho, wo) = self.transform, self.out
        rows = tuple((i * self.stride - self.ph) % H for i in range(ho))
        cols = tuple((j * self.stride - self.pw) % W for j in range(wo))
        return inverse_dft(H, W, rows, cols, dtype, device)


def _products(x: Tensor, V: Tensor, bias: Tensor | None, geo: _Geometry) -> tuple[Tensor, Tensor]:
    """x (B, C, h, w) and the kernel's spectrum -> (y (B, O, ho, wo), X the image spectrum (3 F, B, C)).

    Gauss's three real products per frequency, one batched product over (block, frequency), instead of the
    complex product's four: a quarter fewer multiply-adds, and no accumulation passes."""
    B, C = x.shape[:2]
    O = V.shape[2]
    (H, W), (ho, wo) = geo.transform, geo.out
    first, second = geo.inverse(x.dtype, x.device)
    X = half_spectrum(x.reshape(B * C, geo.h, geo.w), H, W, -1).view(-1, B, C)  # (3 F, B, C)
    P = torch.bmm(X, V)  # (3 F, B, O): P1, P2, P3 for each frequency
    Z = (first @ P.view(3 * H, -1)).view(ho, 2 * (W // 2 + 1), B * O)  # (row, [Re, Im] x v, B O)
    y = torch.bmm(second.expand(ho, *second.shape), Z).view(ho, wo, B, O).permute(2, 3, 0, 1)
    if bias is not None:
        y = y + bias.view(1, O, 1, 1)
    return y.contiguous(), X


class _FourierConv(torch.autograd.Function):
    """Forward and backward written out: three batched products per pass, each the transpose of a forward
    one (y = D P with P_k = X_k V_k per block and frequency, X = S x and V = T w linear), instead of
    autograd's slices and copies of complex tensors, which dominate the layer's time otherwise."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, geo: _Geometry) -> Tensor:
        V = _kernel_spectrum(weight, *geo.transform)
        y, X = _products(x, V, bias, geo)
        ctx.save_for_backward(X, V)
        ctx.geo = geo  # type: ignore[attr-defined]
        ctx.sizes = (x.shape[0], x.shape[1], weight.shape[0], bias is not None)  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        X, V = ctx.saved_tensors  # type: ignore[attr-defined]  # (3 F, B, C), (3 F, C, O)
        geo: _Geometry = ctx.geo  # type: ignore[attr-defined]
        B, C, O, has_bias = ctx.sizes  # type: ignore[attr-defined]
        (H, W), (ho, wo) = geo.transform, geo.out
        first, second = geo.inverse(gy.dtype, gy.device)
        g = gy.permute(2, 3, 0, 1).reshape(ho, wo, B * O)
        gZ = torch.bmm(second.t().expand(ho, *second.t().shape), g)  # (ho, 2V, B O)
        gP = expanding_mm(first.t(), gZ.view(2 * ho, -1)).view(-1, B, O)  # (3 F, B, O)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            gX = torch.bmm(gP, V.transpose(1, 2))  # (3 F, B, C)
            gx = half_spectrum_adjoint(gX.view(3, -1, B * C), geo.h, geo.w, H, W, -1).view(B, C, geo.h, geo.w)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            gV = torch.bmm(X.transpose(1, 2), gP)  # (3 F, C, O)
            gw = half_spectrum_adjoint(gV.view(3, -1, C * O), geo.kh, geo.kw, H, W, +1)
            gw = gw.view(C, O, geo.kh, geo.kw).transpose(0, 1)
        if has_bias and ctx.needs_input_grad[2]:  # type: ignore[attr-defined]
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None


def fourier_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1,
                   padding: int | tuple[int, int] = 0, chunk: int | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) without dilation or groups (`padding` zeros on each side);
    same result to fp32 rounding.

    `chunk`: without autograd, take the batch this many samples at a time (the kernel's spectrum computed
    once for all of them), which bounds the frequency-domain temporaries."""
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x (B, C, H, W) and weight (O, C, kh, kw); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    if min(ph, pw) < 0 or stride < 1:
        raise ValueError(f"expected padding >= 0 and stride >= 1; got {padding}, {stride}")
    geo = _Geometry(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, ph, pw)
    if geo.kh > geo.h + 2 * ph or geo.kw > geo.w + 2 * pw:
        raise ValueError(f"kernel {tuple(weight.shape[2:])} is larger than the padded input "
                         f"{(geo.h + 2 * ph, geo.w + 2 * pw)}")
    if chunk is not None and len(x) > chunk and not torch.is_grad_enabled():
        V = _kernel_spectrum(weight, *geo.transform)
        return torch.cat([_products(part, V, bias, geo)[0] for part in x.split(chunk)])
    out: Tensor = _FourierConv.apply(x, weight, bias, geo)
    return out


__all__ = ["fourier_conv2d", "half_spectrum", "half_spectrum_adjoint", "inverse_dft", "separable_dft"]
