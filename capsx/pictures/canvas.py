"""Pictures as arrays: tile grids, captions and colour maps. Everything here
returns uint8 numpy arrays ((H, W) grey or (H, W, 3) colour); nothing is logged
or written except by `save_png`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

BACKGROUND = 40  # grey between tiles, so black tiles (dead channels) stay visible
RED = (230, 60, 50)
GREEN = (60, 210, 60)


def to_uint8(images: Tensor, per_image: bool = False) -> np.ndarray:
    """(N, C, H, W) or (N, H, W) float -> (N, H, W[, 3]) uint8.

    per_image: stretch each image's min..max to 0..255 (filters); otherwise values
    are taken as 0..1 (pixels, lengths) and clipped.
    """
    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if per_image:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-12)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 3:
        return x.permute(0, 2, 3, 1).numpy()
    return x[:, 0].numpy()


def colour_overlay(base: Tensor, layers: Tensor, colours: Sequence[tuple[int, int, int]],
                   base_level: float = 0.45) -> np.ndarray:
    """Images (N, [1,] H, W) in dimmed grey with layers (N, k, [1,] H, W) on top, layer j in colours[j];
    values 0..1; where layers overlap their colours add (red + green: yellow). -> (N, H, W, 3) uint8."""
    x = base.detach().float().cpu()
    N, H, W = len(x), x.shape[-2], x.shape[-1]
    out = (base_level * x.reshape(N, H, W, 1)).expand(N, H, W, 3).clone()
    per_layer = layers.detach().float().cpu().reshape(N, -1, H, W, 1)
    for j, colour in enumerate(colours):
        out += per_layer[:, j] * torch.tensor(colour, dtype=torch.float32) / 255
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> an RGB heat map (black, red, yellow, white), (..., 3) uint8."""
    v = np.clip(values.astype(np.float32), 0, 1)
    r = np.clip(3 * v, 0, 1)
    g = np.clip(3 * v - 1, 0, 1)
    b = np.clip(3 * v - 2, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def _rgb(tile: np.ndarray) -> np.ndarray:
    return tile if tile.ndim == 3 else np.repeat(tile[..., None], 3, axis=-1)


def grid(tiles: Sequence[np.ndarray] | np.ndarray, cols: int, scale: int = 1, pad: int = 1,
         marked: Sequence[bool] | None = None) -> np.ndarray:
    """Lay equal-sized tiles out row by row, `scale`x enlarged, with a `pad` border.
    Tiles in `marked` get a red border. Returns (H, W, 3) uint8."""
    tiles = [_rgb(np.asarray(t)) for t in tiles]
    assert tiles, "no tiles"
    h, w = tiles[0].shape[:2]
    h, w = h * scale, w * scale
    rows = -(-len(tiles) // cols)
    out = np.full((rows * (h + 2 * pad), cols * (w + 2 * pad), 3), BACKGROUND, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = r * (h + 2 * pad), c * (w + 2 * pad)
        if marked is not None and marked[k] and pad > 0:
            out[y:y + h + 2 * pad, x:x + w + 2 * pad] = RED
        out[y + pad:y + pad + h, x + pad:x + pad + w] = np.kron(tile, np.ones((scale, scale, 1), np.uint8))
    return out


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def caption_above(image: np.ndarray, lines: Sequence[str], size: int = 12) -> np.ndarray:
    """Add a band of text lines above an (H, W, 3) image."""
    font = _font(size)
    line_h = size + 4
    band = Image.new("RGB", (image.shape[1], line_h * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * line_h), line, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(band), _rgb(image)], axis=0)


def label_grid(image: np.ndarray, rows: int, cols: int, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, size: int = 11,
               cell_labels: Sequence[str] | None = None, label_colors: Sequence[tuple[int, int, int]] | None = None,
               ) -> np.ndarray:
    """Write row labels on the left, column labels on top, and optional per-cell labels
    under each cell of a grid image made by `grid` with `rows` x `cols` cells."""
    font = _font(size)
    img = Image.fromarray(_rgb(image))
    cell_h, cell_w = img.height // rows, img.width // cols
    line = size + 4
    left = 0
    if row_labels:
        left = max(int(ImageDraw.Draw(img).textlength(t, font=font)) for t in row_labels) + 8
    top = line if col_labels else 0
    extra = line if cell_labels else 0  # a text line under every cell row
    canvas = Image.new("RGB", (img.width + left, img.height + top + extra * rows), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y = top + r * (cell_h + extra)
        canvas.paste(img.crop((0, r * cell_h, img.width, (r + 1) * cell_h)), (left, y))
        if row_labels and r < len(row_labels):
            draw.text((4, y + cell_h // 2 - size // 2), row_labels[r], fill=(0, 0, 0), font=font)
        if cell_labels:
            for c in range(cols):
                k = r * cols + c
                if k < len(cell_labels):
                    color = label_colors[k] if label_colors else (0, 0, 0)
                    draw.text((left + c * cell_w + 2, y + cell_h + 1), cell_labels[k], fill=color, font=font)
    if col_labels:
        for c, text in enumerate(col_labels):
            draw.text((left + c * cell_w + 2, 2), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_png(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
