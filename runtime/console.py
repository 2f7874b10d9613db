"""The terminal side shared by every command: one console, one error exit.

A leaf module (rich + typer only, no torch) so that each package's command module can import it
without importing the CLI that registers them. User text (paths, class names, hints such as
`pip install 'cgil[train]'`) is never read as rich markup: square brackets are text, not styles.
"""
from __future__ import annotations

import functools
import os

import typer
from rich.console import Console
from rich.markup import escape

from .errors import CgilError

# markup=False: a path like runs/brack[v2] or a hint like cgil[tensorrt] prints as written. Styled
# output goes through rich Text/Table objects, which are not parsed for markup.
console = Console(markup=False)
if not console.is_terminal:  # logs and pipes: wide enough that result tables are never truncated
    console = Console(width=240, markup=False)

# Top-level packages that only the learner install brings (`pip install 'cgil[train]'`).
TRAIN_EXTRA_MODULES = {"torch", "torchvision", "open_clip", "timm", "sklearn", "matplotlib", "onnx", "onnxscript"}
TRAIN_HINT = "pip install 'cgil[train]'"


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr (user text is never read as markup) and exit."""
    from .names import printable  # one line: control characters of names or paths are shown as escapes

    Console(stderr=True).print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def warn(message: str) -> None:
    """One `warning: ...` line on stderr, escaped as `fail` escapes (a file name may hold brackets or a newline)."""
    from .names import printable

    Console(stderr=True).print(f"[yellow]warning:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)


def missing_extra(error: ModuleNotFoundError, command: str = "this command") -> str | None:
    """The one-line hint for an import that fails because the learner extra is not installed, else None."""
    root = (error.name or "").split(".")[0]
    if root not in TRAIN_EXTRA_MODULES:
        return None
    return (f"{command} needs the learner ({root} is not installed; this is the torch-free device install): "
            f"{TRAIN_HINT}")


def require_learner(command: str) -> None:
    """Refuse up front, before any work, where the learner's packages are absent (torch-free device)."""
    import importlib.util

    for name in ("torch", "open_clip"):
        if importlib.util.find_spec(name) is None:
            raise CgilError(f"{command} needs the learner ({name} is not installed; this is the torch-free "
                            f"device install): {TRAIN_HINT}")


def _command_name(fn) -> str:
    """`cgil eval`, `cgil store info`: the command as typed (its Python function may be named otherwise)."""
    try:  # typer may run on its own copy of click: ask the copy it uses
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is not None and ctx.command_path:
        return " ".join(["cgil", *ctx.command_path.split()[1:]])
    return "cgil " + fn.__name__.removesuffix("_command").removesuffix("_cmd")


def guarded(fn):
    """Every command's error exit: one line on stderr, never a traceback.

    CgilError (bad input, refused operation) exits 2; a missing learner package names the extra to
    install (exit 2); anything else is an internal failure, reported on one line with exit 1
    (CGIL_DEBUG=1 re-raises it to show the traceback).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CgilError as e:
            fail(str(e))
        except ModuleNotFoundError as e:
            hint = missing_extra(e, _command_name(fn))
            if hint is None:
                if os.environ.get("CGIL_DEBUG"):
                    raise
                fail(f"missing module {e.name!r}: {e} (reinstall cgil; CGIL_DEBUG=1 shows the traceback)", code=1)
            fail(hint)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except MemoryError:
            fail("out of memory (smaller images or fewer classes per task need less)", code=1)
        except Exception as e:  # noqa: BLE001 (the last line of defence: a user never sees a traceback)
            if os.environ.get("CGIL_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (CGIL_DEBUG=1 shows the traceback)", code=1)

    return wrapper
