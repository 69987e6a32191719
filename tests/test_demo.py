"""`graftkd demo --quick`: the whole pipeline end to end, small enough for the test suite."""
import json

from graftkd.cli import main


def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    models = [r["model"] for r in summary["rows"]]
    assert models[:4] == ["teacher resnet32", "teacher wrn_16_2", "teacher vgg8", "teacher ensemble"]
    for method in ("scratch", "kd", "mt_kd", "mt_graft", "atf"):
        assert f"student {method} (resnet8)" in models
        assert (out / f"student_{method}" / "report.html").is_file()
        steps = json.loads((out / f"student_{method}" / "metrics.json").read_text())["steps"]
        assert steps == summary["student_steps"] == 10, method  # one optimiser-step budget for every student
    for row in summary["rows"]:
        assert 0.0 <= row["test_acc"] <= 1.0 and row["params"] > 0 and row["ms_b1"] > 0
    assert (out / "export" / "student.onnx").is_file() and (out / "export" / "model_card.json").is_file()
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 3
    assert "| model | val acc | test acc | test patient RR |" in printed
    assert f"run folder: {out}" in printed
    assert sorted(summary["ranking_by_test"]) == sorted(("scratch", "kd", "mt_kd", "mt_graft", "atf"))
    assert "[demo] students by test accuracy (4 labelled images per class, 10 optimiser steps each): " in printed
