"""The one rule for class names: train (folder datasets), `cgil update --data`, `--zero-shot`.

A class name is shown in terminals, JSON responses and logs, and it is the text the zero-shot and
prompted text graphs read, so it must be plain, printable and unambiguous:

  1. NFC-normalised (the same letters typed two ways are one name);
  2. stripped, and every run of whitespace collapsed to one space (`_` in a folder name is read as a
     space before this, so a folder `_two` is the name `two`);
  3. no control, format or invisible characters: Unicode categories Cc, Cf, Cs, Co, Zl, Zp and every
     default-ignorable code point (newlines, ANSI escapes, bidirectional overrides, zero-width spaces,
     the byte order mark, soft hyphens, variation selectors, Hangul fillers), which make a name render
     as another one or as nothing;
  4. no word (a run of letters) that mixes scripts, as `twо` with a Cyrillic `о` does; Latin may
     mix with Han and Hiragana/Katakana, Bopomofo or Hangul (Unicode TS 39, "highly restrictive");
  5. 1 to 100 characters;
  6. not equal to another name of the same head once both are NFKC-normalised and case-folded
     (`Two`, `two` and fullwidth `ｔｗｏ` are one class to a reader): `name_key`.

Torch-free: the device applies it to `--zero-shot` names.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Iterable, Sequence

import regex

from .errors import CgilError

MAX_NAME_LENGTH = 100
# explicit bidi formatting characters (LRM/RLM, embeddings, overrides, isolates, Arabic letter mark); all
# are category Cf and refused as such, named here because the message calls them bidirectional
BIDI_CONTROLS = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# control, format (zero-width, BOM, soft hyphen, bidi), surrogate (undecodable bytes of a folder name),
# private use, line and paragraph separators. Unassigned (Cn) is allowed: which code points are assigned
# depends on the Python's Unicode version, and a name must not be valid on one device and not another.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
# invisible characters of other categories: CGJ, variation selectors, Hangul fillers, Khmer inherent vowels
_IGNORABLE = regex.compile(r"\p{Default_Ignorable_Code_Point}")
_WHITESPACE = re.compile(r"\s+")
# a word, for the script rule: letters and their combining marks, so `β-lactam` is two words and `twо` one
_WORD = regex.compile(r"[\p{L}\p{M}]+")

# the scripts of Unicode 16 by ISO 15924 code (Common, Inherited and Unknown left out: digits, punctuation
# and combining marks go with any script); codes an older `regex` does not know are skipped
_SCRIPT_CODES = """Adlm Aghb Ahom Arab Armi Armn Avst Bali Bamu Bass Batk Beng Berf Bhks Bopo Brah Brai Bugi Buhd
Cakm Cans Cari Cham Cher Chrs Copt Cpmn Cprt Cyrl Deva Diak Dogr Dsrt Dupl Egyp Elba Elym Ethi Gara Geor Glag Gong
Gonm Goth Gran Grek Gujr Gukh Guru Hang Hani Hano Hatr Hebr Hira Hluw Hmng Hmnp Hrkt Hung Ital Java Jurc Kali Kana
Kawi Khar Khmr Khoj Kits Knda Krai Kthi Lana Laoo Latn Lepc Limb Lina Linb Lisu Lyci Lydi Mahj Maka Mand Mani Marc
Medf Mend Merc Mero Miao Mlym Modi Mong Mroo Mtei Mult Mymr Nagm Nand Narb Nbat Newa Nkoo Nshu Ogam Olck Onao Orkh
Orya Osge Osma Ougr Palm Pauc Pcun Perm Phag Phli Phlp Phnx Prti Rjng Rohg Runr Samr Sarb Saur Seal Sgnw Shaw Shrd
Sidd Sidt Sind Sinh Sogd Sogo Sora Soyo Sund Sunu Sylo Syrc Tagb Takr Tale Talu Taml Tang Tavt Tayo Telu Tfng Tglg
Thaa Thai Tibt Tirh Tnsa Todr Tols Toto Tutg Ugar Vaii Vith Wara Wcho Xpeo Xsux Yezi Yiii Zanb""".split()
# script combinations one word may hold (Japanese, Chinese with Bopomofo, Korean; each with Latin)
_SCRIPT_MIXES = (frozenset({"Latn", "Hani", "Hira", "Kana", "Hrkt"}), frozenset({"Latn", "Hani", "Bopo"}),
                 frozenset({"Latn", "Hani", "Hang"}))


def _known_script(code: str) -> bool:
    try:
        regex.compile(rf"\p{{sc={code}}}")
        return True
    except regex.error:
        return False


@lru_cache(maxsize=1)
def _script_of() -> regex.Pattern:
    """One alternation: the name of the group that matched a character is its script. Built on first use
    (about 0.1 s), not at import: every `cgil` command imports this module, few check a name."""
    return regex.compile("|".join(rf"(?P<{c}>\p{{sc={c}}})" for c in _SCRIPT_CODES if _known_script(c)))


def _refused(c: str) -> bool:
    return unicodedata.category(c) in REFUSED_CATEGORIES or _IGNORABLE.match(c) is not None


def _visible(text: str) -> str:
    """Text for a terminal or an error message: control, format and invisible characters shown as escapes."""
    return "".join(f"\\u{ord(c):04x}" if _refused(c) else c for c in text)


def _described(c: str) -> str:
    return f"U+{ord(c):04X} {unicodedata.name(c, unicodedata.category(c))}"


def word_scripts(word: str) -> list[str]:
    """The scripts (ISO 15924 codes) of a word's letters, in order of appearance; digits, punctuation and
    combining marks belong to none. Read after NFKC, so fullwidth and mathematical letters are Latin."""
    return list(dict.fromkeys(m.lastgroup for m in _script_of().finditer(unicodedata.normalize("NFKC", word))))


def _mixed_scripts(name: str) -> tuple[str, list[str]] | None:
    for word in _WORD.findall(unicodedata.normalize("NFKC", name)):
        scripts = word_scripts(word)
        if len(scripts) > 1 and not any(set(scripts) <= mix for mix in _SCRIPT_MIXES):
            return word, scripts
    return None


def name_key(name: str) -> str:
    """What two names are compared by: NFKC, case-folded, NFKC again (Unicode's NFKC_Casefold, less the
    default-ignorables that the rule refuses anyway), whitespace collapsed. `Two`, `two`, `ｔｗｏ` and
    `𝐭𝐰𝐨` share one key."""
    key = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return _WHITESPACE.sub(" ", key).strip()


def clean_name(raw: str, where: str = "class name") -> str:
    """One name under the rule above, or a CgilError naming what is wrong with it."""
    if not isinstance(raw, str):
        raise CgilError(f"{where}: a class name must be text, got {type(raw).__name__}")
    name = unicodedata.normalize("NFC", raw)
    bad = [c for c in name if _refused(c)]
    if bad:
        shown = ", ".join(_described(c) for c in dict.fromkeys(bad))
        raise CgilError(f"{where} '{_visible(raw)}' holds control, format, invisible or bidirectional characters "
                        f"({shown})")
    name = _WHITESPACE.sub(" ", name).strip()
    if not name:
        raise CgilError(f"{where}: empty class name")
    if len(name) > MAX_NAME_LENGTH:
        raise CgilError(f"{where} '{name[:40]}...' has {len(name)} characters; at most {MAX_NAME_LENGTH}")
    mixed = _mixed_scripts(name)
    if mixed:
        word, scripts = mixed
        # the letters outside the word's main script (most of its letters): the look-alikes a reader misses
        script_of = {c: word_scripts(c) for c in dict.fromkeys(word)}
        main = max(scripts, key=lambda s: sum(script_of[c] == [s] for c in word))
        letters = ", ".join(f"'{c}' {_described(c)}" for c, sc in script_of.items() if sc and sc != [main])
        raise CgilError(f"{where} '{name}': the word '{word}' mixes scripts ({' + '.join(scripts)}: {letters}), "
                        f"so it can look like another name; write each word in one script")
    return name


def folder_class_name(folder: str) -> str:
    """A class folder's name -> its class name: `_` read as a space, then the rule."""
    return clean_name(folder.replace("_", " "), f"class folder {folder!r}")


def clean_names(raw: Iterable[str], existing: Sequence[str] = (), where: str = "class name",
                taken_as: str = "already in the head") -> list[str]:
    """Clean new names and refuse any that equals another new one or an existing one under `name_key`."""
    names = [clean_name(n, where) for n in raw]
    seen: dict[str, str] = {}
    for n in names:
        key = name_key(n)
        if key in seen:
            same = "given twice" if seen[key] == n else "given twice (ignoring case and width)"
            raise CgilError(f"class name(s) {same}: {seen[key]}" + (f" and {n}" if seen[key] != n else ""))
        seen[key] = n
    taken = {name_key(n): n for n in existing}
    clash = [(n, taken[name_key(n)]) for n in names if name_key(n) in taken]
    if clash:
        shown = ", ".join(n if n == old else f"{n} (as {_visible(old)})" for n, old in clash)
        raise CgilError(f"class name(s) {taken_as}: {shown}; new classes need new names (names are compared "
                        f"ignoring case and width, after NFKC)")
    return names


def printable(text: str) -> str:
    """Text safe to print on a terminal: control, format and invisible characters shown as \\uXXXX escapes."""
    return _visible(text)
