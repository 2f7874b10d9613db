"""Issue 17: what small image files cost (strips, progressive JPEGs, marker floods) and EXIF orientation.

The server-level bars (peak RSS, decode CPU, /healthz latency under attack) are in test_image_bombs.py;
these tests pin each cause on the real loader, preprocess and decoder functions.
"""
from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import CgilError
from runtime.images import load_image, open_bounded, open_header
from runtime.preprocess import Preprocess
from runtime.server import decode_image
from test_image_bombs import jpeg, png

ROOT = Path(__file__).resolve().parent.parent
MAX_PIXELS, MAX_BYTES = 8_388_608, 32 * 1024 * 1024  # cgil serve's defaults
CLIP = Preprocess((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ---------------------------------------------------------------- strips (item 1)

def test_a_strip_is_resized_in_its_crop_only_under_a_memory_cap(tmp_path):
    """A 1,050-byte 1,000,000 x 1 PNG was resized to 224 x 224,000,000 before the crop (GBs, seconds)."""
    path = tmp_path / "strip.png"
    path.write_bytes(png(1_000_000, 1, 8, 0))
    assert path.stat().st_size < 2000
    script = f"""
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))  # the old resize needs several GB
sys.path.insert(0, {str(ROOT)!r})
from runtime.preprocess import Preprocess
from runtime.server import decode_image
pre = Preprocess((224, 224), (0.5,) * 3, (0.5,) * 3)
t = time.process_time()
for a in (pre.pixels({str(path)!r}), decode_image(open({str(path)!r}, "rb").read(), pre, "strip")):
    assert a.shape == (224, 224, 3) and (a == 0).all(), (a.shape, a.max())
print(time.process_time() - t)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 1.0  # CPU seconds for both (the old code: ~10 s, if memory allowed)


@pytest.mark.parametrize("filt", ["bicubic", "bilinear"])
def test_the_crop_only_resize_matches_the_full_resize_within_one_level(filt):
    """The crop-only path replays Pillow's two passes, in Pillow's order, on the crop's source pixels: the
    same pixels up to float rounding of the box offsets (random noise is the worst case: bicubic overshoot
    is clipped). pixels() takes it only past CROP_ONLY_PIXELS: ordinary images keep the full resize, bit for bit."""
    rng = np.random.default_rng(0)
    exact = total = 0
    for _ in range(24):
        th = int(rng.choice([32, 64, 224]))
        tw = th if rng.random() < 0.7 else int(rng.integers(16, 240))
        short = int(rng.integers(1, 50))
        long = int(rng.integers(short * 20, short * 150 + 40))
        size = (long, short) if rng.random() < 0.5 else (short, long)
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        pre = Preprocess((th, tw), (0.5,) * 3, (0.5,) * 3, filt)
        full = np.asarray(pre._crop(pre._resize(img)), np.int16)  # the path every ordinary image takes
        crop_only = np.asarray(pre._resize_crop(img, *pre._new_size(*img.size)), np.int16)
        assert np.abs(full - crop_only).max() <= 2, (size, th, tw)
        exact += int((full == crop_only).sum())
        total += full.size
    assert exact / total > 0.999
    for size in [(640, 480), (480, 640), (300, 20), (20, 300), (3000, 200), (8000, 100)]:  # up to 80:1
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        assert np.array_equal(CLIP.pixels(img), np.asarray(CLIP._crop(CLIP._resize(img)))), size


def test_longest_edge_mode_never_rounds_a_strip_to_zero_pixels():
    pre = Preprocess((224, 224), (0.5,) * 3, (0.5,) * 3, resize_mode="longest")
    assert pre.pixels(Image.new("RGB", (5000, 3), (9, 9, 9))).shape == (224, 224, 3)


def test_a_tall_strip_is_refused_by_its_rows():
    """Pillow keeps an 8-byte pointer per row: a 1 x 8,388,608 RGBA strip is 32 MB of pixels and 64 MB of
    pointers, in each of the copies decoding and conversion make (700 MB at peak before this limit)."""
    with pytest.raises(CgilError, match="8388608 rows is over the limit of 524288"):
        open_bounded(png(1, 8_388_608, 8, 6), MAX_PIXELS, MAX_BYTES, 224)
    assert open_bounded(png(16, 524_288, 8, 6), MAX_PIXELS, MAX_BYTES, 224).size == (16, 524_288)


# ---------------------------------------------------------------- progressive and multi-scan JPEGs (item 2)

@pytest.mark.parametrize("kind", [dict(progressive=True), dict(interleaved=False),
                                  dict(components=4, progressive=True), dict(components=4, interleaved=False)],
                         ids=["progressive", "multi-scan", "CMYK progressive", "CMYK multi-scan"])
def test_jpegs_that_libjpeg_buffers_whole_count_whole(kind):
    """A 13000 x 13000 progressive JPEG (a few hundred KB) was budgeted at its 1/8 draft (2.6 MP, in
    limits) while libjpeg holds all its coefficients (500 MB+). Baseline single-scan ones still draft."""
    with pytest.raises(CgilError, match="progressive/multi-scan JPEG"):
        open_bounded(jpeg(13000, 13000, **kind), MAX_PIXELS, MAX_BYTES, 224)
    baseline = open_bounded(jpeg(13000, 13000, components=kind.get("components", 3)), MAX_PIXELS, MAX_BYTES, 224)
    assert baseline.size == (542, 542)  # decoded at 1/8 (streaming), then reduced by 3
    # the coefficients count against the decoded bytes: 2896^2 at 4:2:0 is 25 MB + its 2 MB draft
    assert open_bounded(jpeg(2896, 2896, progressive=True), MAX_PIXELS, MAX_BYTES, 224).size == (724, 724)
    with pytest.raises(CgilError, match="bytes of JPEG coefficients"):  # 4:4:4 doubles them: 48 MB
        open_bounded(jpeg(2896, 2896, subsampling=(1, 1), progressive=True), MAX_PIXELS, MAX_BYTES, 224)


# ---------------------------------------------------------------- header floods (item 3)

FLOODS = {
    "empty JPEG markers": b"\xff\xd8" + b"\xff\xd0" * 7_900_000,
    "JPEG fill bytes": b"\xff\xd8" + b"\xff" * 15_800_000,
    "stray bytes in a JPEG": b"\xff\xd8" + b"\x00" * 15_800_000,
    "empty PNG chunks": (png(2, 2, 8, 0)[:33] + b"\0\0\0\0abCd\0\0\0\0" * 1_300_000 + png(2, 2, 8, 0)[33:]),
}


def test_header_floods_are_refused_in_milliseconds_and_real_metadata_is_not():
    """Pillow's header parser steps through such bodies one Python iteration per marker (seconds each).
    ICC profiles, EXIF and comments are length-prefixed segments: skipped whole, never counted."""
    for name, data in FLOODS.items():
        t0 = time.process_time()
        with pytest.raises(CgilError, match="malformed"):
            open_header(data)
        assert time.process_time() - t0 < 0.2, name
        with pytest.raises(CgilError, match="body: malformed"):
            decode_image(data, CLIP, "body")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription
    img.save(out, "JPEG", icc_profile=b"\0" * 300_000, exif=exif, progressive=True, comment=b"c" * 60_000)
    assert open_bounded(out.getvalue(), MAX_PIXELS, MAX_BYTES, 32).size == (100, 75)  # drafted to 1/4
    out = io.BytesIO()
    img.save(out, "PNG", icc_profile=b"\0" * 300_000)
    assert open_bounded(out.getvalue(), MAX_PIXELS, MAX_BYTES, 224).size == (400, 300)


# ---------------------------------------------------------------- EXIF orientation (item 10)

def tagged_jpeg(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(stored).save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def as_decoded(data: bytes) -> np.ndarray:
    """The JPEG's pixels as stored (Pillow does not apply the tag by itself)."""
    with Image.open(io.BytesIO(data)) as f:
        return np.asarray(f.convert("RGB"))


TRANSPOSE = {3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1),
             2: lambda a: a[:, ::-1], 5: lambda a: a.transpose(1, 0, 2)}


@pytest.mark.parametrize("orientation", sorted(TRANSPOSE))
def test_exif_orientation_is_applied_by_the_one_loader(tmp_path, orientation):
    """A phone photo tagged Orientation=6 (stored landscape, seen portrait) is loaded upright."""
    rng = np.random.default_rng(orientation)
    stored = np.kron(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8), np.ones((10, 10, 1), np.uint8))  # 60 x 100
    data = tagged_jpeg(stored, orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    upright = np.ascontiguousarray(TRANSPOSE[orientation](as_decoded(data)))
    assert np.array_equal(np.asarray(load_image(path)), upright)
    assert np.array_equal(CLIP.pixels(path), CLIP.pixels(upright))  # cgil predict / cgil update
    assert np.array_equal(decode_image(data, CLIP, "body"), CLIP.pixels(upright))  # cgil serve


def test_serve_applies_exif_orientation_after_decoding_small():
    """A large photo is decoded at a JPEG draft scale and box-reduced; the orientation comes after."""
    rng = np.random.default_rng(0)
    stored = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((40, 40, 1), np.uint8))  # 1200 x 1600
    data = tagged_jpeg(stored, 6)
    plain = tagged_jpeg(stored, 1)  # the same pixel data, not rotated
    small = open_bounded(data, MAX_PIXELS, MAX_BYTES, 32)
    assert small.size[0] < small.size[1]  # portrait
    assert np.array_equal(np.asarray(small), np.rot90(np.asarray(open_bounded(plain, MAX_PIXELS, MAX_BYTES, 32)), -1))


