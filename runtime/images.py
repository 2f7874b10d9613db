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
# The decoders Pillow may use: pure-library formats only. EPS/PS would run Ghostscript on the input,
# and the long tail of plugins (FITS, PSD, ICNS...) is attack surface a classifier does not need.
SERVE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
FILE_FORMATS = SERVE_FORMATS + ("PPM",)  # + the netpbm files of the datasets (.ppm/.pgm)
# Bytes per pixel of Pillow's in-memory modes: what a decoded image really costs (RGB is stored in 4).
# A palette image counts as the RGBA it is converted to.
_MODE_BYTES = {"1": 1, "L": 1, "P": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


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
        with Image.open(path, formats=FILE_FORMATS) as f:
            f.load()
            return f.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise CgilError(f"cannot read image {path}: {e}") from e


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit or 32-bit integer grayscale -> L: values over 255 are read as 16-bit (x * 255 / 65535, floored).

    Integer maths in place (x // 257 is exactly floor(x * 255 / 65535)): a float64 copy of a 40-megapixel
    image costs 320 MB, this costs the 16-bit array once.
    """
    arr = np.array(img, dtype=np.int64 if img.mode == "I" else np.uint16)
    if img.mode == "I":
        np.clip(arr, 0, 65535, out=arr)
    hi = arr.max() if arr.size else 0
    if hi > 255:
        np.floor_divide(arr, 257, out=arr)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def check_image(path: Union[str, os.PathLike]) -> None:
    """Cheap readability check (header only, no decoding): a CgilError naming the file and the cause.

    Catches what makes a file useless before hours of work depend on it: not an image (a macOS
    `._IMG_0001.jpg` resource fork), a truncated header, or more pixels than Pillow will decode.
    """
    path = os.fspath(path)
    try:
        with Image.open(path, formats=FILE_FORMATS) as f:  # the decoders open_image would use
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
        img = to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img.convert("RGB")


def decoded_bytes(img: Image.Image) -> int:
    """The bytes a decoder produces for an image, from its header: pixels x bytes per pixel of its mode,
    doubled for 16-bit samples (Pillow keeps a 16-bit RGB(A) PNG as 8-bit RGB(A), but inflates it whole)."""
    sixteen = any(";16" in str(getattr(t, "args", t[3] if len(t) > 3 else "")) for t in (img.tile or []))
    per_pixel = _MODE_BYTES.get(img.mode, 4)
    return img.width * img.height * (per_pixel * 2 if sixteen and per_pixel != 2 else per_pixel)


def open_bounded(data: bytes, max_pixels: int, max_bytes: int, min_side: int) -> Image.Image:
    """Decode untrusted image bytes within limits, as small as the classifier allows.

    Refused from the header, before decoding: a format outside SERVE_FORMATS, more than `max_pixels`
    pixels, or more than `max_bytes` once decoded (mode and bit depth count). Large images are decoded
    small: JPEG at a DCT scale (draft), others box-reduced by an integer factor, in both cases keeping
    the short side at least 2 x `min_side` (the model's input), so the resize that follows still
    downsamples and its quality is kept. Returns a loaded image (any mode; see to_rgb).
    """
    import io

    img = Image.open(io.BytesIO(data), formats=SERVE_FORMATS)
    try:
        keep = 2 * max(1, min_side)
        short = min(img.size)
        if img.format == "JPEG" and short >= 2 * keep:
            scale = keep / short  # draft picks the smallest DCT scale (1/2, 1/4, 1/8) that stays >= this size
            img.draft("RGB", (max(1, int(img.width * scale) + 1), max(1, int(img.height * scale) + 1)))
        # the limits apply to what will be decoded: a JPEG at its draft scale, others whole
        if img.width * img.height > max_pixels:
            raise CgilError(f"{img.width}x{img.height} pixels is over the limit of {max_pixels}")
        if decoded_bytes(img) > max_bytes:
            raise CgilError(f"{img.width}x{img.height} {img.mode} decodes to {decoded_bytes(img)} bytes, "
                            f"over the limit of {max_bytes}")
        img.load()
        factor = min(img.size) // keep
        if factor >= 2:  # reduce has no 16-bit, palette or 1-bit mode: convert those first
            if img.mode.startswith("I;16"):
                img = to_8bit(img)
            elif img.mode in ("P", "1"):
                img = img.convert("RGBA" if img.mode == "P" else "L")
            img = img.reduce(factor)
        return img
    except BaseException:
        img.close()
        raise
