"""Self-contained HTML report of a run (or a side-by-side comparison of runs).

Every figure is drawn with matplotlib's Agg canvas (no pyplot state), embedded as a base64 PNG
and also saved under ``plots/``. Inputs are the run folder's ``config.yaml``, ``log.csv`` and
``metrics.json``; entries ``teachers`` / ``ensemble`` / other ``{val, test}`` models and
``latency`` (from ``graftkd evaluate --latency``) are shown when present.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from matplotlib.figure import Figure

from graftkd.files import atomic_write_bytes, atomic_write_text, read_log
from graftkd.errors import UserError

SPLITS = ("val", "test")
PNG_META = {"Software": None}


@dataclass
class RunData:
    """What a report needs from one run folder."""

    path: Path
    config: dict[str, Any]
    log: list[dict[str, Any]]
    metrics: dict[str, Any]
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.path.name


def load_run(path: str | Path) -> RunData:
    """Read config.yaml, log.csv (optional) and metrics.json of a run folder."""
    path = Path(path)
    if not (path / "metrics.json").is_file():
        raise UserError(f"{path} has no metrics.json (is it a finished run folder?)")
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'metrics.json'}: not valid JSON ({e.msg} at line {e.lineno})") from None
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    log = read_log(path / "log.csv")
    return RunData(path, config or {}, log, metrics)


# ------------------------------------------------------------------------------------ models
def model_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Student, each teacher, the ensemble and any other ``{val, test}`` entry, with latency if known
    (``latency = {"student": {...}, "teachers": [{...} in teacher order], "ensemble": {...}}``)."""
    lat = metrics.get("latency", {}) if isinstance(metrics.get("latency"), dict) else {}
    rows = [{"role": "student", "name": metrics.get("student", "student"), "val": metrics.get("val"),
             "test": metrics.get("test"), "latency": lat.get("student")}]
    teacher_lat = lat.get("teachers") or []
    for k, t in enumerate(metrics.get("teachers", []) or []):
        rows.append({"role": "teacher", "name": t.get("name", f"teacher {k}"), "val": t.get("val"), "test": t.get("test"),
                     "latency": t.get("latency") or (teacher_lat[k] if k < len(teacher_lat) else None)})
    skip = {"val", "test", "teachers", "latency", "data", "selection"}
    for key, value in metrics.items():
        if key in skip:
            continue
        if isinstance(value, dict) and (isinstance(value.get("test"), dict) or isinstance(value.get("val"), dict)):
            rows.append({"role": key, "name": key, "val": value.get("val"), "test": value.get("test"),
                         "latency": value.get("latency") or lat.get(key)})
        elif isinstance(value, list):  # e.g. DML peers: [{name, val, test}]
            rows += [{"role": key, "name": v.get("name", f"{key} {k}"), "val": v.get("val"), "test": v.get("test"),
                      "latency": v.get("latency")} for k, v in enumerate(value)
                     if isinstance(v, dict) and (isinstance(v.get("test"), dict) or isinstance(v.get("val"), dict))]
    return rows


def _get(d: dict[str, Any] | None, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _main_split(metrics: dict[str, Any]) -> str | None:
    return next((s for s in ("test", "val") if isinstance(metrics.get(s), dict)), None)


# ------------------------------------------------------------------------------------- plots
def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata=PNG_META)
    return buf.getvalue()


def _phase_marks(ax: Any, log: list[dict[str, Any]]) -> None:
    for prev, row in zip(log, log[1:]):
        if row.get("phase") != prev.get("phase"):
            ax.axvline(row["global_epoch"] - 0.5, color="0.6", ls="--", lw=0.8)


def plot_curves(log: list[dict[str, Any]]) -> bytes:
    """Loss terms, validation metrics and learning rate per epoch; dashed lines at phase changes."""
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    x = [r.get("global_epoch", i) for i, r in enumerate(log)]
    terms = [k for k in dict.fromkeys(k for r in log for k in r) if k.startswith("train_")]
    for k in terms:
        axes[0].plot(x, [r.get(k, float("nan")) for r in log], marker=".", label=k.removeprefix("train_"))
    axes[0].set_title("training loss terms")
    for k, style in (("val_acc", "-"), ("val_loss", ":")):
        if any(k in r for r in log):
            axes[1].plot(x, [r.get(k, float("nan")) for r in log], style, marker=".", label=k)
    axes[1].set_title("validation")
    axes[2].plot(x, [r.get("lr", float("nan")) for r in log], marker=".", color="tab:purple")
    axes[2].set_title("learning rate")
    phases = list(dict.fromkeys(r.get("phase") for r in log))
    for ax in axes:
        _phase_marks(ax, log)
        ax.set_xlabel("epoch (all phases)")
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        if ax.lines:
            ax.legend(fontsize=7)
    if len(phases) > 1:
        fig.suptitle("phases: " + " | ".join(map(str, phases)), fontsize=8)
    return _png(fig)


