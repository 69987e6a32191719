"""Write BENCHMARKS.md from the JSON figures in benchmarks/results/ (no number is typed by hand).

    python benchmarks/render_md.py
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load(name: str) -> Any | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def pct(mean: float, sd: float) -> str:
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def seeds_text(seeds: int | list[int]) -> str:
    return f"{seeds} seeds" if isinstance(seeds, int) else f"seeds {', '.join(map(str, seeds))}"


def context_line(ctx: dict[str, Any], keys: list[str]) -> str:
    return "; ".join(f"{k} {ctx[k]}" for k in keys if k in ctx)


def section_data(d: dict[str, Any]) -> str:
    return "\n".join([
        "## Data pipeline (issue 3)", "",
        f"Command: `{d['command']}`. {d['images']} PNGs of {d['source_size']}, augmented with "
        f"`{d['augment']}`; decode/augment on {d['data_threads']} thread (one DataLoader worker), training "
        f"on {d['train_threads']} threads; 1-minute load average during the run {d.get('load_avg_1m')}.", "",
        table(["measure", "images/s"], [
            ["decode + augment, no cache (`decode_img_s`)", d["decode_img_s"]],
            ["augment from the decoded cache (`cached_img_s`)", d["cached_img_s"]],
            [f"demo-sized student training, {d['train_model']} on {d['train_input']} (`train_img_s`)", d["train_img_s"]],
        ]),
        "",
        "Decoding is not the bottleneck when decode+augment (one worker) runs faster than the student "
        "consumes images; the decoded cache removes PNG decoding from every epoch after the first.",
    ])


def section_multi_teacher(d: dict[str, Any]) -> str:
    c = d["context"]
    return "\n".join([
        "## Cost of K teachers, live and cached (issue 4)", "",
        f"Command: `{c['command']}`. Student {c['student']}, teachers {', '.join(c['teachers'])}, "
        f"{c['train_images']} training images at {c['image_size']} px, batch {c['batch_size']}, "
        f"{c['threads']} thread(s), {c['views']} cached views, {c['repeats']} interleaved rounds (median of per-round ratios).", "",
        table(["variant", "seconds/epoch (ratio to the student alone)"], [
            ["student alone", f"{d['student_s_per_epoch']:.2f} s (1.00)"],
            ["KD, 1 teacher live", f"{d['ratio_live_k1']:.2f}"],
            ["KD, 2 teachers live", f"{d['ratio_live_k2']:.2f}"],
            ["KD, 4 teachers live", f"{d['ratio_live_k4']:.2f}"],
            ["KD, 4 teachers cached", f"{d['ratio_cached_k4']:.2f}"],
            ["cache build (once, 4 teachers)", f"{d['cache_build_s']:.1f} s"],
        ]),
        "", f"Target: cached K=4 within 1.15x of the student alone: "
            f"{'met' if d['ratio_cached_k4'] <= 1.15 else 'NOT met'} ({d['ratio_cached_k4']:.2f}x).",
    ])


def study_table(d: dict[str, Any]) -> str:
    """The rows of a ``graftkd compare`` JSON: mean ± sd, per seed, paired Δ to the baseline with its
    bootstrap 95% interval (image accuracy; patient recognition rate too when images are grouped)."""
    diffs = {(x["method"], x["shots"], x["metric"]): x for x in d["differences"]}
    grouped = any("test_patients" in r for r in d["rows"])
    head = ["method", "shots", "test accuracy %", "per seed", f"Δ vs {d['baseline']} [95% CI]"]
    head += ["patient RR %", "Δ patient RR [95% CI]"] if grouped else []
    head += ["steps"]

    def delta(r: dict[str, Any], metric: str) -> str:
        x = diffs.get((r["method"], r["shots"], metric))
        if x is None:
            return "(baseline)" if r["method"] == d["baseline"] else ""
        return f"{100 * x['mean']:+.1f} [{100 * x['ci95'][0]:+.1f}, {100 * x['ci95'][1]:+.1f}]"

    rows = []
    for r in d["rows"]:
        if r["mean"] is None:
            rows.append([r["method"], r["shots"], "all runs failed"] + [""] * (len(head) - 3))
            continue
        ref = r.get("reference")
        row = [r["method"] + (" (reference)" if ref else ""), r["shots"],
               f"{100 * r['mean']:.1f}" if ref else pct(r["mean"], r["sd"]),
               "" if ref else ", ".join(f"{100 * v:.1f}" for v in r["values"]), delta(r, "accuracy")]
        if grouped:
            p = r.get("patient_recognition_rate")
            row += ["" if p is None else (f"{100 * p['mean']:.1f}" if ref else pct(p["mean"], p["sd"])),
                    delta(r, "patient_recognition_rate")]
        row.append(r.get("steps", ""))
        rows.append(row)
    out = [table(head, rows)]
    if d.get("failures"):
        out += ["", "Failed runs (left out): " + "; ".join(f"{f['run']}: {f['error']}" for f in d["failures"]) + "."]
    return "\n".join(out)


def study_caption(d: dict[str, Any]) -> str:
    r0 = next(r for r in d["rows"] if not r.get("reference"))
    units = "test patients" if "test_patients" in r0 else "test images"
    return (f"Test accuracy (%) of the validation-selected student, mean ± sample sd over seeds "
            f"{', '.join(map(str, d['seeds']))}; every run {d['steps']} optimiser steps; Δ = paired difference to "
            f"{d['baseline']} with a bootstrap 95% interval over seeds and {units} "
            f"({r0.get('test_images')} test images" + (f", {r0['test_patients']} patients" if "test_patients" in r0 else "")
            + f"). Code revision `{d['revision'][:12]}`, {d['runs']} runs. Command: `{d['command']}`.")


def bar_checks(d: dict[str, Any], shots: int) -> list[str]:
    """Issue 12's bar on the digits rows at ``shots``, evaluated from the JSON."""
    r = {x["method"]: x for x in d["rows"] if x["shots"] == shots and not x.get("reference") and x["mean"] is not None}

    def check(text: str, ok: bool) -> str:
        return f"- {text}: {'met' if ok else 'NOT met'}"

    def gt_sd(a: str, b: str) -> bool:
        return r[a]["mean"] - r[b]["mean"] > max(r[a]["sd"], r[b]["sd"])

    need = ("scratch", "kd", "mt_kd", "graft_host", "graft_fused", "atf")
    if not all(m in r for m in need):
        return ["- not every method has results"]
    steps = {str(x["steps"]) for x in r.values()}
    return [check("graft_fused ≥ graft_host", r["graft_fused"]["mean"] >= r["graft_host"]["mean"]),
            check("graft_fused > mt_kd by more than one sd", gt_sd("graft_fused", "mt_kd")),
            check("mt_kd ≥ kd", r["mt_kd"]["mean"] >= r["kd"]["mean"]),
            check("kd > scratch by more than one sd", gt_sd("kd", "scratch")),
            check("atf ≥ kd", r["atf"]["mean"] >= r["kd"]["mean"]),
            check(f"every row has the same steps ({', '.join(sorted(steps))})", len(steps) == 1)]


