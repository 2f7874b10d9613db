"""`cgil serve` and `cgil store info`: registered on the main Typer app by cli.py. Never import torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .console import console, guarded
from .serve_config import ADMIN_TOKEN_ENV, DEFAULT_HOST, DEFAULT_PORT, MIB, ServeConfig

DEFAULT = ServeConfig(Path("."))  # the options' defaults are the dataclass's, never a second copy


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @guarded
    def serve_command(
        bundle: Path = typer.Argument(..., help="A bundle written by cgil export"),
        host: str = typer.Option(DEFAULT_HOST, help="Interface to listen on"),
        port: int = typer.Option(DEFAULT_PORT, help="TCP port"),
        backend: str = typer.Option(DEFAULT.backend, help="auto | onnxruntime | tensorrt | torch"),
        max_batch: int = typer.Option(DEFAULT.max_batch, "--max-batch", min=1, help="Most images per engine call"),
        max_wait_ms: float = typer.Option(DEFAULT.max_wait_ms, "--max-wait-ms", min=0, help="Longest a request waits for a batch to fill"),
        max_queue: int = typer.Option(DEFAULT.max_queue, "--max-queue", min=1, help="Images waiting before requests get 503"),
        max_body_mb: float = typer.Option(DEFAULT.max_body_bytes / MIB, "--max-body-mb", help="Request body limit (413 above it)"),
        max_images: int = typer.Option(DEFAULT.max_images_per_request, "--max-images", min=1, help="Images per request"),
        max_pixels: int = typer.Option(DEFAULT.max_pixels, "--max-pixels", min=1,
                                       help="Pixels per image from its header, a JPEG at its draft scale (400 above it)"),
        max_decoded_mb: float = typer.Option(DEFAULT.max_decoded_bytes / MIB, "--max-decoded-mb", min=0.001,
                                             help="Bytes one image decodes to, mode and bit depth included (400 above it)"),
        max_request_pixels: int = typer.Option(DEFAULT.max_request_pixels, "--max-request-pixels", min=1,
                                               help="Pixels over all images of one request (413 above it)"),
        decode_slots: int = typer.Option(DEFAULT.decode_slots, "--decode-slots", min=0, help="Images decoded at once (0: one per core)"),
        forwarded_allow_ips: Optional[str] = typer.Option(
            DEFAULT.forwarded_allow_ips, "--forwarded-allow-ips",
            help="Comma-separated proxy addresses whose X-Forwarded-For names the client (default: none trusted)"),
        admin_token: Optional[str] = typer.Option(DEFAULT.admin_token, "--admin-token", envvar=ADMIN_TOKEN_ENV,
                                                  help="Token for POST /v1/admin/reload (a wrong one is 403 from anywhere)"),
        loopback_admin: bool = typer.Option(DEFAULT.admin_loopback, "--loopback-admin/--no-loopback-admin",
                                            help="Allow admin calls without a token from direct (not proxied) loopback peers"),
        watch: float = typer.Option(DEFAULT.watch_interval_s, "--watch", help="Seconds between checks of heads/CURRENT (0: admin reload only)"),
        threads: int = typer.Option(DEFAULT.threads, "--threads", help="ONNX Runtime intra-op threads (0: default)"),
        log_level: str = typer.Option("info", "--log-level"),
    ):
        """Serve a bundle over HTTP with dynamic batching and head hot swap (no torch needed).

        POST /v1/classify (raw image body or multipart `images`), GET /v1/classes, /healthz, /readyz,
        /metrics (Prometheus), POST /v1/admin/reload; the OpenAPI schema at /openapi.json, docs at /docs.
        A new head published by `cgil update` is picked up without a restart and without failed requests.
        """
        from .server import serve

        cfg = ServeConfig(bundle, backend=backend, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                          max_body_bytes=int(max_body_mb * MIB), max_images_per_request=max_images, max_pixels=max_pixels,
                          max_decoded_bytes=int(max_decoded_mb * MIB), max_request_pixels=max_request_pixels,
                          decode_slots=decode_slots, forwarded_allow_ips=forwarded_allow_ips, admin_token=admin_token, admin_loopback=loopback_admin, watch_interval_s=watch, threads=threads)
        # printed once the port is bound and the model loaded and warmed up, never before
        serve(cfg, host, port, log_level, on_ready=lambda url: console.print(f"serving {bundle} on {url} (docs: /docs)"))

    store = typer.Typer(help="The replay store of a bundle's current head", no_args_is_help=True)
    app.add_typer(store, name="store")

    @store.command("info")
    @guarded
    def store_info_command(
        bundle: Path = typer.Argument(..., help="A bundle written by cgil export"),
        images_per_class: Optional[int] = typer.Option(None, help="For classes without a recorded image count"),
        bytes_per_image: Optional[float] = typer.Option(None, help="For classes without recorded image bytes"),
        as_json: bool = typer.Option(False, "--json"),
    ):
        """Bytes per class per part (generator, prompt, context, key) vs keeping raw features or raw images."""
        from rich.table import Table

        from .store_info import store_info

        info = store_info(bundle, images_per_class, bytes_per_image)
        if as_json:
            typer.echo(json.dumps(info))
            return
        table = Table(title=f"{bundle} · head v{info['head_version']} · {info['generator']} store "
                            f"({info['store_precision']}) · D={info['embed_dim']}")
        cols = {"class": "class", "generator_bytes": "generator", "prompt_bytes": "prompt", "context_bytes": "context",
                "key_bytes": "key", "total_bytes": "total", "images": "images", "raw_features_bytes": "raw features",
                "raw_images_bytes": "raw images"}
        for c, title in cols.items():
            table.add_column(title, justify="left" if c == "class" else "right", no_wrap=True)

        def cell(v):
            if v is None:
                return "n/a"
            return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"

        for row in info["classes"]:
            table.add_row(*[row[c] if c == "class" else cell(row[c]) for c in cols])
        console.print(table)
        console.print("bytes per class (k = 1000); generator = its share of the replay store, prompt = context vectors + z_c, "
                      "context = its row of the prompted graph's input, key = its row of the head")
        console.print(f"shared: context generator g {info['shared_bytes']['context_generator_g']:,} B; "
                      f"head version folder {info['total_bytes']:,} B in all")
