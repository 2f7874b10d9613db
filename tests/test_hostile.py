"""Hostile bundles, hostile names, hostile requests: what an attacker or an unlucky operator does to
`cgil update`, `cgil predict` and `cgil serve` (issue 11). Real bundles, real files, real servers.

Every test here failed on the code before the fix: path traversal through heads/CURRENT and
history.json, unlisted files, NaN or empty heads, a non-UTF-8 pointer killing the watcher, leaking
versions, tracebacks, class names with escapes, wrong tokens from loopback, forwarded requests.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from runtime.errors import CgilError
from test_serve import digit_png, post_image, running_server
from test_update import ROOT, cli, current

HEADS = "heads"


def versions(bundle: Path) -> list[str]:
    return sorted(p.name for p in (bundle / HEADS).iterdir() if p.name.startswith("head-"))


def rewrite_manifest(version_dir: Path) -> None:
    """An attacker who can write the bundle can also rewrite a head's manifest (sha256 and all)."""
    from runtime.artifacts import read_json, write_manifest

    old = read_json(version_dir / "manifest.json")
    write_manifest(version_dir, old["kind"], {"model": old.get("model")})


# ---------------------------------------------------------------- 1. path traversal
def test_history_naming_a_folder_outside_the_bundle_never_deletes_it(bundle, tmp_path):
    from runtime.heads import add_zero_shot

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    heads = bundle / HEADS
    history = json.loads((heads / "history.json").read_text())
    for attack in ([str(victim), *history], ["../../victim", *history]):
        (heads / "history.json").write_text(json.dumps(attack))
        before = versions(bundle)
        for name in ("x", "y"):  # twice: the first update used to push the victim out of the kept history
            out = cli("update", str(bundle), "--zero-shot", name, check=False)
            assert out.returncode == 2 and "history.json" in out.stderr and "Traceback" not in out.stderr
            assert len(out.stderr.strip().splitlines()) == 1
        assert (victim / "precious.txt").read_text() == "keep me"
        assert versions(bundle) == before
    with pytest.raises(CgilError, match="not a version folder name"):
        add_zero_shot(bundle, ["z"])


def test_a_pointer_or_a_version_that_leads_outside_heads_is_refused(bundle, tmp_path):
    from runtime.bundle import load_head
    from runtime.heads import add_zero_shot

    heads = bundle / HEADS
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(heads / current(bundle), elsewhere / "head-copy")
    good = current(bundle)
    (heads / "CURRENT").write_text("../../elsewhere/head-copy\n")
    with pytest.raises(CgilError, match="not a version folder name"):
        load_head(bundle)
    with pytest.raises(CgilError, match="not a version folder name"):
        add_zero_shot(bundle, ["x"])
    assert (elsewhere / "head-copy" / "manifest.json").exists()
    # a version folder that is a symlink to a folder elsewhere: never followed, never deleted through
    (heads / "CURRENT").write_text(good + "\n")
    (heads / "head-0099").symlink_to(elsewhere / "head-copy", target_is_directory=True)
    (heads / "CURRENT").write_text("head-0099\n")
    with pytest.raises(CgilError, match="resolves outside"):
        load_head(bundle)
    (heads / "CURRENT").write_text(good + "\n")
    add_zero_shot(bundle, ["x"])  # prunes the stray link itself, not what it points at
    assert not (heads / "head-0099").exists() and (elsewhere / "head-copy" / "manifest.json").exists()


