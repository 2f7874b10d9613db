"""Export a trained run to a deployment bundle: `export.export_bundle(run_dir, out, ...)` or `cgil export`."""


def export_bundle(*args, **kwargs):  # lazy: importing the package must not pull in torch
    from .bundle import export_bundle as _export

    return _export(*args, **kwargs)


__all__ = ["export_bundle"]
