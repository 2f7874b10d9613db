"""`cgil bench fidelity --quick`: the smoke version of the comparison with the reference implementation."""
import json

import pytest


def synthetic_reference(path):
    """A fixture with the reference file's layout (values made up: the smoke run compares, never asserts them)."""
    ref = {
        "inputs": {"dataset": "digits (scikit-learn)", "model": "cgil-tiny", "pretrained": None, "model_seed": 0},
        "settings": {"generator": "vae", "vae_passes": 500, "vae_lr": 2e-4, "vae_hidden": 32, "vae_latent": 8,
                     "align_epochs": 60, "align_lr": 0.05, "batch": 128, "samples_per_class": 16, "n_ctx": 1},
        "end_to_end": {"3": {"final_avg_acc": 40.0}},
        "replay_per_class": {str(c): {"variance_ratio": 0.5, "frechet": 0.1, "n_real": 120} for c in range(10)},
    }
    path.write_text(json.dumps(ref))
    return path


@pytest.mark.slow
def test_fidelity_quick_writes_replay_and_end_to_end_tables(tmp_path):
    from benchmarks import fidelity

    ref = synthetic_reference(tmp_path / "ref.json")
    out = fidelity.main(["--quick", "--reference", str(ref), "--objectives", "reference", "textbook",
                         "--threads", "1", "--out-dir", str(tmp_path / "out")])
    doc = json.loads((tmp_path / "out" / out["json"].split("/")[-1]).read_text())
    assert doc["meta"]["quick"] is True
    rows = doc["rows"]
    assert {r["objective"] for r in rows} == {"reference", "textbook"}
    assert sorted({r["class"] for r in rows}) == list(range(10))
    for r in rows:
        assert r["variance_ratio"] > 0 and r["frechet"] > 0
        assert r["ratio_vs_ref"] == pytest.approx(r["variance_ratio"] / 0.5)
    e2e = doc["meta"]["end_to_end"]
    assert [(r["order"], r["gen_seed"]) for r in e2e] == [(3, 0)]  # the fixture's class order
    summ = doc["meta"]["summary"]["end_to_end"]
    assert summ["ref_mean"] == 40.0 and summ["target_met"] == (summ["mean"] >= 39.0)


def test_fidelity_refuses_a_missing_reference(tmp_path):
    from benchmarks import fidelity
    from runtime.errors import CgilError

    with pytest.raises(CgilError, match="reference fixture not found"):
        fidelity.main(["--quick", "--reference", str(tmp_path / "nope.json"), "--out-dir", str(tmp_path)])


def test_replay_rows_are_compared_with_the_reference_codes_mean_over_seeds():
    from benchmarks.fidelity import against_reference_code

    rows = [{"class": 0, "variance_ratio": 0.40, "frechet": 0.13}, {"class": 1, "variance_ratio": 0.30, "frechet": 0.30}]
    ref_code = [{"kind": "vae", "class": 0, "seed": s, "variance_ratio": r, "frechet": f}
                for s, r, f in [(0, 0.30, 0.10), (1, 0.50, 0.14)]]
    ref_code += [{"kind": "vae", "class": 1, "seed": 0, "variance_ratio": 0.45, "frechet": 0.20},
                 {"kind": "mog", "class": 1, "seed": 0, "variance_ratio": 0.30, "frechet": 0.30}]
    against_reference_code(rows, ref_code)
    assert rows[0]["ref_code_variance_ratio"] == pytest.approx(0.40) and rows[0]["ratio_ok_vs_ref_code"]
    assert rows[0]["fd_vs_ref_code"] == pytest.approx(0.13 / 0.12) and rows[0]["fd_ok_vs_ref_code"]
    assert rows[1]["ratio_vs_ref_code"] == pytest.approx(0.30 / 0.45) and not rows[1]["ratio_ok_vs_ref_code"]
    assert rows[1]["fd_vs_ref_code"] == pytest.approx(1.5) and not rows[1]["fd_ok_vs_ref_code"]


def test_reference_generators_load_from_their_files_without_the_framework(tmp_path):
    """A mammoth checkout's models/__init__.py chdirs and imports the whole framework (kornia, ...); the three
    generator files need none of it, so they are loaded from their paths and the package is never imported."""
    from benchmarks.fidelity import reference_module
    from runtime.errors import CgilError

    pkg = tmp_path / "models"
    (pkg / "cgil_utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the framework was imported')\n")
    (pkg / "cgil_utils" / "vae.py").write_text("import torch\n\nclass VariationalAutoEncoderModel:\n    dim = 7\n")
    assert reference_module(tmp_path, "vae").VariationalAutoEncoderModel.dim == 7
    with pytest.raises(CgilError, match="checkout of aimagelab/mammoth"):
        reference_module(tmp_path, "diffusion")
