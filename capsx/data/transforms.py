"""Geometric transforms of whole batches, on the batch's device: integer shifts
(the paper's augmentation, and placing a digit on a larger canvas), crops, and
affine warps (affNIST-style test sets, the robustness sweeps).

Every function takes (B, C, H, W) images and per-image parameters, so a
10,000-image test set is transformed in a few tensor operations, not a
Python loop per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def window_offsets(count: int, span_h: int, span_w: int, generator: torch.Generator) -> Tensor:
    """(2, count) random window positions: rows in [0, span_h], columns in [0, span_w]."""
    rows = torch.randint(0, span_h + 1, (count,), generator=generator, device=generator.device)
    cols = torch.randint(0, span_w + 1, (count,), generator=generator, device=generator.device)
    return torch.stack([rows, cols])


def take_windows(images: Tensor, offsets: Tensor, h: int, w: int) -> Tensor:
    """The h x w window of each image (B, C, H, W) whose top-left corner is its own (row, column) offset."""
    B, C = images.shape[:2]
    offsets = offsets.to(images.device)
    rows = (offsets[0].view(B, 1) + torch.arange(h, device=images.device)).view(B, 1, h, 1)
    cols = (offsets[1].view(B, 1) + torch.arange(w, device=images.device)).view(B, 1, 1, w)
    batch = torch.arange(B, device=images.device).view(B, 1, 1, 1)
    chan = torch.arange(C, device=images.device).view(1, C, 1, 1)
    return images[batch, chan, rows, cols]


def translate(images: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Move image b by (dx[b], dy[b]) whole pixels (right, down), zero filled; any dtype."""
    m = int(max(dx.abs().max().item(), dy.abs().max().item(), 0)) if len(images) else 0
    return shift_by(images, torch.stack([m - dy, m - dx]), m)


def shift_by(images: Tensor, offsets: Tensor, max_shift: int) -> Tensor:
    """Shift each image by max_shift - offset, zero padded: offsets (2, B) in [0, 2 * max_shift] are the
    (row, column) corners of each image's window in the max_shift-padded image."""
    m = max_shift
    return take_windows(F.pad(images, (m, m, m, m)), offsets, *images.shape[-2:])


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image (B, C, H, W) by its own random (dx, dy) in [-max_shift, max_shift], zero padded."""
    return shift_by(images, window_offsets(len(images), 2 * max_shift, 2 * max_shift, generator), max_shift)


def random_crop(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A size x size window of each image (B, C, H, W), each at its own random position."""
    H, W = images.shape[-2:]
    return take_windows(images, window_offsets(len(images), H - size, W - size, generator), size, size)


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central size x size window of every image (B, C, H, W); odd margins leave the extra pixel below/right."""
    H, W = images.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    return images[..., top:top + size, left:left + size].contiguous()


def centre_on_canvas(images: Tensor, canvas: int) -> Tensor:
    """Pad (B, C, h, w) images with zeros to (B, C, canvas, canvas), the image in the middle
    (rounded towards the top left when the margin is odd)."""
    h, w = images.shape[-2:]
    if canvas < max(h, w):
        raise ValueError(f"canvas {canvas} is smaller than the {h}x{w} images")
    top, left = (canvas - h) // 2, (canvas - w) // 2
    return F.pad(images, (left, canvas - w - left, top, canvas - h - top))


def affine_matrices(rotate: Tensor, scale: Tensor, shear: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """(B, 2, 3) maps in pixel units about the image centre: shear along x, then scale, then
    rotate (degrees, counter-clockwise as seen on screen), then move by (dx, dy) pixels."""
    a = torch.deg2rad(rotate.float())
    cos, sin = torch.cos(a), torch.sin(a)
    s, k = scale.float(), shear.float()
    # rows are image (x right, y down); a counter-clockwise turn on screen is clockwise in these axes
    m00, m01 = s * cos, s * (cos * k + sin)
    m10, m11 = -s * sin, s * (-sin * k + cos)
    top = torch.stack([m00, m01, dx.float()], dim=1)
    bottom = torch.stack([m10, m11, dy.float()], dim=1)
    return torch.stack([top, bottom], dim=1)


def warp(images: Tensor, forward: Tensor) -> Tensor:
    """Apply (B, 2, 3) pixel-unit maps `forward` (output = M @ input about the centre) with
    bilinear sampling and zero outside; uint8 in, uint8 out (rounded), else float."""
    B, C, H, W = images.shape
    lin = forward[:, :, :2]
    inv = torch.linalg.inv(lin)  # grid_sample asks, for each output pixel, where to read the input
    shift = -(inv @ forward[:, :, 2:])  # (B, 2, 1)
    # pixel units -> affine_grid's normalised units (align_corners=False: the image spans [-1, 1])
    to_norm = torch.tensor([2.0 / W, 2.0 / H], device=images.device)
    scale_in = torch.tensor([W / 2.0, H / 2.0], device=images.device)
    theta_lin = to_norm.view(1, 2, 1) * inv.to(images.device) * scale_in.view(1, 1, 2)
    theta = torch.cat([theta_lin, to_norm.view(1, 2, 1) * shift.to(images.device)], dim=2)
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out


def ink_box(images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per image: first and last row, first and last column holding any ink (all zero images: the
    whole frame), as (top, bottom, left, right) int64 tensors."""
    B, _, H, W = images.shape
    ink = images.ne(0).any(dim=1)  # (B, H, W)
    rows, cols = ink.any(dim=2), ink.any(dim=1)  # (B, H), (B, W)
    r = torch.arange(H, device=images.device)
    c = torch.arange(W, device=images.device)
    empty = ~rows.any(dim=1)
    top = torch.where(rows, r, H).min(dim=1).values.masked_fill(empty, 0)
    bottom = torch.where(rows, r, -1).max(dim=1).values.masked_fill(empty, H - 1)
    left = torch.where(cols, c, W).min(dim=1).values.masked_fill(empty, 0)
    right = torch.where(cols, c, -1).max(dim=1).values.masked_fill(empty, W - 1)
    return top, bottom, left, right


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)
