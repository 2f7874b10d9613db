"""On-device updates: new digit classes learned from images via the bundle's own ONNX engine and the
generator replay store, zero-shot names without torch, atomic versions, rollback, kill -9 safety.

The starting bundle is a real CGIL run on digits 0-7 (PNG class folders, small budgets, Gauss
generators so that it trains in seconds), exported to ONNX; the update brings digits 8 and 9.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import CgilError

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--epochs", "2", "--passes", "2"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"cgil {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def current(bundle: Path) -> str:
    return (bundle / "heads" / "CURRENT").read_text().strip()


# ---- image updates ------------------------------------------------------------------------------------
def test_update_learns_new_classes_from_images_and_rolls_back(bundle, new_digits):
    from export.update import update_from_images
    from runtime import Classifier
    from runtime.bundle import load_head

    before = load_head(bundle)
    assert before.class_names and "eight" not in before.class_names
    result = update_from_images(bundle, new_digits, epochs=2, passes=2)
    assert set(result["timings"]) == {"features", "load", "generators", "alignment", "write"}
    head = load_head(bundle)
    assert head.version == before.version + 1 == result["version"]
    assert head.class_names == before.class_names + ["eight", "nine"]
    assert head.keys.shape == (10, before.keys.shape[1]) and np.allclose(np.linalg.norm(head.keys, axis=1), 1, atol=1e-5)
    # the new version holds everything a further update needs, covered by its manifest
    files = set(json.loads((head.directory / "manifest.json").read_text())["files"])
    assert {"head.safetensors", "head.json", "store.safetensors", "store.json", "prompts.safetensors",
            "prompts.json", "prompt_context.safetensors"} <= files
    store = json.loads((head.directory / "store.json").read_text())
    assert [g["class_ids"] for g in store["groups"]][-1] == result["class_ids"]
    # the prompted text graph reproduces the new keys from the exported context: the head is consistent
    from safetensors.numpy import load_file

    from runtime.text import TextEncoderRuntime

    ctx = load_file(str(head.directory / "prompt_context.safetensors"))
    clf = Classifier(bundle)
    keys = TextEncoderRuntime(bundle, clf.manifest).prompted_keys(ctx["context"], ctx["tokens"])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    assert float((keys * head.keys).sum(1).min()) >= 0.999
    # images of the new classes are embedded with the same engine that serves: predictions use the new names
    eight = sorted((new_digits / "eight").glob("*.png"))[:20]
    assert any(p.labels[0] == "eight" for p in clf.predict(eight, top_k=1))

    out = cli("update", "--rollback", str(bundle))
    assert "head-%04d -> head-%04d" % (head.version, before.version) in out.stdout
    assert load_head(bundle).version == before.version
    again = cli("update", "--rollback", str(bundle), check=False)
    assert again.returncode == 2 and "no previous head version" in again.stderr
    # a later update never reuses the rolled-back version number
    assert update_from_images(bundle, new_digits, epochs=1, passes=1)["version"] == head.version + 1


def test_duplicate_class_names_are_refused(bundle, new_digits, tmp_path):
    from export.update import update_from_images
    from runtime.heads import add_zero_shot

    dup = tmp_path / "dup"
    shutil.copytree(new_digits / "eight", dup / "three")  # "three" is learned already
    before = current(bundle)
    with pytest.raises(CgilError, match="learned already: three"):
        update_from_images(bundle, dup, epochs=1, passes=1)
    with pytest.raises(CgilError, match="already in the head: three"):
        add_zero_shot(bundle, ["three"])
    with pytest.raises(CgilError, match="given twice"):
        add_zero_shot(bundle, ["forklift", "forklift"])
    out = cli("update", str(bundle), "--zero-shot", "three", check=False)
    assert out.returncode == 2 and "three" in out.stderr
    assert current(bundle) == before  # nothing was published


def test_zero_shot_class_without_torch_then_learned_from_images(bundle, new_digits):
    from runtime import Classifier
    from runtime.bundle import load_head

    code = ("import sys; from runtime.heads import add_zero_shot; "
            f"r = add_zero_shot({str(bundle)!r}, ['eight', 'forklift']); "
            "print(r['version'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    version, torch_loaded = out.stdout.split()
    assert torch_loaded == "False"
    head = load_head(bundle)
    assert head.version == int(version) and head.class_names[-2:] == ["eight", "forklift"]
    clf = Classifier(bundle)
    np.testing.assert_allclose(head.keys[-2:], clf.zero_shot_keys(["eight", "forklift"]), atol=1e-6)
    # an image update of a zero-shot name replaces its key with a learned prompt (the one accepted known name)
    from export.update import update_from_images

    update_from_images(bundle, new_digits, epochs=1, passes=1)
    head = load_head(bundle)
    meta = json.loads((head.directory / "head.json").read_text())
    assert head.class_names.count("eight") == 1 and "nine" in head.class_names and "forklift" in head.class_names
    assert meta["zero_shot_class_names"] == ["forklift"]
    i = head.class_names.index("eight")
    assert float(head.keys[i] @ clf.zero_shot_keys(["eight"])[0]) < 0.9999  # a learned key now
    assert "eight" in json.loads((head.directory / "prompts.json").read_text())["class_names"]


def test_fp16_store_halves_generator_bytes_and_updates_again(bundle, new_digits, tmp_path):
    from safetensors import safe_open

    from export.update import update_from_images
    from runtime.store_info import store_info

    fp32 = tmp_path / "fp32"
    shutil.copytree(bundle, fp32)
    update_from_images(fp32, new_digits, epochs=1, passes=1)
    update_from_images(bundle, new_digits, epochs=1, passes=1, store_precision="fp16")
    a, b = store_info(fp32), store_info(bundle)
    assert b["store_precision"] == "fp16"
    for ra, rb in zip(a["classes"], b["classes"]):
        assert rb["generator_bytes"] == pytest.approx(ra["generator_bytes"] / 2, rel=0.05)
    with safe_open(str(Path(b["directory"]) / "store.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    # the fp16 store is read back for the next update's replay
    more = tmp_path / "more"
    write = __import__("benchmarks.serve", fromlist=["write_digit_folders"]).write_digit_folders
    write(more, (0,), splits=("train",), flat=True, limit=10)
    (more / "zero").rename(more / "zero bis")
    assert update_from_images(bundle, more, epochs=1, passes=1)["added"] == ["zero bis"]
    # store info: per class and part, vs raw features / images of the same classes
    new = [r for r in a["classes"] if r["class"] in ("eight", "nine")]
    assert all(r["images"] == 40 and r["raw_features_bytes"] == 40 * a["embed_dim"] * 4 and r["raw_images_bytes"] > 0
               for r in new)
    out = cli("store", "info", str(fp32), "--json")
    assert json.loads(out.stdout)["head_version"] == a["head_version"]


# ---- kill -9 of cgil update --------------------------------------------------------------------------
def test_kill_9_during_update_leaves_a_loadable_serving_bundle(bundle, new_digits):
    import httpx

    from runtime.bundle import load_head
    from test_serve import running_server  # noqa: WPS433

    first = current(bundle)
    first_version = load_head(bundle).version
    rng = random.Random(1234)
    from runtime.heads import rollback

    cmd = [sys.executable, "-m", "cli", "update", str(bundle), "--data", str(new_digits), "--epochs", "2", "--passes", "2"]
    # one complete update measures how long an update takes on this machine now, then is rolled back
    t0 = time.perf_counter()
    cli(*cmd[3:])
    duration = time.perf_counter() - t0
    rollback(bundle)
    assert current(bundle) == first
    trials = 5  # kill points spread over the whole run: one seeded random point in each fifth
    delays = [duration * rng.uniform(i / trials, (i + 1) / trials) for i in range(trials)]
    outcomes = []
    with running_server(bundle) as url, httpx.Client(base_url=url, timeout=30) as client:
        png = sorted((new_digits / "nine").glob("*.png"))[0].read_bytes()
        for trial, delay in enumerate(delays):
            log = bundle.parent / f"update-{trial}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
            killed = proc.returncode == -signal.SIGKILL
            text = log.read_text()
            stage = next((s for key, s in (("published", "after publish"), ("realigned", "in write"),
                                           ("fitted", "in alignment"), ("embedded", "in load/generators"))
                          if key in text), "in start-up/features")
            # the bundle loads and verifies: either the previous version, or the complete new one
            head = load_head(bundle)
            name = current(bundle)
            assert name in (first, f"head-{head.version:04d}")
            assert head.version == first_version if name == first else head.version > first_version
            outcomes.append((round(delay, 2), killed, stage, name))
            # and serves (the watcher may swap; every request still succeeds)
            for _ in range(5):
                r = client.post("/v1/classify", content=png, headers={"content-type": "image/png"})
                assert r.status_code == 200, r.text
            if name != first:  # a finished update: go back so every trial starts from the same version
                rollback(bundle)
        time.sleep(0.5)
        assert client.get("/v1/classes").json()["head_version"] == first_version
    print("kill -9 trials (delay s, killed, where, CURRENT after):", outcomes)
    assert any(k for _, k, _, _ in outcomes), outcomes  # at least one trial was really killed mid-update
    leftovers = [p.name for p in (bundle / "heads").iterdir() if p.name.endswith(".tmp")]
    # orphaned temporary folders of killed updates are removed by the next update
    from runtime.heads import add_zero_shot

    add_zero_shot(bundle, ["forklift"])
    assert not [p for p in (bundle / "heads").iterdir() if p.name.endswith(".tmp")], leftovers


CRASHES = {  # where the process dies (os._exit: no cleanup, no finally, like kill -9) -> which version is current after
    "writing the version files": ("write_head_files", "before"),
    "before the folder rename": ("rename", "before"),
    "after the rename, before the pointer switch": ("rename", "after"),
    "after the pointer switch, before history.json": ("history", "before"),
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_death_at_each_step_of_publishing_keeps_a_consistent_bundle(bundle, where):
    from runtime.heads import add_zero_shot, rollback
    from runtime.bundle import load_head

    target, when = CRASHES[where]
    first, first_version = current(bundle), load_head(bundle).version
    code = f"""