def plot_confusion(split_metrics: dict[str, dict[str, Any]]) -> bytes:
    """Confusion matrices (counts and row-normalised shading) of each split."""
    fig = Figure(figsize=(5 * len(split_metrics), 4.2))
    axes = fig.subplots(1, len(split_metrics), squeeze=False)[0]
    for ax, (split, m) in zip(axes, split_metrics.items()):
        cm = m["confusion_matrix"]
        classes = m.get("classes") or [str(i) for i in range(len(cm))]
        norm = [[v / max(sum(row), 1) for v in row] for row in cm]
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if norm[i][j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{split} (n={m['n']})")
    return _png(fig)


def plot_reliability(split_metrics: dict[str, dict[str, Any]]) -> bytes:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with bin counts."""
    fig = Figure(figsize=(5 * len(split_metrics), 4))
    axes = fig.subplots(1, len(split_metrics), squeeze=False)[0]
    for ax, (split, m) in zip(axes, split_metrics.items()):
        rel = m["reliability"]
        edges = rel["edges"]
        width = edges[1] - edges[0]
        acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", color="tab:blue", alpha=0.7,
               label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="tab:red", label="perfect calibration")
        for lo, c in zip(edges[:-1], rel["count"]):
            if c:
                ax.text(lo + width / 2, 0.02, str(c), ha="center", fontsize=6, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{split}: ECE {m['ece']:.3f}")
        ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def plot_magnification(m: dict[str, Any], split: str) -> bytes:
    """Image accuracy and patient recognition rate per magnification (with patient-bootstrap CIs)."""
    mags = list(m["by_magnification"])
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    width = 0.38
    for k, (key, label) in enumerate((("accuracy", "image accuracy"), ("patient_recognition_rate", "patient RR"))):
        vals = [m["by_magnification"][g].get(key) for g in mags]
        cis = [m["by_magnification"][g].get(f"{key}_ci95") for g in mags]
        xs = [i + (k - 0.5) * width for i in range(len(mags))]
        ys = [v if v is not None else 0.0 for v in vals]
        err = [[y - (c[0] if c else y) for y, c in zip(ys, cis)], [(c[1] if c else y) - y for y, c in zip(ys, cis)]]
        ax.bar(xs, ys, width=width, yerr=err, capsize=3, label=label)
    ax.set_xticks(range(len(mags)), [f"{g}X" for g in mags])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(split)
    ax.set_title(f"{split} by magnification (95% CI, patients resampled)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def spread_labels(ys: Sequence[float], gap: float, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """Label heights as close as can be to ``ys`` but at least ``gap`` apart, within [lo, hi] when they
    fit (the order of ``ys`` is kept): labels placed there never overlap."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    pos = [min(max(ys[i], lo), hi) for i in order]
    for k in range(1, len(pos)):
        pos[k] = max(pos[k], pos[k - 1] + gap)
    if pos and pos[-1] > hi:  # pushed past the top: push down from there
        pos[-1] = max(hi, lo + gap * (len(pos) - 1))
        for k in range(len(pos) - 2, -1, -1):
            pos[k] = min(pos[k], pos[k + 1] - gap)
    out = [0.0] * len(ys)
    for i, p in zip(order, pos):
        out[i] = p
    return out


def _accuracy_axis(ax: Any, values: list[tuple[float, float, float]], label: str) -> None:
    """Fit the accuracy axis to (value, ci low, ci high) triples, with a margin, inside [0, 1]."""
    lo = min(v[1] for v in values)
    hi = max(v[2] for v in values)
    pad = max(0.01, 0.08 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi + pad <= 1.0 else 1.0 + pad / 4)
    ax.set_ylabel(f"{label} (axis fitted to the data; bars: 95% CI)")


def _acc_ci(m: dict[str, Any] | None, key: str = "accuracy") -> tuple[float, float, float]:
    v = m[key]
    ci = m.get(f"{key}_ci95") or [v, v]
    return float(v), float(min(ci[0], v)), float(max(ci[1], v))


def models_figure(rows: list[dict[str, Any]], split: str) -> Figure:
    """Accuracy (with its 95% interval, on an axis fitted to the data) versus CPU latency (batch 1)
    of teachers, ensemble and students; dots with intervals per model if no latency is known. Labels
    sit in a column right of the plot, at least one line apart, joined to their point: they never
    overlap. The log axis is labelled at 1, 2 and 5 x 10^k only, in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colors = {"student": "tab:green", "teacher": "tab:blue", "ensemble": "tab:red"}
    timed = [r for r in rows if _get(r["latency"], "ms_b1") is not None and _get(r[split], "accuracy") is not None]
    scored = timed or [r for r in rows if _get(r[split], "accuracy") is not None]
    fig = Figure(figsize=(8.5 if timed else max(6.0, 0.9 * len(scored) + 2.5), max(4.0, 0.24 * len(scored) + 1.6)))
    ax = fig.subplots()
    accs = [_acc_ci(r[split]) for r in scored]
    _accuracy_axis(ax, accs, f"{split} image accuracy")
    if timed:
        xs = [r["latency"]["ms_b1"] for r in timed]
        for role in dict.fromkeys(r["role"] for r in timed):
            idx = [i for i, r in enumerate(timed) if r["role"] == role]
            ax.errorbar([xs[i] for i in idx], [accs[i][0] for i in idx],
                        yerr=[[accs[i][0] - accs[i][1] for i in idx], [accs[i][2] - accs[i][0] for i in idx]],
                        fmt="o", ms=7, capsize=3, zorder=3, color=colors.get(role, "tab:gray"), label=role)
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)  # spans > 2.5x: at least one labelled tick
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("CPU latency at batch 1 (ms, log scale, measured interleaved)")
        ax.set_title(f"{split} accuracy versus latency")
        ax.legend(fontsize=8, loc="best")
        lo, hi = ax.get_ylim()
        frac = [(a[0] - lo) / (hi - lo) for a in accs]
        height_pt = fig.get_figheight() * 72 * 0.77
        for r, x, y, f, pos in zip(timed, xs, [a[0] for a in accs], frac, spread_labels(frac, 11.0 / height_pt)):
            ax.annotate(str(r["name"]), (x, y), xycoords="data", xytext=(1.03, pos), textcoords="axes fraction",
                        fontsize=8, va="center", annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6, "shrinkA": 0, "shrinkB": 4})
    else:
        for i, (r, a) in enumerate(zip(scored, accs)):
            ax.errorbar([i], [a[0]], yerr=[[a[0] - a[1]], [a[2] - a[0]]], fmt="o", ms=7, capsize=4,
                        color=colors.get(r["role"], "tab:gray"))
        ax.set_xticks(range(len(scored)), [r["name"] for r in scored], rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(scored) - 0.4)
        ax.set_title(f"{split} accuracy (no latency recorded: `graftkd evaluate RUN --latency`)")
    ax.grid(alpha=0.3)
    return fig


def plot_models(rows: list[dict[str, Any]], split: str) -> bytes:
    return _png(models_figure(rows, split))


def comparison_model_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Every run's student (named after the run) and, once each, the teachers and ensembles they used."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for r in runs:
        rows = model_rows(r.metrics)
        out.append({**rows[0], "name": r.name})
        for row in rows[1:]:
            key = (row["role"], row["name"])
            if row["role"] in ("teacher", "ensemble") and key not in seen:
                seen.add(key)
                out.append(row)
    return out


def run_plots(run: RunData) -> dict[str, bytes]:
    """Every figure of a single-run report, by file stem."""
    m = run.metrics
    splits = {s: m[s] for s in SPLITS if isinstance(m.get(s), dict) and "confusion_matrix" in m[s]}
    main = _main_split(m)
    plots: dict[str, bytes] = {}
    if run.log:
        plots["curves"] = plot_curves(run.log)
    if splits:
        plots["confusion"] = plot_confusion(splits)
        plots["reliability"] = plot_reliability(splits)
    if main and m[main].get("by_magnification"):
        plots["magnification"] = plot_magnification(m[main], main)
    rows = model_rows(m)
    if main and len(rows) > 1:
        plots["models"] = plot_models(rows, main)
    return plots


def compare_plots(runs: Sequence[RunData]) -> dict[str, bytes]:
    """Validation curves overlaid, and test metrics side by side (plus accuracy vs latency)."""
    plots: dict[str, bytes] = {}
    if any(r.log for r in runs):
        fig = Figure(figsize=(7, 3.8))
        ax = fig.subplots()
        for r in runs:
            pts = [(row.get("global_epoch", i), row["val_acc"]) for i, row in enumerate(r.log) if "val_acc" in row]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=r.name)
        ax.set_xlabel("epoch (all phases)")
        ax.set_ylabel("val accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots["compare_curves"] = _png(fig)
    keys = [("accuracy", "image accuracy"), ("patient_recognition_rate", "patient RR")]
    fig = Figure(figsize=(max(6, 1.0 * len(runs) + 3), 4.0))
    ax = fig.subplots()
    points: list[tuple[float, float, float]] = []
    for k, (key, label) in enumerate(keys):
        xs, vals = [], []
        for i, r in enumerate(runs):
            m = r.metrics.get(_main_split(r.metrics) or "test")
            if _get(m, key) is not None:
                xs.append(i + (k - 0.5) * 0.25)
                vals.append(_acc_ci(m, key))
        if vals:
            ax.errorbar(xs, [v[0] for v in vals], yerr=[[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]],
                        fmt="o", ms=6, capsize=3, label=label)
            points += vals
    ax.set_xticks(range(len(runs)), [r.name for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    if points:
        _accuracy_axis(ax, points, "test metric")
    ax.set_title("test metrics by run (95% CI: test images or patients resampled)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    plots["compare_metrics"] = _png(fig)
    timed = [row for row in comparison_model_rows(runs) if _get(row["latency"], "ms_b1") is not None]
    if timed:
        plots["compare_latency"] = plot_models(timed, "test" if all(row["test"] for row in timed) else "val")
    return plots


# -------------------------------------------------------------------------------------- html
CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:8px 0}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}.muted{color:#777;font-size:12px}"""


def _fmt(v: Any, ci: list[float] | None = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        s = f"{v:.4f}"
        return s + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


METRIC_COLUMNS = [("n", "n"), ("accuracy", "accuracy [95% CI]"), ("balanced_accuracy", "balanced acc"),
                  ("macro_f1", "macro F1"), ("roc_auc", "ROC AUC"), ("ece", "ECE"), ("loss", "NLL"),
                  ("n_patients", "patients"), ("patient_recognition_rate", "patient RR [95% CI]"),
                  ("patient_accuracy_majority", "patient acc (vote)"),
                  ("patient_accuracy_mean_prob", "patient acc (mean prob)")]


def _metric_cells(m: dict[str, Any] | None) -> list[str]:
    return [_fmt(_get(m, k), _get(m, f"{k}_ci95")) for k, _ in METRIC_COLUMNS]


def _config_summary(run: RunData) -> str:
    c, m = run.config, run.metrics
    data, model, method = c.get("data", {}), c.get("model", {}), c.get("method", {})
    items = [("method", method.get("name", m.get("method"))), ("student", model.get("name", m.get("student"))),
             ("teachers", ", ".join(t.get("name", "?") for t in c.get("teachers", [])) or "-"),
             ("data", f"{data.get('source')} / {data.get('task')} / magnification {data.get('magnification')}"),
             ("image size", data.get("image_size")), ("shots per class", data.get("shots")),
             ("epochs", _get(c.get("trainer"), "epochs")),
             ("optimizer", f"{_get(c.get('optimizer'), 'name')} lr={_get(c.get('optimizer'), 'lr')}"),
             ("seed", c.get("seed")), ("selected", json.dumps(m.get("selection"))),
             ("checkpoint", m.get("checkpoint")), ("train seconds", m.get("train_seconds"))]
    return _table(["setting", "value"], [[html.escape(k), _fmt(v)] for k, v in items])


def render_run(run: RunData, plots: dict[str, bytes]) -> str:
    """The single-run report as one HTML string."""
    m = run.metrics
    main = _main_split(m)
    parts = [f"<h1>graftkd report: {html.escape(run.name)}</h1>",
             f'<p class="muted">{html.escape(str(run.path))}</p>', "<h2>Configuration</h2>", _config_summary(run)]
    if run.config:
        parts.append(f"<details><summary>resolved config.yaml</summary><pre>"
                     f"{html.escape(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>")
    parts.append("<h2>Metrics</h2>")
    parts.append(_table(["split"] + [h for _, h in METRIC_COLUMNS],
                        [[s] + _metric_cells(m[s]) for s in SPLITS if isinstance(m.get(s), dict)]))
    if main and m[main].get("per_class"):
        parts.append(f"<p>Per class ({main}):</p>")
        parts.append(_table(["class", "precision", "recall", "F1", "support"],
                            [[html.escape(c), _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), _fmt(v["support"])]
                             for c, v in m[main]["per_class"].items()]))
    if "curves" in plots:
        spans: dict[str, list[int]] = {}
        for i, r in enumerate(run.log):
            spans.setdefault(str(r.get("phase")), []).append(int(r.get("global_epoch", i)))
        phases = ", ".join(f"{html.escape(p)} (epochs {min(e)}-{max(e)})" for p, e in spans.items())
        parts += ["<h2>Training curves</h2>", f'<p class="muted">phases: {phases}; dashed lines mark phase changes</p>',
                  _img(plots["curves"], "training curves")]
    if "confusion" in plots:
        parts += ["<h2>Confusion matrix</h2>", _img(plots["confusion"], "confusion matrix")]
    if "reliability" in plots:
        parts += ["<h2>Calibration</h2>", _img(plots["reliability"], "reliability diagram")]
    if "magnification" in plots:
        by = m[main]["by_magnification"]
        parts += ["<h2>By magnification</h2>",
                  _table(["magnification"] + [h for _, h in METRIC_COLUMNS], [[f"{g}X"] + _metric_cells(v) for g, v in by.items()]),
                  _img(plots["magnification"], "per-magnification metrics")]
    rows = model_rows(m)
    if len(rows) > 1 or rows[0]["latency"]:
        parts.append("<h2>Teachers, ensemble and student</h2>")
        header = ["model", "role", "val acc", "test acc", "test patient RR", "params", "MMACs", "size MB",
                  "ms @ b1", "ms @ b64", "speed-up vs ensemble @ b64"]
        body = []
        for r in rows:
            lat = r["latency"] or {}
            body.append([html.escape(str(r["name"])), html.escape(r["role"]), _fmt(_get(r["val"], "accuracy")),
                         _fmt(_get(r["test"], "accuracy")), _fmt(_get(r["test"], "patient_recognition_rate")),
                         _fmt(lat.get("params")), _fmt(lat["macs"] / 1e6 if "macs" in lat else None),
                         _fmt(lat["size_bytes"] / 1e6 if "size_bytes" in lat else None),
                         _fmt(lat.get("ms_b1")), _fmt(lat.get("ms_b64")),
                         f"{lat['speedup_b64']:.1f}x" if lat.get("speedup_b64") is not None else "-"])
        parts.append(_table(header, body))
        if any((r["latency"] or {}).get("measured") == "interleaved" for r in rows):
            parts.append('<p class="muted">Latency: the networks measured interleaved (rotating order within '
                         'each round, median over rounds); a speed-up is the median of per-round ratios.</p>')
        if "models" in plots:
            parts.append(_img(plots["models"], "accuracy versus latency"))
    return _page(f"graftkd report: {run.name}", parts)


def render_comparison(runs: Sequence[RunData], plots: dict[str, bytes]) -> str:
    """Side-by-side table of several runs plus comparison plots, as one HTML string."""
    header = ["run", "method", "student", "split"] + [h for _, h in METRIC_COLUMNS] + ["params", "ms @ b1"]
    rows = []
    for r in runs:
        split = _main_split(r.metrics) or "test"
        lat = model_rows(r.metrics)[0]["latency"] or {}
        rows.append([html.escape(r.name), _fmt(r.metrics.get("method")), _fmt(r.metrics.get("student")), split]
                    + _metric_cells(r.metrics.get(split)) + [_fmt(lat.get("params")), _fmt(lat.get("ms_b1"))])
    parts = [f"<h1>graftkd comparison of {len(runs)} runs</h1>", "<h2>Runs</h2>", _table(header, rows)]
    titles = {"compare_curves": "Validation accuracy", "compare_metrics": "Test metrics",
              "compare_latency": "Accuracy versus latency"}
    for key, png in plots.items():
        parts += [f"<h2>{titles[key]}</h2>", _img(png, titles[key])]
    return _page("graftkd comparison", parts)


def _page(title: str, parts: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _save_plots(plots: dict[str, bytes], folder: Path) -> None:
    for name, png in plots.items():
        atomic_write_bytes(folder / f"{name}.png", png)


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """One run: ``RUN/report.html`` (+ ``RUN/plots/*.png``). Several: a comparison page at ``out``
    (default ``compare.html``) with its plots in ``<out stem>_plots/``. Returns the HTML path."""
    if not run_dirs:
        raise UserError("report: give at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    if len(runs) == 1:
        run = runs[0]
        plots = run_plots(run)
        _save_plots(plots, run.path / "plots")
        return atomic_write_text(Path(out) if out else run.path / "report.html", render_run(run, plots))
    target = Path(out) if out else Path("compare.html")
    plots = compare_plots(runs)
    _save_plots(plots, target.with_name(f"{target.stem}_plots"))
    return atomic_write_text(target, render_comparison(runs, plots))
