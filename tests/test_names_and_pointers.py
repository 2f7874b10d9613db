"""Names that print alike, pointers and records edited by hand, a full disk, admin credentials (issue 17).

Real bundles (the session fixtures of conftest.py), real `cgil` processes, a real server on loopback.
Every test here failed on the code before the fix:
invisible and look-alike class names were accepted; a hand-edited heads/CURRENT let the next update
prune the version serving; a huge heads/NEWEST or a malformed manifest entry was an internal error; a
head.json could claim another version; a full disk named a file of the live head; any non-Bearer
credential from loopback was let in, and X-Client-IP & co. did not count as proxied.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest

from runtime.errors import CgilError
from test_hostile import HEADS, on_a_full_disk, rewrite_manifest, versions
from test_serve import running_server
from test_update import cli, current

ZWSP, BOM, SOFT_HYPHEN, CYRILLIC_O = "\u200b", "\ufeff", "\u00ad", "\u043e"


def one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


# ---------------------------------------------------------------- 5. names that print alike
LOOK_ALIKES = {  # each prints as "two" (or as "two" in another width); what the refusal must name
    f"two{ZWSP}": "U+200B ZERO WIDTH SPACE",
    f"{BOM}two": "U+FEFF ZERO WIDTH NO-BREAK SPACE",
    f"tw{SOFT_HYPHEN}o": "U+00AD SOFT HYPHEN",
    "two\u2060": "U+2060 WORD JOINER",
    "two\ufe0f": "U+FE0F VARIATION SELECTOR-16",  # default-ignorable, category Mn
    "two\u3164": "U+3164 HANGUL FILLER",  # default-ignorable, category Lo
    f"tw{CYRILLIC_O}": "U+043E CYRILLIC SMALL LETTER O",
    "\u03c4wo": "U+03C4 GREEK SMALL LETTER TAU",
}


def test_invisible_and_mixed_script_names_are_refused_naming_the_character():
    from runtime.names import clean_name, clean_names, name_key, printable

    for name, named in LOOK_ALIKES.items():
        with pytest.raises(CgilError, match=re.escape(named)):
            clean_name(name)
    # width and case: one key, so one class to a reader
    assert name_key("ｔｗｏ") == name_key("TWO") == name_key("𝐭𝐰𝐨") == name_key("two")
    for twin in ("ｔｗｏ", "𝐭𝐰𝐨", "Ｔｗｏ"):
        with pytest.raises(CgilError, match=r"already in the head: .*\(as two\)"):
            clean_names([twin], existing=["two"])
        with pytest.raises(CgilError, match="given twice"):
            clean_names(["two", twin])
    # what stays valid: one script per word, the Japanese/Chinese/Korean mixes with Latin, accents, digits
    for fine in ("Москва city", "Tシャツ", "東京タワー", "café", "β-lactam ring", "ｔｗｏ", "route 66", "ängel"):
        assert clean_name(fine) == fine
    # old bundles' labels print their invisible characters as escapes
    assert printable(f"two{ZWSP}") == "two\\u200b" and printable(f"{BOM}x") == "\\ufeffx"


def test_look_alike_names_are_refused_by_updates_and_folder_datasets(bundle, new_digits, tmp_path):
    from cgil.data.folder import load_folder_dataset
    from export.update import class_folders
    from runtime.heads import add_zero_shot, check_new_names

    before, dirs = current(bundle), versions(bundle)
    head_names = json.loads((bundle / HEADS / before / "head.json").read_text())["class_names"]
    assert "two" in head_names
    for name, named in LOOK_ALIKES.items():
        with pytest.raises(CgilError, match=re.escape(named)):
            add_zero_shot(bundle, [name])
    with pytest.raises(CgilError, match=r"already in the head: ｔｗｏ \(as two\)"):
        add_zero_shot(bundle, ["ｔｗｏ"])
    with pytest.raises(CgilError, match="differ only in case or width"):  # a zero-shot class learned from images
        check_new_names(["ｆｏｒｋｌｉｆｔ"], head_names + ["forklift"], head_names, allow_zero_shot=True)
    out = cli("update", str(bundle), "--zero-shot", f"tw{ZWSP}o", check=False)
    one_line_error(out, "U+200B ZERO WIDTH SPACE", "tw\\u200bo")
    assert current(bundle) == before and versions(bundle) == dirs
    # class folders: a fullwidth twin of a folder is the same class, a mixed-script folder is refused
    data = tmp_path / "data"
    shutil.copytree(new_digits / "eight", data / "forklift")
    shutil.copytree(new_digits / "eight", data / "ｆｏｒｋｌｉｆｔ")
    with pytest.raises(CgilError, match="given twice"):
        class_folders(data)
    shutil.rmtree(data / "ｆｏｒｋｌｉｆｔ")
    shutil.copytree(new_digits / "eight", data / f"f{CYRILLIC_O}rklift")
    with pytest.raises(CgilError, match="CYRILLIC SMALL LETTER O"):
        class_folders(data)
    for split in ("train", "test"):
        for name in ("two", f"two{ZWSP}"):
            shutil.copytree(new_digits / "eight", tmp_path / "ds" / split / name)
    with pytest.raises(CgilError, match="ZERO WIDTH SPACE"):
        load_folder_dataset(tmp_path / "ds")


# ---------------------------------------------------------------- 6. the serving version is never pruned
def test_an_update_after_a_hand_edited_pointer_keeps_the_serving_version(bundle):
    from runtime.heads import add_zero_shot

    first = current(bundle)
    add_zero_shot(bundle, ["forklift"])
    add_zero_shot(bundle, ["zebra"])
    assert json.loads((bundle / HEADS / "history.json").read_text())[0] == first
    (bundle / HEADS / "CURRENT").write_text(first + "\n")  # the operator goes back by hand, to the oldest kept
    newest = add_zero_shot(bundle, ["tractor"])["version"]
    assert (bundle / HEADS / first / "manifest.json").exists()  # it was serving until this update
    history = json.loads((bundle / HEADS / "history.json").read_text())
    assert history[-2:] == [first, f"head-{newest:04d}"]
    out = cli("update", "--rollback", str(bundle))
    assert f"-> {first}" in out.stdout and current(bundle) == first


# ---------------------------------------------------------------- 7. pointers and records edited by hand
def test_a_huge_or_corrupt_newest_is_one_line_naming_it(bundle):
    before, dirs = current(bundle), versions(bundle)
    newest = bundle / HEADS / "NEWEST"
    for text in ("9" * 5000, "9" * 240, "12a\n", "", "1000000000\n"):
        newest.write_text(text)
        one_line_error(cli("update", str(bundle), "--zero-shot", "zebra", check=False), str(newest))
        assert current(bundle) == before and versions(bundle) == dirs
    newest.write_text("41\n")
    assert cli("update", str(bundle), "--zero-shot", "zebra") and current(bundle) == "head-0042"


def test_a_version_folder_with_a_huge_number_is_not_a_version(bundle):
    """A head-<240 digits> folder used to give the next version a name the file system refuses."""
    heads = bundle / HEADS
    shutil.copytree(heads / current(bundle), heads / ("head-" + "9" * 240))
    n = max(int(v[5:]) for v in versions(bundle) if len(v) < 20)
    cli("update", str(bundle), "--zero-shot", "zebra")
    assert current(bundle) == f"head-{n + 1:04d}"
    (heads / "CURRENT").write_text("head-" + "9" * 240 + "\n")
    one_line_error(cli("update", str(bundle), "--zero-shot", "yak", check=False), "not a version folder name")


def test_malformed_manifest_entries_are_one_line_naming_the_manifest(bundle, new_digits):
    from runtime.bundle import load_head

    version = bundle / HEADS / current(bundle)
    manifest_path = version / "manifest.json"
    good = json.loads(manifest_path.read_text())
    image = str(sorted((new_digits / "nine").glob("*.png"))[0])
    for entry in ("abc", {"bytes": 10}, {"sha256": 5}, {"sha256": "0" * 64, "bytes": "ten"}, None):
        manifest_path.write_text(json.dumps({**good, "files": {**good["files"], "head.json": entry}}))
        with pytest.raises(CgilError, match="manifest.json is corrupt: the entry of 'head.json'"):
            load_head(bundle)
    one_line_error(cli("predict", str(bundle), image, check=False), str(manifest_path), "head.json")
    one_line_error(cli("update", str(bundle), "--zero-shot", "zebra", check=False), str(manifest_path))
    manifest_path.write_text(json.dumps(good))
    assert load_head(bundle).version == int(version.name[5:])


def test_head_json_must_agree_with_its_folder(bundle, new_digits):
    from runtime.bundle import load_head

    version = bundle / HEADS / current(bundle)
    good = json.loads((version / "head.json").read_text())
    image = str(sorted((new_digits / "nine").glob("*.png"))[0])
    cases = {
        "says head_version 77, but it is in the folder": {**good, "head_version": 77},
        "head_version \"4\" is not a version number": {**good, "head_version": "4"},
        "class_ids must be one integer per name": {**good, "class_ids": ["abc"] + good["class_ids"][1:]},
        "class_ids must be one integer per name of class_names": {**good, "class_ids": good["class_ids"][:-1]},
    }
    for message, meta in cases.items():
        (version / "head.json").write_text(json.dumps(meta))
        rewrite_manifest(version)  # integrity holds: only the agreement check catches it
        with pytest.raises(CgilError, match=message):
            load_head(bundle)
        one_line_error(cli("predict", str(bundle), image, check=False), "head.json")
    (version / "head.json").write_text(json.dumps(good))
    rewrite_manifest(version)
    assert load_head(bundle).class_names == good["class_names"]


# ---------------------------------------------------------------- 8. a full disk names the file being written
FULL_DISK = r"""
import os, shutil, subprocess, sys
bundle, mnt, size = sys.argv[1], sys.argv[2], sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], check=True)
b = os.path.join(mnt, "bundle")
shutil.copytree(bundle, b)
with open(os.path.join(mnt, "filler"), "wb", buffering=0) as f:  # fill the disk to the last block
    for block in (65536, 512):
        try:
            while True:
                f.write(b"\0" * block)
        except OSError:
            pass
