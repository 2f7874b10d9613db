"""Reading images: one loader for datasets, exports and devices alike.

A path, a PIL image or a uint8 array becomes an RGB PIL image; a file that cannot be read raises a
CgilError naming it. Torch-free.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import CgilError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_image(image: ImageLike) -> Image.Image:
    """Any supported item -> RGB PIL image."""
    return to_rgb(open_image(image))


def open_image(image: ImageLike) -> Image.Image:
    """A path, PIL image or uint8 array (HW, HWC) -> PIL image; unreadable files raise a CgilError naming them."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise CgilError(f"an image array must be uint8 (H, W) or (H, W, 1|3|4), got {image.dtype} {image.shape}")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    path = os.fspath(image)
    try:
        with Image.open(path) as f:
            f.load()
            return f.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise CgilError(f"cannot read image {path}: {e}") from e


def check_image(path: Union[str, os.PathLike]) -> None:
    """Cheap readability check (header only, no decoding): a CgilError naming the file and the cause.

    Catches what makes a file useless before hours of work depend on it: not an image (a macOS
    `._IMG_0001.jpg` resource fork), a truncated header, or more pixels than Pillow will decode.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as f:
            w, h = f.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CgilError(f"cannot read image {path}: {e}") from e
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > 2 * limit:  # what Pillow itself refuses to decode
        raise CgilError(f"cannot read image {path}: {w}x{h} = {w * h / 1e6:.0f} megapixels, above the "
                        f"{2 * limit / 1e6:.0f} MP that Pillow decodes")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from grayscale, 16-bit, palette, RGBA (composited on white) or CMYK images."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (65535.0 if hi > 255 else 255.0) * 255.0).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img.convert("RGB")