def section_fewshot_digits(d: dict[str, Any]) -> str:
    return "\n".join([
        "## Few-shot distillation on real images: handwritten digits (issue 12)", "",
        "scikit-learn's 1,797 handwritten digits at 32 px (`benchmarks/digits_data.py`): fixed test set of 600 "
        "and validation set of 300 images, teachers resnet20 and resnet8x4 trained on the other 897; student "
        "resnet8 on N labelled images per class drawn with each seed. " + study_caption(d), "",
        study_table(d), "", "The bar of issue 12 at 5 shots (computed from these rows):", "",
        *bar_checks(d, 5),
    ])


def section_fewshot(d: Any) -> str:
    if isinstance(d, list):  # older layout: a list of rows
        d = {"rows": [{**r, "values": r.get("values", [])} for r in d], "differences": [], "baseline": "-",
             "seeds": list(range(d[0]["seeds"])) if isinstance(d[0]["seeds"], int) else d[0]["seeds"],
             "steps": "-", "revision": "-", "runs": "-", "command": d[0].get("command", "python benchmarks/fewshot.py")}
    sds = [r["sd"] for r in d["rows"] if not r.get("reference") and r.get("sd") is not None]
    return "\n".join([
        "## Few-shot distillation on synthetic histology (issue 12)", "",
        "Synthetic H&E-like histology, binary task, patient split fixed by split seed 0; patients have 2 to 10 "
        "images each, so the patient recognition rate (mean over patients of their image accuracy) differs from "
        "image accuracy. " + study_caption(d), "",
        study_table(d), "",
        f"Largest sd over seeds: {100 * max(sds):.1f} points (bar: every row ≤ 3)." if sds else "",
    ])