def test_engine_paths_outside_the_bundle_and_unlisted_files_fail_verification(bundle):
    from runtime.bundle import load_head, open_bundle

    manifest = json.loads((bundle / "manifest.json").read_text())
    for bad in ("../image.onnx", "/etc/passwd"):
        edited = {**manifest, "engine": {**manifest["engine"], "image": bad}}
        (bundle / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(CgilError, match="image engine"):
            open_bundle(bundle)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    open_bundle(bundle)
    (bundle / "extra.onnx").write_bytes(b"planted")
    with pytest.raises(CgilError, match="extra.onnx is not listed"):
        open_bundle(bundle)
    (bundle / "extra.onnx").unlink()
    # an edited head.json taken out of its manifest: served before, refused now
    version = bundle / HEADS / current(bundle)
    head_manifest = json.loads((version / "manifest.json").read_text())
    del head_manifest["files"]["head.json"]
    (version / "manifest.json").write_text(json.dumps(head_manifest))
    meta = json.loads((version / "head.json").read_text())
    meta["class_names"] = ["pwned"] + meta["class_names"][1:]
    (version / "head.json").write_text(json.dumps(meta))
    with pytest.raises(CgilError, match="head.json is not listed"):
        load_head(bundle)


# ---------------------------------------------------------------- 2. a bad CURRENT and the watcher
def test_a_non_utf8_pointer_is_refused_and_the_watcher_recovers(bundle, new_digits):
    pointer = bundle / HEADS / "CURRENT"
    good = pointer.read_bytes()
    with running_server(bundle, watch_interval_s=0.05) as url, httpx.Client(base_url=url) as c:
        version = c.get("/v1/classes").json()["head_version"]
        pointer.write_bytes(b"\xff\xfe head-\x80\n")
        r = c.post("/v1/admin/reload")
        assert r.status_code == 409 and "UTF-8" in r.json()["error"]
        assert post_image(c, digit_png(new_digits)).json()["head_version"] == version
        ready = c.get("/readyz").json()
        assert ready["status"] == "degraded" and "UTF-8" in ready["head_watch"]["error"]
        assert "cgil_head_watch_failing 1" in c.get("/metrics").text
        pointer.write_bytes(good)  # fixed: the watcher (still alive) follows it again
        for _ in range(200):
            if c.get("/readyz").json()["status"] == "ready":
                break
            time.sleep(0.05)
        assert c.get("/readyz").json() | {"head_watch": None} == {"status": "ready", "head_version": version,
                                                                   "backend": "onnxruntime", "head_watch": None}
        assert "cgil_head_watch_failing 0" in c.get("/metrics").text
        from runtime.heads import add_zero_shot

        add_zero_shot(bundle, ["forklift"])  # and a later update is swapped in by the watcher
        for _ in range(200):
            if "forklift" in c.get("/v1/classes").json()["classes"]:
                break
            time.sleep(0.05)
        assert "forklift" in c.get("/v1/classes").json()["classes"]
    pointer.write_bytes(b"\xff\xfe\n")
    out = cli("predict", str(bundle), str(sorted((new_digits / "nine").glob("*.png"))[0]), check=False)
    assert out.returncode == 2 and "CURRENT" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- 3. sanity of heads
def test_a_diverged_update_is_refused_and_the_bundle_is_unchanged(bundle, new_digits):
    before, dirs = current(bundle), versions(bundle)
    out = cli("update", str(bundle), "--data", str(new_digits), "--lr", "1e30", "--epochs", "2", "--passes", "1",
              check=False)
    assert out.returncode == 2, out.stderr
    assert "not finite" in out.stderr and "Traceback" not in out.stderr
    assert current(bundle) == before and versions(bundle) == dirs


def test_an_empty_or_nan_head_is_never_swapped_in(bundle, new_digits):
    from safetensors.numpy import load_file, save_file

    from runtime.bundle import load_head, open_bundle

    heads = bundle / HEADS
    good = current(bundle)
    with running_server(bundle, watch_interval_s=0) as url, httpx.Client(base_url=url) as c:
        for damage in ("empty", "nan", "scaled"):
            bad = heads / "head-0090"
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(heads / good, bad)
            meta = json.loads((bad / "head.json").read_text())
            keys = load_file(str(bad / "head.safetensors"))
            if damage == "empty":
                meta["class_names"], meta["class_ids"] = [], []
                keys["keys"] = keys["keys"][:0]
            elif damage == "nan":
                keys["keys"][1:] = np.nan
            else:
                keys["keys"] *= 3.0
            save_file(keys, str(bad / "head.safetensors"))
            (bad / "head.json").write_text(json.dumps(meta))
            rewrite_manifest(bad)  # integrity holds: only sanity can catch it
            (heads / "CURRENT").write_text("head-0090\n")
            r = c.post("/v1/admin/reload")
            assert r.status_code == 409, (damage, r.text)
            assert {"empty": "no classes", "nan": "not finite", "scaled": "unit norm"}[damage] in r.json()["error"]
            ok = post_image(c, digit_png(new_digits))
            assert ok.status_code == 200 and all(s is not None for s in ok.json()["results"][0]["scores"])
            (heads / "CURRENT").write_text(good + "\n")
        with pytest.raises(CgilError, match="unit norm"):
            load_head(heads / "head-0090")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for scale in ("NaN", "abc", 1e9):
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "logit_scale": scale}))
        with pytest.raises(CgilError, match="logit_scale"):
            open_bundle(bundle)


