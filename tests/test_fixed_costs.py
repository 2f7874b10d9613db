"""Fixed costs of a run (issue 19, item 3): digits without importing scikit-learn once cached, PNG figures
only on request."""
import json
import os
import subprocess
import sys

from cgil.report import write_class_report, write_run_report

LOAD = ("import sys, json; from cgil.data.digits import load_digits_dataset; d = load_digits_dataset(); "
        "print(json.dumps({'sklearn': 'sklearn' in sys.modules, 'train': int(len(d.train.labels)), "
        "'sum': int(sum(int(x.sum()) for x in d.train.items)), 'labels': d.test.labels.tolist()[:20]}))")


def load_in_child(cache) -> dict:
    env = {**os.environ, "CGIL_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_digits_come_from_the_cache_without_scikit_learn(tmp_path):
    first = load_in_child(tmp_path)
    assert first["sklearn"] and first["train"] == 1257  # the fixed 70/30 split of 1797 digits
    second = load_in_child(tmp_path)
    assert not second["sklearn"]
    assert {k: v for k, v in second.items() if k != "sklearn"} == {k: v for k, v in first.items() if k != "sklearn"}
    (tmp_path / "datasets" / "sklearn-digits-v1-split70-30-seed0.npz").write_bytes(b"broken")
    assert load_in_child(tmp_path)["sklearn"]  # an unreadable cache: loaded again, nothing lost
    assert not load_in_child(tmp_path)["sklearn"]


def test_reports_without_plots_write_every_table_and_no_figure(tmp_path):
    metrics = {"method": "cgil", "dataset": "digits", "model": "cgil-tiny", "accuracy_matrix": [[90.0, None], [60.0, 70.0]]}
    write_run_report(tmp_path, metrics, plots=False)
    write_class_report(tmp_path, ["a", "b"], [0, 1, 1], [0, 1, 0], plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy_matrix.csv", "confusion_matrix.csv", "metrics.json", "per_class_accuracy.csv"]
    write_run_report(tmp_path, metrics)  # the default still draws
    assert (tmp_path / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_train_no_plots_writes_the_reports_and_no_figure(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--method", "zeroshot", "--tasks", "2", "--quiet", "--no-plots",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file() and (out / "accuracy_matrix.csv").is_file()
    assert not list(out.rglob("*.png"))


def test_a_comparison_without_plots_has_its_tables_and_no_figure(tmp_path):
    from cgil.report import write_comparison

    metrics = {"final_avg_acc": 50.0, "timings": {}, "accuracy_matrix": [[90.0, None], [60.0, 40.0]]}
    write_comparison(tmp_path, {"cgil": metrics, "zeroshot": metrics}, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.json", "comparison.md"]
    write_comparison(tmp_path, {"cgil": metrics, "zeroshot": metrics})
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