def section_atf(d: Any) -> str:
    if isinstance(d, list):  # older layout
        return "\n".join(["## Adaptive Teacher Finetune (older layout)", "",
                          table(["method", "test accuracy"], [[r["method"], pct(r["mean"], r["sd"])] for r in d])])
    parts = ["## Adaptive Teacher Finetune against offline, offline-joint and online (issue 12)", "",
             f"Command: `{d['command']}` (code revision `{d['revision'][:12]}`). One study per data set, sharing the "
             f"few-shot study's runs: `atf`, `offline_joint` and `online` are ATF's few-shot preset in those modes; "
             f"`kd` is offline KD (the same frozen teacher and student loss, ATF's `offline` mode); same student, "
             f"same step budget.", ""]
    for name, study in d["studies"].items():
        parts += [f"### {name}", "", study_caption(study), "", study_table(study), ""]
    return "\n".join(parts)


def section_latency(d: dict[str, Any]) -> str:
    p = d["profiles"]
    rows = [[name, f"{v['params']:,}", f"{v['macs'] / 1e6:.1f}", f"{v['size_bytes'] / 1e6:.2f}", v["ms_b1"], v["ms_b64"]]
            for name, v in p.items()]
    return "\n".join([
        "## Latency and size: teachers, ensemble, student (issue 7)", "",
        f"Command: `{d['command']}`. {d['image_size']} px, {d['num_classes']} classes, {d['threads']} threads, "
        f"median of {d['repeats']} timed runs after warm-up.", "",
        table(["network", "params", "MMACs", "size (MB)", "ms, batch 1", "ms, batch 64"], rows),
        "", f"Student speed-up over the 3-teacher ensemble: {d['speedup_b1']:.1f}x at batch 1, "
            f"{d['speedup_b64']:.1f}x at batch 64.",
    ])


def section_vs_torchdistill(d: dict[str, Any]) -> str:
    c = d["context"]
    return "\n".join([
        "## One KD epoch against torchdistill (issue 9)", "",
        f"Command: `{c['command']}`. {c['teacher']} -> {c['student']}, {c['num_classes']} classes, "
        f"{c['train_images']} CIFAR-shaped images, batch {c['batch_size']}, {c['threads']} thread(s) in both, same "
        f"augmentation; torchdistill {c['torchdistill']} and graftkd measured in one run, interleaved.", "",
        table(["variant", "images/s", "ratio to torchdistill"], [
            ["torchdistill (fp32, its documented vision setting)", d["torchdistill_img_s"], "1.00"],
            ["graftkd, fp32 (like for like)", d["graftkd_fp32_img_s"], f"{d['ratio_fp32']:.2f}"],
            [f"graftkd, {d['graftkd_best_settings']} (best settings)", d["graftkd_img_s"], f"{d['ratio_live']:.2f}"],
            ["graftkd with the soft-target cache", d["graftkd_cached_img_s"], f"{d['ratio_cached']:.2f}"],
        ]),
        "", f"Targets: graftkd live at least as fast ({'met' if d['ratio_live'] >= 1 else 'NOT met'}), cached at "
            f"least 2x ({'met' if d['ratio_cached'] >= 2 else 'NOT met'}).",
    ])


def section_inference(d: dict[str, Any]) -> str:
    rows = []
    for name, by_batch in d["img_s"].items():
        rows.append([name] + [f"{by_batch[b]['img_s']} ({by_batch[b]['speedup_vs_ensemble_fp32']}x)"
                              for b in sorted(by_batch)])
    batches = sorted(next(iter(d["img_s"].values())))
    ctx = d.get("context", {})
    return "\n".join([
        "## Inference: exported student (onnxruntime) vs PyTorch vs the teacher ensemble (issue 9)", "",
        f"Command: `{ctx.get('command', 'python benchmarks/inference_speed.py')}`. "
        + context_line(ctx, ["student", "teachers", "image_size", "threads"]), "",
        table(["network / runtime"] + [f"images/s, {b} (speed-up vs ensemble)" for b in batches], rows),
    ])