# ---------------------------------------------------------------- 5. versions do not leak
def test_add_rollback_cycles_keep_current_and_rollback_target_only(bundle):
    from runtime.heads import add_zero_shot, rollback

    start = current(bundle)
    seen = set()
    for i in range(5):
        v = add_zero_shot(bundle, [f"class {i}"])["version"]
        assert v not in seen  # numbers are never reused, even after pruning
        seen.add(v)
        assert len(versions(bundle)) <= 2
        rollback(bundle)
    assert current(bundle) == start and versions(bundle) == [start]
    # a complete version renamed into place by a writer killed before its pointer switch
    leftover = bundle / HEADS / "head-0500"
    shutil.copytree(bundle / HEADS / start, leftover)
    v = add_zero_shot(bundle, ["after"])["version"]
    assert v == 501 and not leftover.exists() and versions(bundle) == [start, "head-0501"]


# ---------------------------------------------------------------- 6. tracebacks become one line
def test_edited_manifests_and_pointers_are_one_line_errors(bundle, new_digits):
    image = str(sorted((new_digits / "nine").glob("*.png"))[0])
    manifest = json.loads((bundle / "manifest.json").read_text())
    cases = {
        "logit_scale": {**manifest, "logit_scale": "abc"},
        "preprocess size": {**manifest, "preprocess": {**manifest["preprocess"], "size": [200, 200]}},
        "preprocess section": {**manifest, "preprocess": {**manifest["preprocess"], "mean": "abc"}},
    }
    for what, edited in cases.items():
        (bundle / "manifest.json").write_text(json.dumps(edited))
        commands = [("predict", str(bundle), image)]
        if what != "preprocess size":  # a name-only update never runs the image engine: it may go on
            commands.append(("update", str(bundle), "--zero-shot", "zebra"))
        for args in commands:
            out = cli(*args, check=False)
            assert out.returncode == 2 and "Traceback" not in out.stderr, (what, args, out.stderr)
            assert len(out.stderr.strip().splitlines()) == 1 and "manifest.json" in out.stderr or what in out.stderr


FULL_DISK = r"""
import json, os, shutil, subprocess, sys
bundle, data, mnt, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], check=True)
b = os.path.join(mnt, "bundle")
shutil.copytree(bundle, b)
pointer = open(os.path.join(b, "heads", "CURRENT")).read()
def ls():  # the lock file is created by the first update and stays
    return sorted(n for n in os.listdir(os.path.join(b, "heads")) if n != ".update.lock")
listing = ls()
with open(os.path.join(mnt, "filler"), "wb", buffering=0) as f:  # fill the disk to the last block
    try:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    except OSError:
        pass
    try:
        while True:
            f.write(b"\0" * 512)
            f.flush()
    except OSError:
        pass
results = {}
for kind, args in (("zero-shot", ["--zero-shot", "zebra"]), ("images", ["--data", data, "--epochs", "1", "--passes", "1"])):
    out = subprocess.run([sys.executable, "-m", "cli", "update", b, *args], capture_output=True, text=True)
    results[kind] = {"rc": out.returncode, "stderr": out.stderr,
                     "pointer_kept": open(os.path.join(b, "heads", "CURRENT")).read() == pointer,
                     "listing_kept": ls() == listing}
print(json.dumps(results))
"""


def on_a_full_disk(tmp_path: Path, script: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `script` in a user and mount namespace with ARGV = args + (a mount point, for it to mount a small
    tmpfs on); skipped where such namespaces are not allowed. Returns the process and the mount point."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare: cannot mount a private tmpfs here")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    path = tmp_path / "full_disk.py"
    path.write_text(script)
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, str(path), *args[:-1],
                          str(mnt), args[-1]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out, mnt


def test_a_full_disk_during_either_update_is_one_line_and_changes_nothing(bundle, new_digits, tmp_path):
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) + (8 << 20)  # the bundle + 8 MB to fill
    out, _ = on_a_full_disk(tmp_path, FULL_DISK, str(bundle), str(new_digits), str(size))
    for kind, r in json.loads(out.stdout.strip().splitlines()[-1]).items():
        assert r["rc"] == 2 and "Traceback" not in r["stderr"], (kind, r["stderr"])
        assert "No space left on device" in r["stderr"] and len(r["stderr"].strip().splitlines()) == 1, (kind, r)
        assert r["pointer_kept"] and r["listing_kept"], (kind, r)


