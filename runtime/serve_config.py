"""`cgil serve`'s settings and their defaults, written once: the command's options and create_app read them here.

Kept apart from server.py so that the CLI can show and default them without importing fastapi.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import CgilError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
ADMIN_TOKEN_ENV = "CGIL_ADMIN_TOKEN"
MAX_PIXELS = 8_388_608  # per image: 8 MP, e.g. 4096 x 2048
MIB = 1024 * 1024
MAX_DECODED_BYTES = 32 * MIB  # per image


@dataclass
class ServeConfig:
    bundle: Path
    backend: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting for the engine
    max_body_bytes: int = 16 * MIB
    max_images_per_request: int = 64
    # A 224-px classifier gains nothing from more than ~8 MP; a small compressed body can declare a huge
    # image, so pixels and decoded bytes (mode and bit depth count) are checked from the header.
    max_pixels: int = MAX_PIXELS  # per image (8 MP, e.g. 4096 x 2048; a JPEG counts at its draft scale)
    max_decoded_bytes: int = MAX_DECODED_BYTES  # per image, what the decoder produces (16-bit samples count twice)
    max_request_pixels: int = 4 * MAX_PIXELS  # over all images of one request
    decode_slots: int = 0  # images decoded at once (0: one per core)
    forwarded_allow_ips: Optional[str] = None  # proxies whose X-Forwarded-For is trusted (none by default)
    admin_token: Optional[str] = None
    admin_loopback: bool = True  # loopback peers may reload without the token
    watch_interval_s: float = 0.25  # 0: no file watch (admin reload only)
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default)

    def check(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0 or self.max_body_bytes < 1:
            raise CgilError("--max-batch and --max-queue must be >= 1, --max-wait-ms >= 0")
        if min(self.max_pixels, self.max_decoded_bytes, self.max_request_pixels) < 1 or self.decode_slots < 0:
            raise CgilError("--max-pixels, --max-decoded-mb and --max-request-pixels must be positive")