out = subprocess.run([sys.executable, "-m", "cli", "update", b, "--zero-shot", "zebra"], capture_output=True, text=True)
sys.stdout.write(f"{out.returncode}\n{out.stderr}")
"""


def test_a_full_disk_names_the_file_of_the_new_version(bundle, tmp_path):
    live = current(bundle)
    new = f"head-{int(live[5:]) + 1:04d}"
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) + (4 << 20)
    out, mnt = on_a_full_disk(tmp_path, FULL_DISK, str(bundle), str(size))
    rc, stderr = out.stdout.split("\n", 1)
    assert rc == "2" and "No space left on device" in stderr and len(stderr.strip().splitlines()) == 1, out.stdout
    assert f"cannot write {mnt}/bundle/heads/{new}" in stderr, stderr  # the file it was writing ...
    assert f"/{live}/" not in stderr and ".tmp" not in stderr, stderr  # ... not the live head it was reading


# ---------------------------------------------------------------- 9. admin credentials and proxies
WRONG_CREDENTIALS = [
    {"Authorization": "Basic YWRtaW46czNjcmV0"},  # admin:s3cret, the right secret in the wrong scheme
    {"Authorization": "Token s3cret"},
    {"Authorization": "Token WRONG"},
    {"Authorization": "Bearer"},  # empty (h11 strips the space of "Bearer ", on both ends)
    {"Authorization": ""},
    {"X-Admin-Token": ""},
    {"Authorization": "Bearer s3cret", "X-Admin-Token": "wrong"},  # one right, one wrong: refused
    {"Authorization": "Basic Zm9vOmJhcg==", "X-Admin-Token": "s3cret"},
]
PROXY_HEADERS = ["X-Client-IP", "True-Client-IP", "CF-Connecting-IP", "Fastly-Client-IP", "X-Cluster-Client-IP"]


def test_any_wrong_credential_is_403_from_loopback_and_cdn_headers_are_proxied(bundle):
    with running_server(bundle, admin_token="s3cret", watch_interval_s=0) as url, httpx.Client(base_url=url) as c:
        for headers in WRONG_CREDENTIALS:
            r = c.post("/v1/admin/reload", headers=headers)
            assert r.status_code == 403, (headers, r.status_code)
        for h in PROXY_HEADERS:
            assert c.post("/v1/admin/reload", headers={h: "203.0.113.7"}).status_code == 403, h
            assert c.post("/v1/admin/reload", headers={h: "203.0.113.7", "Authorization": "Bearer s3cret"}
                          ).status_code == 200, h  # behind a proxy, the token
        assert c.post("/v1/admin/reload", headers={"Authorization": "bearer  s3cret"}).status_code == 200
        assert c.post("/v1/admin/reload", headers={"X-Admin-Token": "s3cret"}).status_code == 200
        assert c.post("/v1/admin/reload").status_code == 200  # a direct loopback peer without any credential
    with running_server(bundle, watch_interval_s=0) as url, httpx.Client(base_url=url) as c:  # no token configured
        for headers in ({"Authorization": "Basic YWRtaW46czNjcmV0"}, {"Authorization": "Bearer"},
                        {"X-Admin-Token": ""}, {"True-Client-IP": "127.0.0.1"}):
            assert c.post("/v1/admin/reload", headers=headers).status_code == 403, headers
        assert c.post("/v1/admin/reload").status_code == 200
