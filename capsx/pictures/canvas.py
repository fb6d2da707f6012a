"""Pictures as arrays: tile grids, captions, labelled grids and colour bars. `to_uint8`, `grid`, `heat` and
`colour_overlay` return uint8 numpy arrays ((H, W) grey or (H, W, 3) colour); the functions that write text
(`caption_above`, `label_grid`, `colour_bar`) return a `Picture`: the pixels, the box of every text drawn on
them and the colour scales they show, so a layout can be checked (no two texts overlap, none is cut at the
edge) without looking. Every text is measured with the font it is drawn in. Nothing is logged or written
except by `save_png`."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from capsx.atomic import replacing

BACKGROUND = 40  # grey between tiles, so black tiles (dead channels) stay visible
PAGE = 255  # white: captions, labels and the unused cells of a grid
RED = (230, 60, 50)
GREEN = (60, 210, 60)
BLACK = (0, 0, 0)
MARGIN = 4  # white space at a text band's left and right
GAP = 6  # the least white space between two texts side by side
WHOLE = 100  # a grid's column is widened to keep a word this wide on one line; a longer one breaks at hyphens


@dataclass(frozen=True)
class TextBox:
    """One text as drawn: the string and the pixels it covers, left/top inclusive, right/bottom exclusive.
    The box is the font's whole line (ascent to descent, the advance width) joined with the ink's own box,
    so two texts whose boxes do not overlap do not touch on the page."""

    text: str
    left: int
    top: int
    right: int
    bottom: int

    def moved(self, dx: int, dy: int) -> TextBox:
        return TextBox(self.text, self.left + dx, self.top + dy, self.right + dx, self.bottom + dy)


@dataclass(frozen=True)
class ColourScale:
    """A colour bar as drawn: the texts at its two ends and what it measures."""

    low: str
    high: str
    label: str


@dataclass(frozen=True)
class Picture:
    """An (H, W, 3) uint8 image, every text drawn on it (where it went) and the colour scales it shows."""

    pixels: np.ndarray
    texts: tuple[TextBox, ...] = ()
    scales: tuple[ColourScale, ...] = ()

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def as_picture(image: np.ndarray | Picture) -> Picture:
    """A picture as is; an array as a colour picture with no text on it."""
    return image if isinstance(image, Picture) else Picture(_rgb(np.asarray(image)))


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


def grid_columns(n: int, widest: float = 3.0) -> int:
    """How many columns a grid of n tiles gets: the least divisor of n from sqrt(n) up, so that every row is
    full (8 -> 4 x 2, 10 -> 5 x 2, 64 -> 8 x 8), unless that grid would be more than `widest` times as wide
    as tall (7 -> 7 x 1); then ceil(sqrt(n)), the last row short (7 -> 3 x 3, two cells left blank)."""
    assert n > 0, "no tiles"
    square = math.ceil(math.sqrt(n))
    for cols in range(square, n + 1):
        if cols > widest * (n // cols):
            break
        if n % cols == 0:
            return cols
    return square


def grid(tiles: Sequence[np.ndarray] | np.ndarray, cols: int, scale: int = 1, pad: int = 1,
         marked: Sequence[bool] | None = None) -> np.ndarray:
    """Lay equal-sized tiles out row by row, `scale`x enlarged, with a `pad` border.
    Tiles in `marked` get a red border. The cells of a short last row are left blank (white), so they do not
    read as tiles. Returns (H, W, 3) uint8."""
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
    for k in range(len(tiles), rows * cols):
        r, c = divmod(k, cols)
        out[r * (h + 2 * pad):(r + 1) * (h + 2 * pad), c * (w + 2 * pad):(c + 1) * (w + 2 * pad)] = PAGE
    return out


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


class _Pen:
    """One font: measures texts, breaks them into lines and writes them, recording where each one went."""

    def __init__(self, size: int) -> None:
        self.font = _font(size)
        if isinstance(self.font, ImageFont.FreeTypeFont):
            ascent, descent = self.font.getmetrics()
            self.height = ascent + descent
        else:  # the bitmap font: its tallest glyphs
            self.height = int(self.font.getbbox("Ag|_")[3])
        self.line = self.height + 1  # from one line's top to the next one's

    def width(self, text: str) -> int:
        return math.ceil(self.font.getlength(text))

    def widest_word(self, texts: Sequence[str], hyphens: bool = True) -> int:
        """The widest run of text `wrap` never breaks (hyphens=False: the widest between spaces)."""
        return max((self.width(piece) for t in texts for part in t.split("\n")
                    for piece in ([p for p, _ in _pieces(part)] if hyphens else part.split(" "))), default=0)

    def wrap(self, text: str, width: int) -> list[str]:
        """`text` broken at its newlines, and at spaces and after hyphens into lines at most `width` pixels
        wide. A piece wider than that is kept whole on a line of its own: the caller makes room for
        `widest_word`."""
        lines = []
        for part in text.split("\n"):
            line = ""
            for piece, joint in _pieces(part):
                longer = line + joint + piece if line else piece
                if line and self.width(longer) > width:
                    lines.append(line)
                    line = piece
                else:
                    line = longer
            lines.append(line)
        return lines

    def write(self, draw: ImageDraw.ImageDraw, x: int, y: int, text: str,
              fill: tuple[int, int, int] = BLACK) -> TextBox:
        """Draw `text` with its line's top-left corner at (x, y); returns the box it covers."""
        draw.text((x, y), text, fill=fill, font=self.font)
        left, top, right, bottom = (int(v) for v in draw.textbbox((x, y), text, font=self.font))
        return TextBox(text, min(x, left), min(y, top), max(x + self.width(text), right), max(y + self.height, bottom))


