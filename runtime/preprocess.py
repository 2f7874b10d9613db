"""open_clip's evaluation transform in numpy + Pillow (no torch, no torchvision).

The image graph takes uint8 pixels already resized and cropped; this module produces them. Each
step mirrors what torchvision does on a PIL image, so that the pixels are bit-identical:
Resize(shortest edge, PIL bicubic) -> CenterCrop (pad with fill_color when too small) -> RGB.
The float scaling and mean/std normalisation live in the graph (see export.onnx_export.ImageGraph);
`normalize` here repeats them for tests and for the torch backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .errors import CgilError
from .images import ImageLike, load_image

_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


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

    def _resize(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        th, tw = self.size
        if self.resize_mode == "squash":
            new_h, new_w = th, tw
        elif self.resize_mode == "longest" or th != tw:
            # open_clip's ResizeKeepRatio: one ratio from the longest (or shortest) edge, rounded sizes
            ratio_h, ratio_w = h / th, w / tw
            ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
            new_h, new_w = round(h / ratio), round(w / ratio)
        else:
            # torchvision Resize(int): the short edge becomes `size`, the long edge is truncated
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = th, int(th * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), self._filter)

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
        img = self._resize(img)
        if self.resize_mode != "squash":
            img = self._crop(img)
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
