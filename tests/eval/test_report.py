"""report.html is self-contained: every image an embedded PNG, every plot present."""
from __future__ import annotations

import base64
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from graftkd.cli import main
from graftkd.eval.report import load_run, model_rows, write_report

from tests.eval.conftest import make_run

IMG_SRC = re.compile(r'<img[^>]*\ssrc="([^"]*)"')


def _images(html: str) -> list[bytes]:
    srcs = IMG_SRC.findall(html)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), srcs
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing external
    return [base64.b64decode(s.split(",", 1)[1]) for s in srcs]


def test_single_run_report_embeds_every_plot(tiny_run: Path) -> None:
    assert main(["report", str(tiny_run)]) == 0
    html = (tiny_run / "report.html").read_text()
    pngs = _images(html)
    assert len(pngs) == 5 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    saved = sorted(p.stem for p in (tiny_run / "plots").glob("*.png"))
    assert saved == ["confusion", "curves", "magnification", "models", "reliability"]
    assert sorted((tiny_run / "plots" / f"{n}.png").read_bytes() for n in saved) == sorted(pngs)
    for text in ("resnet32x4", "vgg13", "ensemble", "40X", "100X", "patient RR", "stage2", "accuracy versus latency"):
        assert text in html


def test_model_rows_pick_up_teachers_ensemble_and_latency(tiny_run: Path) -> None:
    rows = model_rows(load_run(tiny_run).metrics)
    assert [(r["role"], r["name"], r["latency"]["ms_b1"]) for r in rows] == [
        ("student", "resnet8", 1.5), ("teacher", "resnet32x4", 9.0), ("teacher", "vgg13", 5.0),
        ("ensemble", "ensemble", 14.5)]


def test_supervised_run_has_no_model_table(tmp_path: Path) -> None:
    run = make_run(tmp_path, "sup", distill=False)
    html = write_report([run]).read_text()
    assert len(_images(html)) == 4 and "Teachers, ensemble and student" not in html


def test_comparison_of_two_runs(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", distill=False)
    out = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    html = out.read_text()
    assert len(_images(html)) == 3  # val curves, test metrics, accuracy vs latency (run a only)
    assert html.count("<tr>") == 3 and ">a<" in html and ">b<" in html
    assert sorted(p.name for p in (tmp_path / "cmp_plots").iterdir()) == [
        "compare_curves.png", "compare_latency.png", "compare_metrics.png"]


def test_missing_metrics_is_a_user_error(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.json" in capsys.readouterr().err


def test_comparison_latency_plot_shows_teachers_ensemble_and_students_with_unclashing_tick_labels(tmp_path: Path) -> None:
    from graftkd.eval.report import comparison_model_rows, models_figure

    runs = [load_run(make_run(tmp_path, "a")), load_run(make_run(tmp_path, "b"))]
    rows = comparison_model_rows(runs)
    assert [(r["role"], r["name"]) for r in rows] == [
        ("student", "a"), ("teacher", "resnet32x4"), ("teacher", "vgg13"), ("ensemble", "ensemble"), ("student", "b")]
    # (1.35, 22.4) and (0.042, 0.049) crowd matplotlib's default log labels (2x10^0 3x10^0 4x10^0 ...)
    for lo, hi in ((1.35, 22.4), (0.042, 0.049), (31.0, 586.0), (0.05, 900.0)):
        for r, ms in zip(rows, (lo, hi, (lo + hi) / 2, hi, lo)):
            r["latency"] = {"ms_b1": ms}
        fig = models_figure(rows, "test")
        fig.canvas.draw()
        ax = fig.axes[0]
        labels = [t for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
                  if t.get_text() and t.get_visible() and lo / 1.6 <= t.get_position()[0] <= hi * 1.6]
        assert labels, (lo, hi)
        boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
        assert len(ax.collections) == 3  # one scatter per role: student, teacher, ensemble


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30), st.floats(0.01, 0.08))
def test_spread_labels_keeps_order_and_a_gap_and_stays_inside_when_they_fit(ys, gap):
    from graftkd.eval.report import spread_labels

    pos = spread_labels(ys, gap)
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [pos[i] for i in order]
    assert all(b - a >= gap - 1e-9 for a, b in zip(placed, placed[1:]))  # labels a line apart: no overlap
    if gap * (len(ys) - 1) <= 1.0:
        assert all(-1e-9 <= p <= 1.0 + 1e-9 for p in pos)
    else:
        assert placed[-1] <= max(1.0, gap * (len(ys) - 1)) + 1e-9