def _pieces(text: str) -> list[tuple[str, str]]:
    """`text` as the pieces a line may break between, each with what joins it to the one before on the same
    line: words at spaces (" "), and a hyphenated word after each hyphen between two letters ("", the hyphen
    kept before the break; a minus sign stays with its number)."""
    return [(piece, "" if i else " ") for word in text.split(" ")
            for i, piece in enumerate(re.split(r"(?<=[^\W\d_]-)(?=[^\W\d_])", word))]


def stack(*parts: np.ndarray | Picture) -> Picture:
    """Pictures one under the other, left-aligned on white and as wide as the widest, their texts moved along."""
    pictures = [as_picture(p) for p in parts]
    width = max(p.width for p in pictures)
    rows: list[np.ndarray] = []
    texts: list[TextBox] = []
    scales: list[ColourScale] = []
    for p in pictures:
        texts += [b.moved(0, sum(r.shape[0] for r in rows)) for b in p.texts]
        scales += p.scales
        rows.append(np.concatenate([p.pixels, np.full((p.height, width - p.width, 3), PAGE, np.uint8)], axis=1))
    return Picture(np.concatenate(rows, axis=0), tuple(texts), tuple(scales))


def caption_above(image: np.ndarray | Picture, lines: Sequence[str], size: int = 12) -> Picture:
    """Add a band of text lines above an (H, W, 3) image or a picture. Each line is broken at its spaces (and
    after the hyphens of a long word) to fit the picture's width; only a piece wider than that widens the
    picture (white on the right)."""
    below = as_picture(image)
    pen = _Pen(size)
    width = max(below.width, pen.widest_word(lines) + 2 * MARGIN)
    wrapped = [part for line in lines for part in pen.wrap(line, width - 2 * MARGIN)]
    band = Image.new("RGB", (width, pen.line * len(wrapped) + 5), (PAGE,) * 3)
    draw = ImageDraw.Draw(band)
    boxes = tuple(pen.write(draw, MARGIN, 3 + i * pen.line, line) for i, line in enumerate(wrapped) if line)
    return stack(Picture(np.asarray(band), boxes), below)


