"""A user's own picture turned into a model input the way MNIST digits were made:
grey, light ink on black, the ink's bounding box scaled to 20/28 of the canvas
and centred by its centre of mass."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from capsx.errors import CapsxError

if TYPE_CHECKING:
    from capsx.data.config import DataConfig

INK_FRACTION = 20 / 28  # MNIST: digits fit a 20x20 box inside the 28x28 canvas
MAX_PIXELS = 40_000_000  # larger pictures are refused before decoding (40 MP: about 160 MB as RGB floats)


def load_user_image(path: Path, input_shape: tuple[int, int, int]) -> Tensor:
    """(1, C, H, W) float in [0, 1] for a model that takes `input_shape` inputs."""
    C, H, W = input_shape
    try:
        with Image.open(path) as im:  # reads the header only: the size is known before any decoding
            if im.width * im.height > MAX_PIXELS:
                raise CapsxError(f"--image {path}: {im.width}x{im.height} pixels is more than capsx reads "
                                 f"({MAX_PIXELS // 1_000_000} million); scale it down first")
            im.load()
            picture = im.convert("RGB" if C == 3 else "L")
    except FileNotFoundError:
        raise CapsxError(f"--image {path}: file not found") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise CapsxError(f"--image {path}: not an image file Pillow can read ({e})") from None
    x = np.asarray(picture, dtype=np.float32) / 255.0
    grey = x if x.ndim == 2 else x.mean(axis=2)
    if np.median(grey) > 0.5:  # dark ink on a light page: invert to MNIST's light ink on black
        x, grey = 1.0 - x, 1.0 - grey
    ink = grey > 0.2
    if not ink.any():
        raise CapsxError(f"--image {path}: no ink found (the picture is blank)")
    ys, xs = np.nonzero(ink)
    x = x[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    # Scale the ink's box so its longer side fills INK_FRACTION of the canvas.
    h, w = x.shape[:2]
    s = INK_FRACTION * min(H, W) / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    pil = Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8))
    small = np.asarray(pil.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    # Centre by the centre of mass, as MNIST did: its digits' centres of mass lie in [13.5, 14.5) of the
    # 28x28 canvas (pixel indices, measured on the 10,000 test digits: mean 13.99, 14.01), i.e. at H/2.
    mass = small if small.ndim == 2 else small.mean(axis=2)
    total = mass.sum()
    cy = (mass.sum(axis=1) * np.arange(nh)).sum() / total if total > 0 else nh / 2
    cx = (mass.sum(axis=0) * np.arange(nw)).sum() / total if total > 0 else nw / 2
    top = int(np.floor(H / 2 - cy + 0.5))
    left = int(np.floor(W / 2 - cx + 0.5))
    top, left = min(max(top, 0), H - nh), min(max(left, 0), W - nw)
    canvas = np.zeros((H, W) if small.ndim == 2 else (H, W, 3), np.float32)
    canvas[top:top + nh, left:left + nw] = small
    t = torch.from_numpy(canvas)
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    t = t.expand(C, H, W) if t.shape[0] == 1 else t  # a grey picture for a stereo (2-channel) model: both views
    return t.unsqueeze(0).clamp(0, 1)  # (1, C, H, W)


def prepare_user_image(data: DataConfig, path: Path) -> Tensor:
    """(1, C, H, W) float in [0, 1]: a user's picture made into what the run's model was trained on: a
    digit as MNIST drew its digits, or a photo resized (the image folder's own `resize` rule, else centre
    crop) to the data set's images, then centre-cropped as its test split is."""
    from capsx.data.imagefolder import BadImage, read_photo
    from capsx.data.transforms import center_crop

    if data.user_images == "digit":
        return load_user_image(path, data.input_shape)
    C, H, W = data.image_shape
    if not path.is_file():
        raise CapsxError(f"--image {path}: file not found")
    try:
        pixels = read_photo(path, H, 3 if C == 3 else 1, getattr(data, "resize", "crop"),  # stereo: grey
                            getattr(data, "max_pixels", MAX_PIXELS))
    except BadImage as e:
        raise CapsxError(f"{path}: {e}") from None
    x = torch.from_numpy(pixels).unsqueeze(0)
    x = x.expand(1, C, H, W) if x.shape[1] != C else x  # a grey picture for a stereo (2-channel) model: both views
    if data.augment.crop is not None:
        x = center_crop(x, data.augment.crop)
    return x.float().div(255)
