"""`cgil bench update --whole-run`: one whole run's CPU split (fit, alignment, fixed) against the fixture's
reference CPU time, read from the fixture (issue 19, item 4)."""
import json

import pytest

from test_fidelity import synthetic_reference


def test_reference_cpu_seconds_come_from_the_fixture_note():
    from benchmarks.update_run import reference_cpu_seconds
    from runtime.errors import CgilError

    note = "reference CPU time for one 5-task run at these settings, 1 thread, 2-core AMD EPYC: 176-205 s"
    assert reference_cpu_seconds({"cpu_seconds_note": note}) == (176.0, 205.0)
    assert reference_cpu_seconds({"cpu_seconds_note": "one run: 180.5 s"}) == (180.5, 180.5)
    with pytest.raises(CgilError, match="gives no CPU seconds"):
        reference_cpu_seconds({"cpu_seconds_note": "not measured"})


def test_update_whole_run_splits_a_real_run_and_compares_it_with_the_fixture(tmp_path):
    from benchmarks import update

    ref = synthetic_reference(tmp_path / "ref.json")
    doc = json.loads(ref.read_text())
    doc["cpu_seconds_note"] = "reference CPU time for one run: 100-120 s"
    ref.write_text(json.dumps(doc))
    update.main(["--quick", "--dims", "64", "--generators", "gauss", "--skip-align", "--no-profile",
                 "--reference-passes", "0", "--whole-run", "--reference", str(ref), "--threads", "1",
                 "--out-dir", str(tmp_path / "out")])
    (path,) = (tmp_path / "out").glob("update-*.json")
    split = json.loads(path.read_text())["meta"]["whole_run"]
    assert split["order"] == 3 and split["quick"] is True  # the fixture's class order, smoke budgets
    assert 0 < split["fit_cpu_s"] and 0 < split["align_cpu_s"] and 0 < split["imports_cpu_s"] < split["fixed_cpu_s"]
    total = split["total_cpu_s"]
    assert total == pytest.approx(split["fit_cpu_s"] + split["align_cpu_s"] + split["fixed_cpu_s"])
    assert (split["reference_cpu_s_low"], split["reference_cpu_s_high"]) == (100.0, 120.0)
    assert split["cheaper_than_reference_x_low"] == pytest.approx(100.0 / total)
    assert 0 <= split["final_avg_acc"] <= 100