# ---------------------------------------------------------------- 7. one name rule
def test_the_name_rule():
    from runtime.names import clean_name, clean_names, folder_class_name

    assert clean_name("  red \u00a0  fox ") == "red fox"
    assert clean_name("cafe\u0301") == "caf\u00e9"  # NFC
    assert folder_class_name("_two") == "two" and folder_class_name("sea__lion") == "sea lion"
    for bad, why in (("a\nb", "control"), ("\x1b[31mred", "control"), ("abc\u202edcba", "bidirectional"),
                     ("x" * 101, "at most 100"), ("   ", "empty"), ("a\u2028b", "control")):
        with pytest.raises(CgilError, match=why):
            clean_name(bad)
    assert clean_name("x" * 100) == "x" * 100
    with pytest.raises(CgilError, match="ignoring case"):
        clean_names(["Two", "two"])
    with pytest.raises(CgilError, match="already in the head: two \\(as Two\\)"):
        clean_names(["two"], existing=["Two"])


def test_names_are_checked_in_updates_and_folder_datasets(bundle, new_digits, tmp_path):
    from cgil.data.folder import load_folder_dataset
    from export.update import class_folders
    from runtime.heads import add_zero_shot

    data = tmp_path / "data"
    shutil.copytree(new_digits / "eight", data / "two")
    shutil.copytree(new_digits / "eight", data / "_two")
    with pytest.raises(CgilError, match="given twice"):
        class_folders(data)
    shutil.rmtree(data / "_two")
    shutil.copytree(new_digits / "eight", data / "Two")
    with pytest.raises(CgilError, match="ignoring case"):
        class_folders(data)
    for split in ("train", "test"):
        for name in ("two", "_two"):
            shutil.copytree(new_digits / "eight", tmp_path / "ds" / split / name)
    with pytest.raises(CgilError, match="given twice"):
        load_folder_dataset(tmp_path / "ds")
    before = current(bundle)
    learned = json.loads((bundle / HEADS / before / "head.json").read_text())["class_names"]
    for bad in ("\x1b[2J\x1b[31mred", "evil\u202egnp.exe", "x" * 250, learned[0].upper(), "new\nline"):
        with pytest.raises(CgilError):
            add_zero_shot(bundle, [bad])
    out = cli("update", str(bundle), "--zero-shot", "\x1b[31mred", check=False)
    assert out.returncode == 2 and "\x1b" not in out.stderr and "\\u001b" in out.stderr
    assert current(bundle) == before


def test_predict_never_prints_raw_escapes_from_a_head(bundle, new_digits):
    version = bundle / HEADS / current(bundle)
    meta = json.loads((version / "head.json").read_text())
    meta["class_names"] = ["\x1b[2J\x1b[31mowned\u202e" + n for n in meta["class_names"]]
    (version / "head.json").write_text(json.dumps(meta))
    rewrite_manifest(version)  # a bundle made elsewhere, before the name rule
    out = cli("predict", str(bundle), str(sorted((new_digits / "nine").glob("*.png"))[0]), check=False)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\u202e" not in out.stdout and "\\u001b" in out.stdout


# ---------------------------------------------------------------- the two promises
def test_a_wrong_token_is_403_from_loopback_and_forwarded_requests_are_not_loopback(bundle):
    with running_server(bundle, admin_token="s3cret", watch_interval_s=0) as url, httpx.Client(base_url=url) as c:
        assert c.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert c.post("/v1/admin/reload", headers={"X-Admin-Token": "wrong"}).status_code == 403
        for proxy in ({"Forwarded": "for=203.0.113.7"}, {"X-Real-IP": "203.0.113.7"},
                      {"X-Forwarded-For": "203.0.113.7"}):
            assert c.post("/v1/admin/reload", headers=proxy).status_code == 403, proxy
        assert c.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/admin/reload").status_code == 200  # direct loopback, no token
    with running_server(bundle, watch_interval_s=0) as url, httpx.Client(base_url=url) as c:  # no token configured
        assert c.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"}).status_code == 403


# ---------------------------------------------------------------- the recorded settings
def test_an_update_realigns_with_the_runs_recorded_settings(bundle, new_digits):
    from export.update import update_from_images
    from runtime.bundle import load_head

    recorded = json.loads((bundle / HEADS / current(bundle) / "head.json").read_text())["align"]
    assert recorded["epochs"] == 2  # the base bundle's run trained with --epochs 2
    update_from_images(bundle, new_digits, passes=1)
    meta = json.loads((load_head(bundle).directory / "head.json").read_text())
    assert meta["align"]["epochs"] == 2 and meta["align"]["lr"] == recorded["lr"]
