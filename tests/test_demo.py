"""`graftkd demo --quick`: the whole pipeline end to end, small enough for the test suite."""
import json
import statistics

import pytest

from graftkd.cli import main


def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    models = [r["model"] for r in summary["rows"]]
    assert models[:4] == ["teacher resnet32", "teacher wrn_16_2", "teacher vgg8", "teacher ensemble"]
    study = json.loads((out / "students" / "compare.json").read_text())
    assert study["seeds"] == summary["student_seeds"] == [0, 1] and not study["failures"]
    rows = {r["model"]: r for r in summary["rows"]}
    for method in ("scratch", "kd", "mt_kd", "mt_graft", "atf"):
        row = rows[f"student {method} (resnet8)"]
        assert row["seeds"] == [0, 1] and len(row["test_acc_values"]) == 2  # the students are a study over seeds
        assert row["test_acc"] == pytest.approx(statistics.fmean(row["test_acc_values"]))
        assert (row["delta_vs_baseline"] is None) == (method == "scratch")
        for seed in (0, 1):
            run = out / "students" / "runs" / f"{method}_4shot_s{seed}"
            m = json.loads((run / "metrics.json").read_text())
            assert m["steps"] == summary["student_steps"] == 10, method  # one optimiser-step budget for every student
            assert m["latency"]["student"]["measured"] == "interleaved"
        assert (out / "students" / "runs" / f"{method}_4shot_s0" / "report.html").is_file()
    for row in summary["rows"]:
        assert 0.0 <= row["test_acc"] <= 1.0 and row["params"] > 0 and row["ms_b1"] > 0
    assert rows["teacher ensemble"]["speedup_b64"] == 1.0  # median of per-round ratios to itself
    assert (out / "export" / "student.onnx").is_file() and (out / "export" / "model_card.json").is_file()
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 3
    assert "| model | seeds | val acc | test acc | Δ test acc [95% CI] | test patient RR |" in printed
    assert f"run folder: {out}" in printed
    assert sorted(summary["ranking_by_test"]) == sorted(("scratch", "kd", "mt_kd", "mt_graft", "atf"))
    assert ("[demo] students by mean test accuracy over seeds [0, 1] (4 labelled images per class, "
            "10 optimiser steps each): ") in printed