def label_grid(image: np.ndarray, rows: int, cols: int, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, size: int = 11,
               cell_labels: Sequence[str] | None = None, label_colors: Sequence[tuple[int, int, int]] | None = None,
               ) -> Picture:
    """Write row labels on the left, column labels on top, and optional per-cell labels (as many lines as
    they hold) under each cell of a grid image made by `grid` with `rows` x `cols` cells.

    Every label is measured with the font: column and cell labels are centred on their column and broken at
    their spaces (and newlines) to fit it; a column narrower than its widest word (plus a gap) is widened,
    its cells moved apart on white, so no two labels touch and none is cut. A word wider than WHOLE breaks
    after its hyphens instead, so a very long class name costs lines rather than a very wide picture. Tiles
    keep their size and order."""
    pen = _Pen(size)
    tiles = _rgb(np.asarray(image))
    cell_h, cell_w = tiles.shape[0] // rows, tiles.shape[1] // cols
    cells, tops = list(cell_labels or []), list(col_labels or [])
    pitch = max(cell_w, min(pen.widest_word(cells + tops, hyphens=False), WHOLE) + GAP,
                pen.widest_word(cells + tops) + GAP)  # one column's width
    cell_lines = [pen.wrap(t, pitch - GAP) for t in cells]
    col_lines = [pen.wrap(t, pitch - GAP) for t in tops]
    left = max(pen.width(t) for t in row_labels) + 2 * MARGIN if row_labels else 0
    top = pen.line * max(len(lines) for lines in col_lines) + 2 if col_lines else 0
    under = [pen.line * max((len(lines) for lines in cell_lines[r * cols:(r + 1) * cols]), default=0) for r in
             range(rows)]  # the text lines under each row of cells
    under = [u + 2 if u else 0 for u in under]
    canvas = Image.new("RGB", (left + cols * pitch, top + rows * cell_h + sum(under)), (PAGE,) * 3)
    draw = ImageDraw.Draw(canvas)
    boxes: list[TextBox] = []

    def centred(lines: list[str], c: int, y: int, fill: tuple[int, int, int] = BLACK) -> None:
        for i, line in enumerate(lines):
            if line:
                boxes.append(pen.write(draw, left + c * pitch + (pitch - pen.width(line)) // 2, y + i * pen.line,
                                       line, fill))

    for c, lines in enumerate(col_lines):
        centred(lines, c, 1)
    y = top
    for r in range(rows):
        for c in range(cols):
            cell = tiles[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w]
            canvas.paste(Image.fromarray(np.ascontiguousarray(cell)), (left + c * pitch + (pitch - cell_w) // 2, y))
        if row_labels and r < len(row_labels):
            boxes.append(pen.write(draw, MARGIN, y + max(0, (cell_h - pen.height) // 2), row_labels[r]))
        for c in range(cols):
            k = r * cols + c
            if k < len(cell_lines):
                centred(cell_lines[k], c, y + cell_h + 1, label_colors[k] if label_colors else BLACK)
        y += cell_h + under[r]
    return Picture(np.asarray(canvas), tuple(boxes))


def number(value: float, spec: str = ".3g") -> str:
    """`value` formatted by `spec`; one that rounds to zero reads 0 (or +0 with a "+" spec), never -0."""
    text = format(value, spec)
    mantissa = text.split("e")[0]
    if text.startswith("-") and not any(d in mantissa for d in "123456789"):
        return ("+" if spec.startswith("+") else "") + text[1:]
    return text


def _ends(low: float, high: float, spec: str) -> tuple[str, str]:
    """The two ends of a scale, with up to 3 more digits than `spec` asks for where it would write two different
    values alike (couplings that stay within 0.001 of uniform); as `spec` has them if even that does not tell
    them apart."""
    ends = number(low, spec), number(high, spec)
    digits = re.fullmatch(r"\.(\d+)([fg])", spec)
    if digits is None or ends[0] != ends[1]:
        return ends
    for more in range(1, 4):
        finer = f".{int(digits[1]) + more}{digits[2]}"
        if number(low, finer) != number(high, finer):
            return number(low, finer), number(high, finer)
    return ends


def colour_bar(low: float, high: float, label: str, width: int = 0, kind: str = "heat", spec: str = ".3g",
               size: int = 11, length: int = 100) -> Picture:
    """The key to maps drawn on one shared colour scale: a strip of its colours from `low` (left) to `high`
    (right), both values written at its ends and what it measures after them, or under them if the line
    would be wider than `width`. kind: "heat" (the colours of `heat`) or "grey" (black to white)."""
    pen = _Pen(size)
    lo, hi = _ends(low, high, spec)
    ramp = np.linspace(0.0, 1.0, length)
    colours = heat(ramp) if kind == "heat" else _rgb((ramp * 255).round().astype(np.uint8))
    strip_x = MARGIN + pen.width(lo) + 4
    hi_x = strip_x + length + 4
    end = hi_x + pen.width(hi)
    beside = end + GAP + pen.width(label) + MARGIN <= width
    room = max(width, end + MARGIN, pen.widest_word([label]) + 2 * MARGIN)
    lines = [label] if beside else pen.wrap(label, room - 2 * MARGIN)
    canvas = Image.new("RGB", (room, pen.line * (1 if beside else 1 + len(lines)) + 5), (PAGE,) * 3)
    draw = ImageDraw.Draw(canvas)
    bar_h = max(4, pen.height - 6)
    bar_y = 3 + (pen.height - bar_h) // 2
    draw.rectangle((strip_x - 1, bar_y - 1, strip_x + length, bar_y + bar_h), outline=(BACKGROUND,) * 3)
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(colours[None], bar_h, axis=0))), (strip_x, bar_y))
    boxes = [pen.write(draw, MARGIN, 3, lo), pen.write(draw, hi_x, 3, hi)]
    if beside:
        boxes.append(pen.write(draw, end + GAP, 3, label))
    else:
        boxes += [pen.write(draw, MARGIN, 3 + (i + 1) * pen.line, line) for i, line in enumerate(lines) if line]
    return Picture(np.asarray(canvas), tuple(boxes), (ColourScale(lo, hi, label),))


def with_colour_bar(image: np.ndarray | Picture, low: float, high: float, label: str, kind: str = "heat",
                    spec: str = ".3g") -> Picture:
    """A picture with the colour bar of its shared scale under it."""
    above = as_picture(image)
    return stack(above, colour_bar(low, high, label, width=above.width, kind=kind, spec=spec))


def save_png(image: np.ndarray, path: Path) -> Path:
    """Written whole or not at all (the next epoch's picture replaces this one while the UI may read it)."""
    with replacing(path) as f:
        Image.fromarray(image).save(f, format="PNG")
    return path