def section_demo(d: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [[r["model"], f(r["val_acc"], ".3f"), f(r["test_acc"], ".3f"), f(r["test_patient_rr"], ".3f"),
             f(r["params"], ","), f(r["ms_b1"], ".2f"), f(r["ms_b64"], ".1f")] for r in d["rows"]]
    return "\n".join([
        "## The demo (`make demo`)", "",
        f"Command: `{d['command']}` on the embedded synthetic histology: {d['seconds']:.0f} s wall on the 2 cores, "
        f"including data generation, 3 teachers, 5 students, latency profiling, ONNX export and the reports. "
        f"Students see 12 labelled images per class; best student on validation: {d['best_student']}.", "",
        table(["model", "val acc", "test acc", "test patient RR", "params", "CPU ms (b=1)", "CPU ms (b=64)"], rows),
        "", "One seed: read it as a demonstration of the pipeline, not as a comparison of methods (the tables "
            "below, with 3 seeds, are). Patient recognition rate equals image accuracy here because every "
            "synthetic patient has the same number of images; on BreakHis they differ.",
    ])


def section_graft_digits(d: dict[str, Any]) -> str:
    """Grafting design study (issue 12): validation accuracy per variant; also written into
    docs/methods/graft.md between its ``graft_digits`` markers."""
    rows = d["rows"]
    shots = sorted({r["shots"] for r in rows})
    variants: list[str] = []
    for r in sorted(rows, key=lambda r: r.get("order", 0)):
        if r["variant"] not in variants:
            variants.append(r["variant"])
    by = {(r["variant"], r["shots"]): r for r in rows}
    what = {r["variant"]: r.get("what", "") for r in rows}

    def cell(v: str, n: int) -> str:
        r = by.get((v, n))
        return "-" if r is None else f"{pct(r['mean'], r['sd'])} (n={len(r['values'])})"

    steps = sorted({s for r in rows for s in r["steps"]})
    return "\n".join([
        "## Grafting onto fused multi-teacher targets: design study on real digits (issue 12)", "",
        f"VALIDATION accuracy (%) of the validation-selected student, mean ± sd over seeds (n = seeds; the "
        f"seed also draws the shots); scikit-learn digits at 32 px, teachers resnet20 and resnet8x4, student "
        f"resnet8, {'/'.join(map(str, steps))} optimizer steps per run. Test accuracy was not read. "
        f"Command: `{d['command']}` (revision {d['revision'][:10]}).", "",
        table(["variant", "what"] + [f"{n} shots/class" for n in shots],
              [[f"`{v}`", what[v]] + [cell(v, n) for n in shots] for v in variants]),
    ])


def write_between_markers(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path} lacks the markers {start} ... {end}")
    head, rest = doc.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


SECTIONS: list[tuple[str, Callable[[Any], str]]] = [
    ("demo", section_demo),
    ("data_throughput", section_data),
    ("multi_teacher", section_multi_teacher),
    ("fewshot_digits", section_fewshot_digits),
    ("fewshot", section_fewshot),
    ("graft_digits", section_graft_digits),
    ("atf", section_atf),
    ("latency", section_latency),
    ("vs_torchdistill", section_vs_torchdistill),
    ("inference_speed", section_inference),
]


def main() -> None:
    parts = ["# Benchmarks", "",
             "Every figure below is read from `benchmarks/results/<name>.json`, written by the command given "
             "with it; this page is generated by `python benchmarks/render_md.py`. Machine: 2 CPU cores "
             "(AMD EPYC Zen 4), no GPU. Speed figures are ratios measured within one run; absolute times "
             "depend on the load of the machine at the time (recorded in each JSON).", ""]
    missing = []
    for name, render in SECTIONS:
        data = load(name)
        if data is None:
            missing.append(name)
            continue
        parts += [render(data), ""]
    if missing:
        parts += ["## Not measured", "", "No results yet for: " + ", ".join(missing) + ".", ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    study = load("graft_digits")
    if study is not None:  # the design study's table also lives in the method's page
        write_between_markers(ROOT / "docs" / "methods" / "graft.md", "graft_digits",
                              section_graft_digits(study).split("\n", 2)[2])


if __name__ == "__main__":
    main()