def test_train_folder_loader_sees_photos_upright(tmp_path):
    """cgil train: the folder dataset lists files, and the feature loader reads each through load_image."""
    pytest.importorskip("torch")
    from cgil.data.folder import load_folder_dataset
    from cgil.features import _Preprocessed

    rng = np.random.default_rng(3)
    expected = {}
    for cls in ("cat", "dog"):
        for i in range(3):
            stored = np.kron(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
            data = tagged_jpeg(stored, 6)
            (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "train" / cls / f"{i}.jpg").write_bytes(data)
            expected[f"{cls}/{i}.jpg"] = np.rot90(as_decoded(data), -1)
    ds = load_folder_dataset(tmp_path, val_split=0.34)
    items = list(ds.train.items) + list(ds.test.items)
    loaded = _Preprocessed(items, np.asarray)
    for i, item in enumerate(items):
        key = f"{Path(item).parent.name}/{Path(item).name}"
        assert np.array_equal(loaded[i], expected[key]), key


def test_features_cached_before_photos_were_read_upright_are_not_reused(monkeypatch):
    """The feature cache is keyed by the loader's version: a cache filled when EXIF was ignored holds
    sideways features, and the first run after the fix must compute them again, not read them back."""
    pytest.importorskip("torch")
    from cgil import features
    from cgil.clip import create_clip
    from cgil.data import get_dataset

    clip, ds = create_clip("cgil-tiny", None, "cpu", 0), get_dataset("digits")
    now = features.cache_key(clip, ds, "train", [0, 1])
    monkeypatch.setattr(features, "LOADER_VERSION", features.LOADER_VERSION - 1)
    assert features.cache_key(clip, ds, "train", [0, 1]) != now


# ---------------------------------------------------------------- Pillow's warning (item 17)

def test_pillows_decompression_bomb_warning_becomes_one_line(tmp_path):
    """Between 1x and 2x Image.MAX_IMAGE_PIXELS Pillow emits a Python warning (file, line, category);
    cgil prints one `warning:` line of its own and decodes the image."""
    path = tmp_path / "big.png"
    path.write_bytes(png(300, 200, 8, 2))
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from PIL import Image
Image.MAX_IMAGE_PIXELS = 40_000  # 60,000 pixels: over the warning threshold, under the refusal
from runtime.preprocess import Preprocess
print(Preprocess((32, 32), (0.5,) * 3, (0.5,) * 3).pixels({str(path)!r}).shape)
"""
    done = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True,
                          timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(32, 32, 3)"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "300x200" in lines[0], done.stderr
    assert "DecompressionBombWarning" not in done.stderr and "warnings.warn" not in done.stderr
