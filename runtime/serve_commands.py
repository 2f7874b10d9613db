"""`cgil serve`, `cgil update` and `cgil store info`: registered on the main Typer app by cli.py.

Imports stay inside the commands: `cgil serve` and `cgil update --zero-shot/--rollback` never import
torch; only an image-based `cgil update` does (generator fitting and prompt alignment).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from cli import console, fail, guarded

    @app.command("serve")
    @guarded
    def serve_command(
        bundle: Path = typer.Argument(..., help="A bundle written by cgil export"),
        host: str = typer.Option("127.0.0.1", help="Interface to listen on"),
        port: int = typer.Option(8000, help="TCP port"),
        backend: str = typer.Option("auto", help="auto | onnxruntime | tensorrt | torch"),
        max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most images per engine call"),
        max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="Longest a request waits for a batch to fill"),
        max_queue: int = typer.Option(256, "--max-queue", min=1, help="Images waiting before requests get 503"),
        max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Request body limit (413 above it)"),
        max_images: int = typer.Option(64, "--max-images", min=1, help="Images per request"),
        max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Pixels per decoded image (400 above it)"),
        admin_token: Optional[str] = typer.Option(None, "--admin-token", envvar="CGIL_ADMIN_TOKEN",
                                                  help="Token for POST /v1/admin/reload from non-loopback peers"),
        loopback_admin: bool = typer.Option(True, "--loopback-admin/--no-loopback-admin",
                                            help="Allow admin calls from loopback peers without the token"),
        watch: float = typer.Option(0.25, "--watch", help="Seconds between checks of heads/CURRENT (0: admin reload only)"),
        threads: int = typer.Option(0, "--threads", help="ONNX Runtime intra-op threads (0: default)"),
        log_level: str = typer.Option("info", "--log-level"),
    ):
        """Serve a bundle over HTTP with dynamic batching and head hot swap (no torch needed).

        POST /v1/classify (raw image body or multipart `images`), GET /v1/classes, /healthz, /readyz,
        /metrics (Prometheus), POST /v1/admin/reload; the OpenAPI schema at /openapi.json, docs at /docs.
        A new head published by `cgil update` is picked up without a restart and without failed requests.
        """
        from .server import ServeConfig, serve

        cfg = ServeConfig(bundle, backend=backend, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                          max_body_bytes=int(max_body_mb * 1024 * 1024), max_images_per_request=max_images, max_pixels=max_pixels,
                          admin_token=admin_token, admin_loopback=loopback_admin, watch_interval_s=watch, threads=threads)
        console.print(f"serving {bundle} on http://{host}:{port} (docs: /docs)")
        serve(cfg, host, port, log_level)

    @app.command("update")
    @guarded
    def update_command(
        bundle: Path = typer.Argument(..., help="A bundle written by cgil export"),
        data: Optional[Path] = typer.Option(None, "--data", help="One folder of images per new class (DIR/<class>/*)"),
        zero_shot: List[str] = typer.Option([], "--zero-shot", help="Add a class by name alone (repeatable; no torch)"),
        rollback: bool = typer.Option(False, "--rollback", help="Point the bundle back at its previous head version"),
        epochs: Optional[int] = typer.Option(None, help="Alignment epochs (default: the head's recorded setting, else 60)"),
        lr: Optional[float] = typer.Option(None, help="Alignment learning rate (default: recorded, else 0.03)"),
        passes: Optional[int] = typer.Option(None, help="Generator passes over each new class's features (default: the store's)"),
        seed: int = typer.Option(1992, help="Seed of the new prompts, generators and alignment"),
        store_precision: str = typer.Option("fp32", "--store-precision", help="fp32 | fp16: how the replay store is written"),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
    ):
        """Learn new classes on the device and publish them as a new head version (atomic).

        --data DIR: embeds the images with the bundle's own image engine, fits generators for the new
        classes and realigns ALL prompts on replay from the bundle's generator store. This step NEEDS
        TORCH (and open_clip) to run the text tower; serving does not.

        --zero-shot NAME: adds a class by name only, with its zero-shot key from the bundle's text ONNX
        graph (no torch); a later --data update of that name replaces it with a learned prompt.

        --rollback: returns to the previous version.

        A running `cgil serve` swaps to the new head by itself. Class names must be new (except a
        zero-shot class learned from images).
        """
        from cgil.update import add_zero_shot, rollback as do_rollback, update_from_images

        chosen = sum([bool(data), bool(zero_shot), rollback])
        if chosen != 1:
            fail("give exactly one of --data DIR, --zero-shot NAME or --rollback")
        if rollback:
            old, new = do_rollback(bundle)
            result = {"rolled_back_from": old, "current": new}
        elif zero_shot:
            result = add_zero_shot(bundle, zero_shot)
        else:
            result = update_from_images(bundle, data, epochs=epochs, lr=lr, passes=passes, seed=seed,
                                        store_precision=store_precision,
                                        report=lambda s: typer.echo(s, err=as_json) if as_json else console.print(s, highlight=False))
        if as_json:
            typer.echo(json.dumps(result))
        elif rollback:
            console.print(f"rolled back: {result['rolled_back_from']} -> {result['current']}")
        else:
            console.print(f"published head v{result['version']} ({result['directory']}): added {', '.join(result['added'])}")
            if "timings" in result:
                console.print("phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["timings"].items()))

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

        from cgil.update import store_info

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
