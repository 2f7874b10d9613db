"""The one rule for class names: train (folder datasets), `cgil update --data`, `--zero-shot`.

A class name is shown in terminals, JSON responses and logs, and it is the text the zero-shot and
prompted text graphs read, so it must be plain, printable and unambiguous:

  1. NFC-normalised (the same letters typed two ways are one name);
  2. stripped, and every run of whitespace collapsed to one space (`_` in a folder name is read as a
     space before this, so a folder `_two` is the name `two`);
  3. no control characters (newlines, tabs, ANSI escapes) and no bidirectional-override characters
     (which make a name render as another one);
  4. 1 to 100 characters;
  5. not equal to another name of the same head ignoring case (`Two` and `two` are one class to a reader).

Torch-free: the device applies it to `--zero-shot` names.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

from .errors import CgilError

MAX_NAME_LENGTH = 100
# explicit bidi formatting characters (LRM/RLM, embeddings, overrides, isolates, Arabic letter mark)
BIDI_CONTROLS = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_WHITESPACE = re.compile(r"\s+")


def _visible(text: str) -> str:
    """Text for a terminal or an error message: control, separator and bidi characters shown as escapes."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS else c
                   for c in text)


def clean_name(raw: str, where: str = "class name") -> str:
    """One name under the rule above, or a CgilError naming what is wrong with it."""
    if not isinstance(raw, str):
        raise CgilError(f"{where}: a class name must be text, got {type(raw).__name__}")
    name = unicodedata.normalize("NFC", raw)
    # Cc covers newlines, tabs and the ESC of ANSI sequences; Zl/Zp are line and paragraph separators
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS]
    if bad:
        shown = ", ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(bad))
        raise CgilError(f"{where} '{_visible(raw)}' holds control or bidirectional characters ({shown})")
    name = _WHITESPACE.sub(" ", name).strip()
    if not name:
        raise CgilError(f"{where}: empty class name")
    if len(name) > MAX_NAME_LENGTH:
        raise CgilError(f"{where} '{name[:40]}...' has {len(name)} characters; at most {MAX_NAME_LENGTH}")
    return name


def folder_class_name(folder: str) -> str:
    """A class folder's name -> its class name: `_` read as a space, then the rule."""
    return clean_name(folder.replace("_", " "), f"class folder {folder!r}")


def clean_names(raw: Iterable[str], existing: Sequence[str] = (), where: str = "class name",
                taken_as: str = "already in the head") -> list[str]:
    """Clean new names and refuse any that equals another new one or an existing one, ignoring case."""
    names = [clean_name(n, where) for n in raw]
    seen: dict[str, str] = {}
    for n in names:
        key = n.casefold()
        if key in seen:
            same = "given twice" if seen[key] == n else "given twice (ignoring case)"
            raise CgilError(f"class name(s) {same}: {seen[key]}" + (f" and {n}" if seen[key] != n else ""))
        seen[key] = n
    taken = {n.casefold(): n for n in existing}
    clash = [(n, taken[n.casefold()]) for n in names if n.casefold() in taken]
    if clash:
        shown = ", ".join(n if n == old else f"{n} (as {old})" for n, old in clash)
        raise CgilError(f"class name(s) {taken_as}: {shown}; new classes need new names (names are compared "
                        f"ignoring case)")
    return names


def printable(text: str) -> str:
    """Text safe to print on a terminal: control and bidi characters shown as \\uXXXX escapes."""
    return _visible(text)
