"""Reading images: one loader for datasets, exports and devices alike.

A path, a PIL image or a uint8 array becomes an RGB PIL image; a file that cannot be read raises a
CgilError naming it. Files and untrusted bytes are turned upright by their EXIF Orientation (a phone
stores a portrait photo as landscape pixels tagged "rotate 90"); a PIL image or array is taken as given.
Torch-free.
"""
from __future__ import annotations

import io
import os
import re
import warnings
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
# EXIF Orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose does)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_ORIENTATION = 0x0112
# What the loader does to a file's pixels, part of every feature-cache key: a change here (2: EXIF
# orientation applied) must not leave features computed from the old pixels in anyone's cache.
LOADER_VERSION = 2
# Header parsing is Python code in Pillow, one iteration per JPEG marker, junk byte or PNG chunk: a 16 MB
# body of empty markers costs seconds before any limit applies. Real files have a few dozen markers
# before the image data and chunks of kilobytes; anything far beyond that is refused from a C-speed scan.
MAX_JPEG_MARKERS = 1000  # markers before the first scan
MAX_JPEG_JUNK = 65536  # fill and stray bytes between them
_FILL = re.compile(rb"\xff+")
_NO_LENGTH = {0x00, 0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI (and an escaped 0xFF): markers without a length


def quiet_pillow_bomb_warning() -> None:
    """Pillow warns (a Python warning, with a source line) for images between 1x and 2x MAX_IMAGE_PIXELS;
    cgil applies its own limits and says so in one line of its own. Installed where images are opened,
    not once at import: a warnings.catch_warnings() block around an import (pytest does this) would drop it."""
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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
    quiet_pillow_bomb_warning()
    try:
        with Image.open(path, formats=FILE_FORMATS) as f:
            if f.width * f.height > (Image.MAX_IMAGE_PIXELS or f.width * f.height):
                from .console import warn  # lazily: rich is only needed on this rare path

                warn(f"{path}: {f.width}x{f.height} = {f.width * f.height / 1e6:.0f} megapixels, over Pillow's "
                     f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP decompression-bomb threshold: decoded anyway "
                     f"({decoded_bytes(f) / 2**20:.0f} MB)")
            f.load()
            return upright(f.copy(), orientation(f))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise CgilError(f"cannot read image {path}: {e}") from e


def orientation(img: Image.Image) -> int:
    """The EXIF Orientation of an opened file (1: as stored); a malformed EXIF block reads as 1, not an error."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (Pillow's EXIF parser raises many types on broken data; the pixels are fine)
        return 1
    return value if isinstance(value, int) else 1


def upright(img: Image.Image, turn: int) -> Image.Image:
    """`img` as it is meant to be seen, for EXIF Orientation `turn` (read before any reduce or copy)."""
    return img.transpose(_UPRIGHT[turn]) if turn in _UPRIGHT else img


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
    quiet_pillow_bomb_warning()
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
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba)  # an RGBA mask is its alpha band: no copies of it, no split
        return background
    return img.convert("RGB")


def decoded_bytes(img: Image.Image) -> int:
    """The bytes a decoder produces for an image, from its header: pixels x bytes per pixel of its mode,
    doubled for 16-bit samples (Pillow keeps a 16-bit RGB(A) PNG as 8-bit RGB(A), but inflates it whole)."""
    sixteen = any(";16" in str(getattr(t, "args", t[3] if len(t) > 3 else "")) for t in (img.tile or []))
    per_pixel = _MODE_BYTES.get(img.mode, 4)
    return img.width * img.height * (per_pixel * 2 if sixteen and per_pixel != 2 else per_pixel)


def _jpeg_first_scan(data: bytes) -> int:
    """The number of components in a JPEG's first scan (0 if it has none), walking its markers at C speed.

    Refuses more than MAX_JPEG_MARKERS markers or MAX_JPEG_JUNK stray bytes before the first scan: what
    Pillow's header parser would otherwise step through one Python iteration at a time."""
    p, n, markers, junk = 2, len(data), 0, 0
    while p < n:
        if data[p] != 0xFF:  # stray bytes up to the next marker
            q = data.find(b"\xff", p)
            junk, p = junk + ((n if q < 0 else q) - p), (n if q < 0 else q)
        else:
            q = _FILL.match(data, p).end()  # 0xFF fill before the marker code
            junk, p = junk + (q - p - 1), q
            if p < n:
                marker, p, markers = data[p], p + 1, markers + 1
                if marker == 0xDA:  # start of scan: its length, then the number of components
                    return data[p + 2] if p + 2 < n else 0
                if marker not in _NO_LENGTH:
                    p += int.from_bytes(data[p:p + 2], "big")
        if markers > MAX_JPEG_MARKERS or junk > MAX_JPEG_JUNK:
            raise CgilError(f"malformed JPEG: more than {MAX_JPEG_MARKERS} markers or {MAX_JPEG_JUNK} stray bytes "
                            f"before the image data")
    return 0


def _check_png_chunks(data: bytes) -> None:
    """Pillow reads PNG chunks one Python iteration each (IDAT included): refuse a flood of tiny ones."""
    p, n, chunks = 8, len(data), 0
    limit = 1000 + n // 1024  # real encoders write IDAT chunks of 8 KB and more
    while p + 8 <= n:
        chunks += 1
        if chunks > limit:
            raise CgilError(f"malformed PNG: more than {limit} chunks in {n} bytes")
        if data[p + 4:p + 8] == b"IEND":
            return
        p += 12 + int.from_bytes(data[p:p + 4], "big")


def open_header(data: bytes) -> tuple[Image.Image, int]:
    """Untrusted bytes -> (an image of SERVE_FORMATS, opened but not decoded; for a JPEG the number of
    components in its first scan, else 0). Marker and chunk floods are refused before Pillow parses them."""
    first_scan = 0
    if data[:2] == b"\xff\xd8":
        first_scan = _jpeg_first_scan(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png_chunks(data)
    quiet_pillow_bomb_warning()
    try:
        return Image.open(io.BytesIO(data), formats=SERVE_FORMATS), first_scan
    except Image.DecompressionBombError as e:
        raise CgilError(f"over the {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels that Pillow decodes "
                        f"({e})") from None


def jpeg_whole_bytes(img: Image.Image, first_scan: int) -> int:
    """What libjpeg holds for a JPEG whatever the scale it outputs: nothing for a single-scan baseline JPEG
    (decoded a band at a time), every DCT coefficient (2 bytes) of the full image for a progressive or
    multi-scan one, whose last scan can refine any block. Call before draft (it reads the full size)."""
    if not (img.info.get("progressive") or first_scan < len(img.layer)):
        return 0
    hmax, vmax = max(c[1] for c in img.layer), max(c[2] for c in img.layer)
    mcu_x, mcu_y = -(-img.width // (8 * hmax)), -(-img.height // (8 * vmax))
    return sum(mcu_x * h * mcu_y * v for _, h, v, _ in img.layer) * 64 * 2


def max_rows(max_bytes: int) -> int:
    """Rows an image may have: Pillow keeps a pointer per row, so a 1 x 8,388,608 strip is 32 MB of pixels
    but 64 MB more of pointers in every copy. An eighth of the byte budget in pointers (524,288 rows for 32 MB)
    is far above any real picture's height (JPEG and GIF stop at 65,535, WebP at 16,383)."""
    return max_bytes // 64


def open_bounded(data: bytes, max_pixels: int, max_bytes: int, min_side: int) -> Image.Image:
    """Decode untrusted image bytes within limits, as small as the classifier allows, upright (EXIF).

    Refused from the header, before decoding: a format outside SERVE_FORMATS, a flood of markers or
    chunks (open_header), more than `max_pixels` pixels or `max_rows` rows, or more than `max_bytes` once
    decoded (mode and bit depth count). Large images are decoded small: JPEG at a DCT scale (draft), others box-reduced by
    an integer factor, in both cases keeping the short side at least 2 x `min_side` (the model's input),
    so the resize that follows still downsamples and its quality is kept. A progressive or multi-scan
    JPEG counts whole, pixels and coefficients, whatever its scale: libjpeg decodes all of it.
    Returns a loaded image (any mode; see to_rgb).
    """
    img, first_scan = open_header(data)
    try:
        keep = 2 * max(1, min_side)
        short = min(img.size)
        whole, (width, height) = 0, img.size
        if img.format in ("JPEG", "MPO"):  # MPO: a camera's multi-picture JPEG, opened as its first picture
            whole = jpeg_whole_bytes(img, first_scan)
            if short >= 2 * keep:
                scale = keep / short  # draft picks the smallest DCT scale (1/2, 1/4, 1/8) that stays >= this size
                img.draft("RGB", (max(1, int(img.width * scale) + 1), max(1, int(img.height * scale) + 1)))
        # the limits apply to what will be decoded: a single-scan JPEG at its draft scale, others whole
        pixels = width * height if whole else img.width * img.height
        if pixels > max_pixels:
            kind = " progressive/multi-scan JPEG (decoded whole at any scale)" if whole else ""
            raise CgilError(f"{width}x{height}{kind}: {pixels} pixels is over the limit of {max_pixels}")
        if img.height > max_rows(max_bytes):
            raise CgilError(f"{img.width}x{img.height}: {img.height} rows is over the limit of {max_rows(max_bytes)} "
                            f"(Pillow keeps an 8-byte pointer per row, in every copy)")
        cost = whole + decoded_bytes(img)
        if cost > max_bytes:
            kind = f" + {whole} bytes of JPEG coefficients (progressive/multi-scan)" if whole else ""
            raise CgilError(f"{img.width}x{img.height} {img.mode} decodes to {decoded_bytes(img)} bytes{kind}, "
                            f"over the limit of {max_bytes}")
        img.load()
        turn = orientation(img)  # only now: Pillow may decode a PNG to find its EXIF
        factor = min(img.size) // keep
        if factor >= 2:  # reduce has no 16-bit, palette or 1-bit mode: convert those first
            if img.mode.startswith("I;16"):
                img = to_8bit(img)
            elif img.mode in ("P", "1"):
                img = img.convert("RGBA" if img.mode == "P" else "L")
            img = img.reduce(factor)
        return upright(img, turn)
    except BaseException:
        img.close()
        raise