import os, runtime.artifacts as a, runtime.heads as u
target, when = {target!r}, {when!r}
if target == "write_head_files":
    real = u.write_head_files
    def patched(d, *args):
        real(d, *args)
        os._exit(137)
    u.write_head_files = patched
elif target == "rename":
    real = os.replace
    def patched(src, dst):
        if not os.path.isdir(src):  # file writes go through os.replace too
            return real(src, dst)
        if when == "before":
            os._exit(137)
        real(src, dst)
        os._exit(137)
    a.os.replace = patched
else:
    real = a.atomic_write_bytes
    def patched(path, data):
        if path.name == "history.json":
            os._exit(137)
        real(path, data)
    a.atomic_write_bytes = patched
u.add_zero_shot({str(bundle)!r}, ["forklift"])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 137, out.stderr
    head = load_head(bundle)  # verified: every sha256 of the current version
    if where.startswith("after the pointer"):
        assert head.version == first_version + 1 and "forklift" in head.class_names
        assert rollback(bundle) == (f"head-{head.version:04d}", first)  # history.json was not written: still rolls back
    else:
        assert current(bundle) == first and head.version == first_version and "forklift" not in head.class_names
    # the next update cleans up and publishes normally
    result = add_zero_shot(bundle, ["forklift"])
    assert load_head(bundle).version == result["version"] and "forklift" in load_head(bundle).class_names
    assert not [p for p in (bundle / "heads").iterdir() if p.name.endswith(".tmp")]
