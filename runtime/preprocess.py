"""open_clip's evaluation transform in numpy + Pillow (no torch, no torchvision).

The image graph takes uint8 pixels already resized and cropped; this module produces them. Each
step mirrors what torchvision does on a PIL image, so that the pixels are bit-identical:
Resize(shortest edge, PIL bicubic) -> CenterCrop (pad with fill_color when too small) -> RGB.
The float scaling and mean/std normalisation live in the graph (see export.onnx_export.ImageGraph);
`normalize` here repeats them for tests and for the torch backend.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .errors import CgilError
from .images import ImageLike, load_image

_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
_SUPPORT = {Image.BICUBIC: 2.0, Image.BILINEAR: 1.0}  # Pillow's filter radii, in source pixels at scale 1
# A resize to more pixels than this is done in the crop only (see _resize_crop): a 1,000,000 x 1 strip
# would otherwise become 224 x 224,000,000 pixels before being cropped to 224 x 224. 4 MP (16 MB as RGB)
# is an image over 83:1 for a 224-px model: every ordinary image keeps the full resize, bit for bit.
CROP_ONLY_PIXELS = 4 * 1024 * 1024


@functools.lru_cache(maxsize=None)
def _pillow_may_start_vertically() -> bool:
    """Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels as
    the width (Resample.c); older versions always start horizontally. One tiny resize tells which is here."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 8, 3), dtype=np.uint8))
    full = np.asarray(img.resize((7, 16), Image.BICUBIC))
    return np.array_equal(full, np.asarray(img.resize((8, 16), Image.BICUBIC).resize((7, 16), Image.BICUBIC)))


def _vertical_first(w: int, h: int, new_w: int, new_h: int) -> bool:
    """The order of Pillow's passes when it resizes (w, h) to (new_w, new_h)."""
    return h - new_h > 0 and h - new_h > 2 * (w - new_w) and _pillow_may_start_vertically()


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Preprocess":
        if cfg.get("resize_mode", "shortest") not in ("shortest", "longest", "squash"):
            raise CgilError(f"unsupported resize_mode {cfg.get('resize_mode')!r}")
        try:
            size = cfg["size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            out = cls((int(size[0]), int(size[1])), tuple(float(v) for v in cfg["mean"]),
                      tuple(float(v) for v in cfg["std"]), cfg.get("interpolation") or "bicubic",
                      cfg.get("resize_mode") or "shortest", int(cfg.get("fill_color", 0)))
        except (KeyError, TypeError, ValueError, IndexError) as e:  # an edited manifest: one line, not a traceback
            raise CgilError(f"malformed preprocess section {cfg!r}: {type(e).__name__}: {e}") from None
        if len(size) != 2 or min(out.size) < 1 or len(out.mean) != 3 or len(out.std) != 3 or not all(out.std):
            raise CgilError(f"malformed preprocess section {cfg!r}: size must be 2 positive ints, mean/std 3 values")
        return out

    @property
    def _filter(self) -> int:
        return _FILTERS.get(self.interpolation, Image.BICUBIC)  # "random" means bicubic at eval, as in open_clip

    def _resize(self, img: Image.Image, new_size: tuple[int, int] | None = None) -> Image.Image:
        new_w, new_h = new_size or self._new_size(*img.size)
        if (new_w, new_h) == img.size:
            return img
        return img.resize((new_w, new_h), self._filter)

    def _new_size(self, w: int, h: int) -> tuple[int, int]:
        th, tw = self.size
        if self.resize_mode == "squash":
            new_h, new_w = th, tw
        elif self.resize_mode == "longest" or th != tw:
            # open_clip's ResizeKeepRatio: one ratio from the longest (or shortest) edge, rounded sizes
            ratio_h, ratio_w = h / th, w / tw
            ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
            # at least 1 px: a strip fitted into the longest edge would round its short side to 0
            new_h, new_w = max(1, round(h / ratio)), max(1, round(w / ratio))
        else:
            # torchvision Resize(int): the short edge becomes `size`, the long edge is truncated
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = th, int(th * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return new_w, new_h

    def _resize_crop(self, img: Image.Image, new_w: int, new_h: int) -> Image.Image:
        """_crop(_resize(img)) for an image whose resize is far larger than the crop: only the crop is computed.

        Pillow resizes in two one-axis passes; these are the same passes, in the same order, on the
        crop's source pixels only (with the filter's margin). The crop's box offsets are rounded to
        float32 by Pillow, which can move a pixel by one level; small offsets keep that rare.
        """
        w, h = img.size
        th, tw = self.size
        top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))  # as _crop
        sx, sy = w / new_w, h / new_h
        f = self._filter

        def band(lo: float, hi: float, scale: float, n: int) -> tuple[int, int]:  # source pixels a pass reads
            margin = math.ceil(_SUPPORT.get(f, 2.0) * max(1.0, scale)) + 1
            return max(0, math.floor(lo) - margin), min(n, math.ceil(hi) + margin)

        (c0, c1), (r0, r1) = band(left * sx, (left + tw) * sx, sx, w), band(top * sy, (top + th) * sy, sy, h)
        img = img.crop((c0, r0, c1, r1))
        x0, x1, y0, y1 = left * sx - c0, (left + tw) * sx - c0, top * sy - r0, (top + th) * sy - r0
        if _vertical_first(w, h, new_w, new_h):
            img = img.resize((c1 - c0, th), f, box=(0, y0, c1 - c0, y1))
            return img.resize((tw, th), f, box=(x0, 0, x1, th))
        img = img.resize((tw, r1 - r0), f, box=(x0, 0, x1, r1 - r0))
        return img.resize((tw, th), f, box=(0, y0, tw, y1))

    def _crop(self, img: Image.Image) -> Image.Image:
        th, tw = self.size
        w, h = img.size
        if tw > w or th > h:  # torchvision pads (fill_color) before centre-cropping an image that is too small
            fill = self.fill_color if self.resize_mode == "longest" else 0
            canvas = Image.new(img.mode, (max(w, tw), max(h, th)), (fill,) * len(img.getbands()))
            canvas.paste(img, ((tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0))
            img, (w, h) = canvas, canvas.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))

    def pixels(self, image: ImageLike) -> np.ndarray:
        """One image -> uint8 (H, W, 3) at the model's size, as the image graph expects."""
        img = load_image(image)
        new_w, new_h = self._new_size(*img.size)
        th, tw = self.size
        if self.resize_mode == "squash":
            img = self._resize(img, (new_w, new_h))
        elif new_w * new_h > CROP_ONLY_PIXELS and new_w >= tw and new_h >= th:  # a strip: see CROP_ONLY_PIXELS
            img = self._resize_crop(img, new_w, new_h)
        else:
            img = self._crop(self._resize(img, (new_w, new_h)))
        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def batch(self, images: Sequence[ImageLike]) -> np.ndarray:
        h, w = self.size
        if not len(images):
            return np.zeros((0, h, w, 3), np.uint8)
        return np.stack([self.pixels(im) for im in images])

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW, exactly ToTensor + Normalize."""
        x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        mean = np.asarray(self.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, 3, 1, 1)
        return (x - mean) / std
