"""Write BENCHMARKS.md from the JSON figures in benchmarks/results/ (no number is typed by hand).

    python benchmarks/render_md.py
"""
from __future__ import annotations

import json
import statistics
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


def revision_text(d: dict[str, Any]) -> str:
    """`` (revision abcdef1234)`` when the results record the commit that made them, else nothing."""
    return f" (revision {d['revision'][:10]})" if d.get("revision") else ""


def seeds_text(seeds: int | list[int]) -> str:
    return f"{seeds} seeds" if isinstance(seeds, int) else f"seeds {', '.join(map(str, seeds))}"


def context_line(ctx: dict[str, Any], keys: list[str]) -> str:
    return "; ".join(f"{k} {ctx[k]}" for k in keys if k in ctx)


def section_data(d: dict[str, Any]) -> str:
    ok_pipe = d["pipeline_224_img_s"] >= d["train_224_img_s"]
    ok_cache = d["cached_224_img_s"] >= 3 * d["train_224_img_s"]
    return "\n".join([
        "## Data pipeline at training resolution (issues 3, 14)", "",
        f"Command: `{d['command']}` (revision {d['revision'][:10]}). {d['images']} PNGs of {d['source_size']}, "
        f"`{d['augment']}` augmentation (decode to uint8 with torchvision.io, resize to the {d['decode_base_side']} px "
        f"base image, v2 transforms on uint8, float only at the end); {d['workers']} DataLoader workers (one per core), "
        f"training {d['train_model']}, batch {d['batch']}, {d['train_threads']} threads. Medians of {d['rounds']} "
        f"interleaved rounds; ratios per round. 1-minute load average during the run: {d['load_avg_1m']} "
        f"(the machine was shared).", "",
        table(["measure", "images/s", "ratio to training"], [
            ["training on ready tensors (`train_224_img_s`)", d["train_224_img_s"], "1.00"],
            ["decode PNG + augment, all workers (`pipeline_224_img_s`)", d["pipeline_224_img_s"], d["pipeline_over_train"]],
            ["augment from the mmap decoded cache, all workers (`cached_224_img_s`)", d["cached_224_img_s"],
             d["cached_over_train"]],
            ["training fed by the PNG pipeline (workers and training share the cores)", d["fed_train_224_img_s"],
             d["fed_over_train"]],
            ["one worker, decode + augment (`pipeline_1w_img_s`)", d["pipeline_1w_img_s"], ""],
            ["one worker, from the decoded cache (`cached_1w_img_s`)", d["cached_1w_img_s"], ""],
        ]),
        "",
        f"Bar: pipeline >= training ({'met' if ok_pipe else 'NOT met'}), decoded cache >= 3x training "
        f"({'met' if ok_cache else 'NOT met'}). A GPU training at 2,000 images/s would need about "
        f"{d['gpu_2000_img_s_workers_from_cache']} such workers reading the decoded cache "
        f"({d['gpu_2000_img_s_workers_from_png']} decoding PNGs); see docs/data.md for what to do instead.",
    ])


def section_precision(d: dict[str, Any]) -> str:
    rows = []
    for r in d["rows"]:
        v = d["bf16_vs_fp32"][r["method"]]
        rows.append([r["method"], r["precision"], pct(r["test_acc"]["mean"], r["test_acc"]["sd"]),
                     ", ".join(f"{100 * x['test_acc']:.1f}" for x in r["per_seed"]),
                     f"{r['train_seconds']['mean']:.0f}",
                     f"{v['bf16_minus_fp32_test_pts']:+.2f}" if r["precision"] == "bf16" else "",
                     f"{v['time_ratio_fp32_over_bf16']:.2f}x" if r["precision"] == "bf16" else ""])
    steps = {x["steps"] for r in d["rows"] for x in r["per_seed"]}
    return "\n".join([
        "## bf16 autocast against fp32 on CPU (issue 14)", "",
        f"Command: `{d['command']}` (revision {d['revision'][:10]}). {d['benchmark']}, {d['test_images']} test images; "
        f"student {d['student']} ({d['epochs']} epochs = {', '.join(map(str, sorted(steps)))} optimiser steps, batch "
        f"{d['batch_size']}, {d['threads']} thread), KD from the digits {d['teacher']} teacher; the same seeds, steps "
        f"and hyper-parameters in both precisions; test accuracy of the validation-selected checkpoint. CPU "
        f"capability {d['cpu_capability']}, native bf16: {d['cpu_native_bf16']}. 1-minute load average "
        f"{min(d['load_avg_1m'])}-{max(d['load_avg_1m'])} (shared machine: the time ratio is the figure to read).", "",
        table(["method", "precision", "test accuracy (%)", "per seed", "train s (mean)", "bf16 - fp32 (pts)",
               "fp32 time / bf16 time"], rows),
        "", "Within 0.5 points: " + "; ".join(
            f"{m} {'yes' if v['within_0_5_pts'] else 'NO'} ({v['bf16_minus_fp32_test_pts']:+.2f}, sd of the paired "
            f"per-seed differences {v['paired_diff_sd_pts']:.2f}"
            + (f", 95% interval of the mean [{v['paired_diff_ci95_pts'][0]:+.2f}, {v['paired_diff_ci95_pts'][1]:+.2f}]"
               if v.get("paired_diff_ci95_pts") else "") + ")" for m, v in d["bf16_vs_fp32"].items())
        + (f". {d['reused_runs']} of the runs were re-used from an earlier invocation of the same settings "
           f"(the script re-uses finished runs)." if d.get("reused_runs") else "."),
    ])


def section_multi_teacher(d: dict[str, Any]) -> str:
    c = d["context"]
    return "\n".join([
        "## Cost of K teachers, live and cached (issue 4)", "",
        f"Command: `{c['command']}`{revision_text(c)}. Student {c['student']}, teachers {', '.join(c['teachers'])}, "
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
        row = [r["method"] + (" (reference)" if ref else ""), "all" if r["shots"] is None else r["shots"],
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
        "scikit-learn's 1,797 handwritten digits at 32 px (`benchmarks/digits_data.py`): fixed, class-stratified "
        "test and validation sets, teachers resnet20 and resnet8x4 trained on the rest; student resnet8 on N "
        "labelled images per class drawn with each seed. Methods in their presets (`benchmarks/studies/"
        "fewshot_digits.yaml`): kd from the best teacher on validation, mt_kd from the mean of both, grafting "
        "with NetGraft's batch rule (int(64 N/10)), every other method batch 16; atf adapts the best teacher's "
        "head. " + study_caption(d), "",
        study_table(d), "", "The bar of issue 12 at 5 shots (computed from these rows):", "",
        *bar_checks(d, 5),
    ])


def graft_verdicts(d: dict[str, Any]) -> list[str]:
    """Where grafting wins and where not, per shots setting, computed from the rows: each grafting row
    against the best non-grafting method (margin and both sds) and its paired Δ to the baseline."""
    diffs = {(x["method"], x["shots"]): x for x in d["differences"] if x["metric"] == "accuracy"}
    out = []
    for shots in sorted({r["shots"] for r in d["rows"] if not r.get("reference")}, key=lambda v: (v is None, v or 0)):
        r = {x["method"]: x for x in d["rows"]
             if x["shots"] == shots and x["mean"] is not None and not x.get("reference")}
        others = [m for m in r if not m.startswith("graft")]
        if not others:
            continue
        best = max(others, key=lambda m: r[m]["mean"])
        for g in (m for m in r if m.startswith("graft")):
            margin = r[g]["mean"] - r[best]["mean"]
            spread = max(r[g]["sd"], r[best]["sd"])
            verdict = ("wins" if margin > spread else "loses" if -margin > spread else "ties (within one sd)")
            x = diffs.get((g, shots))
            ci = (f"; vs {d['baseline']} {100 * x['mean']:+.1f} [{100 * x['ci95'][0]:+.1f}, {100 * x['ci95'][1]:+.1f}]"
                  if x else "")
            out.append(f"- {shots} shots: {g} {pct(r[g]['mean'], r[g]['sd'])} {verdict} against the best other method, "
                       f"{best} {pct(r[best]['mean'], r[best]['sd'])} ({100 * margin:+.1f} points{ci}).")
    steps = {str(x["steps"]) for x in d["rows"] if not x.get("reference")}
    out.append(f"- every row has the same steps ({', '.join(sorted(steps))}): {'yes' if len(steps) == 1 else 'NO'}.")
    return out


def section_fewshot_families(d: dict[str, Any]) -> str:
    return "\n".join([
        "## Few-shot distillation across network families (issue 22)", "",
        "scikit-learn's handwritten digits (`benchmarks/digits_data.py`) read at 64 px; timm teachers resnet10t "
        "and efficientnet_b0 trained here from random init on the whole train split; timm student "
        "mobilenetv3_small_100 (a third family) on N labelled images per class drawn with each seed "
        "(`benchmarks/studies/fewshot_families.yaml`). kd uses the best teacher on validation (resnet10t), mt_kd "
        "the mean of both; fitnet a regressor per teacher at the third shared boundary; mir mimics the best "
        "teacher's standardised pooled features (MobileNetV3's head is not pool -> Linear) and uses its "
        "classifier; fskd is kd followed by 1x1 alignment to the best teacher; grafting grafts the student's "
        "units (its stem included) into the best teacher it can (resnet10t; the stem boundary keeps a 1x1 "
        "junction, so the export is `graft:mobilenetv3_small_100`). Presets chosen on validation (next "
        "section): the shared recipe SGD lr 0.02 with a 16-step warm-up (scratch, kd, mt_kd, fitnet, fskd), "
        "MiR feat_weight 10 at lr 0.05 with the warm-up; grafting keeps NetGraft's Adam rates, untuned. The "
        "80-step budget is what the 2 shared cores afford for 80 runs; a student trained from scratch is far "
        "from converged there. " + study_caption(d), "",
        study_table(d), "", "Where grafting wins and where not (computed from these rows):", "",
        *graft_verdicts(d), "",
        "Grafting wins where the student is the host's family and the budget is 300 steps (\"Few-shot "
        "distillation on real images: handwritten digits\": graft_fused the best student there, resnet20 -> resnet8); across families at 80 steps, with "
        "NetGraft's untuned Adam rates and a student from random initialisation, it loses to every method, "
        "scratch included. MiR (standardised targets) and FitNet come within a few points of KD at 5 shots; "
        "multi-teacher KD is the best or tied-best row at both shot counts.",
    ])


def section_fewshot_families_tuning(d: dict[str, Any]) -> str:
    """The presets of the families study, chosen on validation: each candidate's validation accuracy."""
    rows = [r for r in d["rows"] if not r.get("reference")]
    lines = ["| candidate | shots | validation accuracy % | per seed | steps |", "|---|---|---|---|---|"]
    for r in rows:
        vals = r["val"]["values"]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {r['method']} | {r['shots']} | {pct(statistics.mean(vals), sd)} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in vals)} | {r['steps']} |")
    return "\n".join([
        "### Presets of the families study, chosen on validation (issue 22)", "",
        "`benchmarks/studies/tuning/fewshot_families.yaml`: the study's data, teachers and student on "
        f"seed {', '.join(map(str, d['seeds']))} (not a seed of the study), every run {d['steps']} optimiser steps; the score is the "
        "validation accuracy of the validation-selected student (test accuracy not read). Rows kd, mt_kd: SGD lr 0.05 "
        "without warm-up (the study's first preset); _W: the same with a linear warm-up over the first 16 steps; _L: "
        "lr 0.02 with that warm-up; mir_w_W: MiR (standardised targets) with feat_weight w. One seed only: L leads "
        "the others by 16 to 44 points, at or above the largest sd across seeds of one preset in the first "
        f"study (15 points); smaller gaps would not be decisive. Code revision "
        f"`{d['revision'][:12]}`. Command: `{d['command']}`.", "", *lines,
    ])


def section_fewshot(d: Any) -> str:
    if isinstance(d, list):  # older layout: a list of rows
        d = {"rows": [{**r, "values": r.get("values", [])} for r in d], "differences": [], "baseline": "-",
             "seeds": list(range(d[0]["seeds"])) if isinstance(d[0]["seeds"], int) else d[0]["seeds"],
             "steps": "-", "revision": "-", "runs": "-", "command": d[0].get("command", "python benchmarks/fewshot.py")}
    rows = [r for r in d["rows"] if not r.get("reference") and len(r.get("values") or []) > 5]
    note = ""
    if rows:  # the study ran 5 seeds first; its sd bar missed there
        first5 = max(rows, key=lambda r: statistics.stdev(r["values"][:5]))
        note = (f"{len(first5['values'])} seeds. The study first ran seeds 0-4 only; there the largest sd was "
                f"{100 * statistics.stdev(first5['values'][:5]):.2f} points ({first5['method']}), above the bar "
                f"of 3, and an sd estimated from 5 seeds is itself uncertain by about a third, so seeds 5-"
                f"{len(first5['values']) - 1} were added for every method. The per-seed columns show all of them.")
    return section_fewshot_at(d, "## Few-shot distillation on synthetic histology (issue 12)", note)


def section_fewshot_10shot(d: Any) -> str:
    rows = [r for r in d["rows"] if not r.get("reference") and r.get("sd") is not None]
    scratch = next(r for r in rows if r["method"] == "scratch")
    distilled = max(r["sd"] for r in rows if r is not scratch)
    note = (f"The same study at 10 labelled images per class (20 in all, `benchmarks/results/fewshot_10shot.json`): "
            f"the largest sd of a distilled student is {100 * distilled:.1f} points, but the student trained from "
            f"scratch on 20 images has sd {100 * scratch['sd']:.1f} (worst seed {100 * min(scratch['values']):.1f}%); "
            f"that is why the study above uses 25 shots.")
    return section_fewshot_at(d, "### The same study at 10 shots per class", note)


def section_fewshot_at(d: dict[str, Any], heading: str, note: str) -> str:
    sds = [r["sd"] for r in d["rows"] if not r.get("reference") and r.get("sd") is not None]
    syn = d.get("config", {}).get("data", {}).get("synthetic") or {}
    patients = (f"{syn['patients']} patients with {syn.get('images_per_patient')} to "
                f"{syn.get('images_per_patient_max')} images each" if syn.get("patients") else "synthetic patients")
    return "\n".join([
        heading, "", *([note, ""] if note else []),
        f"Synthetic H&E-like histology (`benchmarks/studies/fewshot_histology.yaml`), binary task, {patients}, "
        "patient split fixed by split seed 0, teachers resnet20 and resnet32 trained on "
        "the whole train split; the patient recognition rate (mean over patients of their image accuracy) "
        "differs from image accuracy. Same method presets as on digits, except that grafting matches the fused "
        "target with T^2 KL on this binary task (docs/methods/graft.md). " + study_caption(d), "",
        study_table(d), "",
        f"Largest sd over seeds: {100 * max(sds):.1f} points (bar: every row ≤ 3)." if sds else "",
    ])


def section_atf(d: Any) -> str:
    if isinstance(d, list):  # older layout
        return "\n".join(["## Adaptive Teacher Finetune (older layout)", "",
                          table(["method", "test accuracy"], [[r["method"], pct(r["mean"], r["sd"])] for r in d])])
    parts = ["## Adaptive Teacher Finetune against offline, offline-joint and online (issue 12)", "",
             f"One study per data set (each with its command and code revision below), sharing the "
             f"few-shot study's runs: `atf`, `offline_joint` and `online` are ATF's few-shot preset in those modes; "
             f"`kd` is offline KD (the same frozen teacher and student loss, ATF's `offline` mode); same student, "
             f"same step budget.", ""]
    for name, study in d["studies"].items():
        parts += [f"### {name}", "", study_caption(study), "", study_table(study), ""]
    return "\n".join(parts)


def paired_validation_table(study: dict[str, Any]) -> str:
    """Validation accuracy per method of a compare JSON, with per-seed differences to its baseline
    (the runs share the seed's shots, batches and initial student, so the difference is paired)."""
    rows = [r for r in study["rows"] if len(r.get("val", {}).get("values", [])) == len(r.get("seeds", [])) > 1]
    base = next(r for r in rows if r["method"] == study["baseline"])
    out = []
    for r in rows:
        v = r["val"]["values"]
        d = [100 * (a - b) for a, b in zip(v, base["val"]["values"])]
        delta = "baseline" if r is base else f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f} " \
                                             f"({sum(x > 0 for x in d)} up, {sum(x < 0 for x in d)} down)"
        out.append([f"`{r['method']}`", pct(statistics.mean(v), statistics.stdev(v)),
                    ", ".join(f"{100 * x:.1f}" for x in v), delta, r["steps"]])
    return table(["variant", "validation accuracy % (mean ± sd)", "per seed", "paired Δ to kd (pts, mean ± sd)",
                  "steps"], out)


def section_atf_tuning_paired(d: dict[str, Any]) -> str:
    parts = ["## ATF with few labels: paired validation check of the preset (issue 12)", "",
             "VALIDATION accuracy of the validation-selected student (test accuracy is in the JSON but was not "
             "used to choose). Each study shares the few-shot study's folder, data, teachers, seeds and step "
             "budget; every run of one seed starts from the same student weights, so `atf_offline` (ATF with a "
             "frozen teacher) is `kd` exactly and each Δ measures the teacher's adaptation alone. "
             f"Command: `{d['command']}` (revision {d['revision'][:10]}).", ""]
    for name, study in d["studies"].items():
        parts += [f"### {name}", "", f"{study['study']}: shots {', '.join(map(str, study['shots']))}, seeds "
                  f"{', '.join(map(str, study['seeds']))} (code {study['code'][:10]}).", "",
                  paired_validation_table(study), ""]
    return "\n".join(parts)


def section_atf_full(d: dict[str, Any], heading: str = "ATF with full labels: its own setting (issue 23)",
                     bar: bool = True) -> str:
    """Issue 23: ATF in its own setting (full labels); with ``bar``, the bar kd vs atf (defaults) checked."""
    parts = [f"## {heading}", "",
             "Every training image labelled; `atf` is the method's class defaults (`method: {name: atf}`), "
             "`atf_offline`, `atf_offline_joint` and `atf_online` its comparison modes at those defaults; `kd`, "
             "`kd_ls` (kd with logit standardisation) and `dkd` at theirs. Same student initialisation per seed, "
             "same step budget.", ""]
    for name, study in d["studies"].items():
        parts += [f"### {name}", "", study_caption(study), "", study_table(study), ""]
        rows = {r["method"]: r for r in study["rows"] if r.get("mean") is not None}
        if bar and "kd" in rows and "atf" in rows:
            kd, atf = rows["kd"], rows["atf"]
            ok = (len(kd["values"]) == len(atf["values"]) == 5 and kd["steps"] == atf["steps"]
                  and atf["mean"] >= kd["mean"] - 0.01)
            parts += [f"Bar (atf mean ≥ kd mean − 1 point, 5 seeds each, equal steps): "
                      f"{100 * atf['mean']:.1f} vs {100 * kd['mean']:.1f} − 1 → **{'met' if ok else 'not met'}**.", ""]
    return "\n".join(parts)


def section_atf_full_histology(d: dict[str, Any]) -> str:
    return section_atf_full(d, "ATF with full labels: synthetic histology (issue 23)", bar=False)


def section_atf_full_200steps(d: dict[str, Any]) -> str:
    return section_atf_full(d, "ATF with full labels: the earlier 200-step measurement (issue 23)", bar=False)


def section_atf_full_tuning(d: dict[str, Any]) -> str:
    parts = ["## ATF with full labels: validation study of the defaults (issue 23)", "",
             "VALIDATION accuracy of the validation-selected student (test accuracy was not used to choose), "
             "paired with `kd` on the same seeds, data and student initialisation. "
             f"Command: `{d['command']}` (revision {d['revision'][:10]}).", ""]
    for name, study in d["studies"].items():
        parts += [f"### {name}", "", f"{study['study']}: seeds {', '.join(map(str, study['seeds']))}, "
                  f"{study['steps']} steps (code {study['code'][:10]}).", "", paired_validation_table(study), ""]
    return "\n".join(parts)


def section_latency(d: dict[str, Any]) -> str:
    rows = [[name, f"{100 * v['val_acc']:.2f}", f"{100 * v['test_acc']:.2f}", f"{v['params']:,}", f"{v['macs'] / 1e6:.1f}",
             f"{v['size_bytes'] / 1e6:.2f}", v["ms_b1"], v["ms_b64"]] for name, v in d["networks"].items()]
    ok = d["speedup_b1"] >= 10 and d["speedup_b64"] >= 10 and d["accuracy_gap_pts"] <= 1
    return "\n".join([
        "## Deployment: distilled student against the three-teacher ensemble (issues 7, 14)", "",
        f"Command: `{d['command']}` (revision {d['revision'][:10]}). Synthetic histology, binary, "
        f"{d['patients']} patients x 4 magnifications x {d['images_per_patient']} images ({d['source_size']} px, "
        f"trained and served at {d['image_size']} px), split by patient: {d['train_images']} train, "
        f"{d['val_images']} validation, {d['test_images']} test images ({d['test_patients']} test patients). Teachers "
        f"trained on the full training split ({d['teacher_epochs']} epochs); students distilled from their "
        f"mean-fused soft targets (soft-target cache, 8 views; {' and '.join(map(str, d['student_epochs']))} epochs), "
        f"each checkpoint and the deployed one ({d['student']}) selected on validation. Latency: "
        f"{d['runtime']}, {d['threads']} thread(s), median of {d['rounds']} interleaved rounds of {d['repeats']} "
        f"runs; speed-ups are per-round ratios. 1-minute load average {min(d['load_avg_1m'])}-"
        f"{max(d['load_avg_1m'])}. The ensemble is the three teachers run together (mean of their softmax). The "
        f"teachers are the demo's ({', '.join(d['teachers'])}): they train on 2 shared cores within a session, which "
        f"the earlier random-weight set (resnet32x4, wrn_40_2, vgg13 at 64 px) does not.", "",
        table(["network", "val acc (%)", "test acc (%)", "params", "MMACs", "size (MB)", "ms, batch 1",
               "ms, batch 64"], rows),
        "", f"Student speed-up over the ensemble: {d['speedup_b1']:.1f}x at batch 1, {d['speedup_b64']:.1f}x at "
            f"batch 64; test accuracy gap (ensemble - student): {d['accuracy_gap_pts']:.2f} points. Bar (>= 10x at "
            f"both batch sizes, gap <= 1 point): {'met' if ok else 'NOT met'}.",
    ])


def section_vs_torchdistill(d: dict[str, Any]) -> str:
    c = d["context"]
    return "\n".join([
        "## One KD epoch against torchdistill (issue 9)", "",
        f"Command: `{c['command']}`{revision_text(c)}. {c['teacher']} -> {c['student']}, {c['num_classes']} classes, "
        f"{c['train_images']} CIFAR-shaped images, batch {c['batch_size']}, {c['threads']} thread(s) in both, same "
        f"augmentation; torchdistill {c['torchdistill']} and graftkd measured in one run, interleaved.", "",
        table(["variant", "images/s", "ratio to torchdistill"], [
            ["torchdistill (fp32, its documented vision setting)", d["torchdistill_img_s"], "1.00"],
            ["graftkd, fp32 (like for like)", d["graftkd_fp32_img_s"], f"{d['ratio_fp32']:.2f}"],
            [f"graftkd, {d['graftkd_best_settings']} (best settings)", d["graftkd_img_s"], f"{d['ratio_live']:.2f}"],
            ["graftkd with the soft-target cache", d["graftkd_cached_img_s"], f"{d['ratio_cached']:.2f}"],
        ]),
        "", f"Targets: graftkd live at least as fast, like for like in fp32 "
            f"({'met' if d['ratio_fp32'] >= 1 else 'NOT met'}: {d['ratio_fp32']:.2f}x; with its best settings "
            f"{d['ratio_live']:.2f}x), cached at least 2x ({'met' if d['ratio_cached'] >= 2 else 'NOT met'}). "
            "Each ratio is the median of per-round ratios"
            + (" (fp32 per round: " + ", ".join(f"{g / t:.2f}" for g, t in zip(c["img_s_per_round"]["gk_fp32"],
                                                                                c["img_s_per_round"]["td_fp32"]))
               + f"; 1-minute load average {c['load_average_1min']['min']:.1f} to {c['load_average_1min']['max']:.1f} "
                 "on the 2 cores)" if "gk_fp32" in c.get("img_s_per_round", {}) else "") + ".",
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
        f"Command: `{ctx.get('command', 'python benchmarks/inference_speed.py')}`{revision_text(ctx)}. "
        + context_line(ctx, ["student", "teachers", "image_size", "threads"]), "",
        table(["network / runtime"] + [f"images/s, {b} (speed-up vs ensemble)" for b in batches], rows),
    ])


def section_demo(d: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def acc(r: dict[str, Any], key: str) -> str:
        sd = r.get(f"{key}_sd")
        return f(r[key], ".3f") + (f" ± {sd:.3f}" if sd is not None else "")

    def delta(r: dict[str, Any]) -> str:
        x = r.get("delta_vs_baseline")
        if x is None:
            return "baseline" if "seeds" in r else "-"
        return f"{100 * x['mean']:+.1f} [{100 * x['ci95'][0]:+.1f}, {100 * x['ci95'][1]:+.1f}]"

    rows = [[r["model"], str(len(r["seeds"])) if "seeds" in r else "-", f(r["val_acc"], ".3f"), acc(r, "test_acc"),
             delta(r), acc(r, "test_patient_rr"), f(r["params"], ","), f(r["ms_b1"], ".2f"), f(r["ms_b64"], ".1f"),
             "-" if r.get("speedup_b64") is None else f"{r['speedup_b64']:.1f}x"] for r in d["rows"]]
    seeds = d.get("student_seeds") or [0]
    students = [r for r in d["rows"] if "seeds" in r]
    load = d.get("load_average_1min")
    return "\n".join([
        "## The demo (`make demo`)", "",
        f"Command: `{d['command']}`{revision_text(d)} on the embedded synthetic histology: {d['seconds']:.0f} s wall on the 2 cores"
        + (f" (1-minute load average {load['min']:.1f} to {load['max']:.1f} while it ran: the machine was shared)" if load else "")
        + f", including data generation, 3 teachers, {len(students)} students x {len(seeds)} seeds "
        f"(a `graftkd compare` study, {d.get('jobs', 1)} runs at once), latency profiling, ONNX export and the reports. "
        f"Students see 12 labelled images per class; best student on validation (mean over seeds): {d['best_student']}.", "",
        table(["model", "seeds", "val acc", "test acc (mean ± sd)", "Δ test acc vs scratch [95% CI]", "test patient RR",
               "params", "CPU ms (b=1)", "CPU ms (b=64)", "speed-up vs ensemble (b=64)"], rows),
        *(["", "Students by mean test accuracy: " + " > ".join(d["ranking_by_test"])
            + (f" ({d['student_steps']} optimiser steps each)." if d.get("student_steps") else ".")]
          if d.get("ranking_by_test") else []),
        "", f"{len(seeds)} seeds: the Δ column is the paired difference to the scratch student with a bootstrap 95% "
            "interval over seeds and test patients; the few-shot studies below, with 5 to 10 seeds, rank the methods. "
            "Latency: every network measured interleaved (rotating order within each round, median over rounds); "
            "speed-up = median of per-round ratios to the ensemble. The figures are the demo's own `summary.json`, "
            "kept with the command and revision by `benchmarks/demo.py`.",
    ])


def section_study_overhead(d: dict[str, Any]) -> str:
    def line(e: dict[str, Any], label: str) -> list[Any]:
        load = e.get("load_average_1min") or {}
        return [label, e["revision"][:10], e["runs"], e["jobs"], e["train_seconds"], e["wall_seconds"], f"{e['ratio']:.2f}",
                f"{load['min']:.1f} to {load['max']:.1f}" if load.get("min") is not None else "-"]

    rows = ([line(d["before"], "before (a process per run, every run re-scores teachers)")] if d.get("before") else [])
    rows.append(line(d, "after (warm forked workers, per-study score memo)"))
    return "\n".join([
        "## What a study costs beyond its training (issue 25)", "",
        f"Command: `{d['command']}`. A `graftkd compare` study of {d['runs']} runs on the real digits (4 methods x 5 "
        f"seeds, {d['steps']} optimiser steps, 1 thread each), nothing reused; ratio = wall x jobs / the sum of "
        "the runs' `train_seconds`. The machine was shared (the 1-minute load average on its 2 cores is given): "
        "the seconds are long, the ratios are what compares."
        + (f" The before measurement (a {d['before']['runs']}-run subset of the same study: `{d['before']['command']}`) "
           "ran at the same time, on the revision before issue 25." if d.get("before") else ""), "",
        table(["", "revision", "runs", "jobs", "training s (sum)", "wall s", "ratio", "1-min load"], rows),
        "", f"Bar: ratio <= 1.25 ({'met' if d['ratio'] <= 1.25 else 'NOT met'}: {d['ratio']:.2f}).",
    ])


def section_graft_digits(d: dict[str, Any]) -> str:
    """Grafting design study (issue 12): validation accuracy per variant; also written into
    docs/methods/graft.md between its ``graft_digits`` markers."""
    return section_graft_study(d, "real digits", "scikit-learn digits at 32 px, teachers resnet20 and resnet8x4")


def section_graft_histology(d: dict[str, Any]) -> str:
    return section_graft_study(d, "synthetic histology", "synthetic histology (binary; the study "
                                                          "benchmarks/studies/fewshot_histology.yaml), teachers "
                                                          "resnet20 and resnet32")


def section_graft_study(d: dict[str, Any], where: str, setting: str) -> str:
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
        f"## Grafting onto fused multi-teacher targets: design study on {where} (issue 12)", "",
        f"VALIDATION accuracy (%) of the validation-selected student, mean ± sd over seeds (n = seeds; the "
        f"seed also draws the shots); {setting}, student "
        f"resnet8, {'/'.join(map(str, steps))} optimizer steps per run. Test accuracy was not read. "
        f"Command: `{d['command']}` (revision {d['revision'][:10]}).", "",
        table(["variant", "what"] + [f"{n} shots/class" for n in shots],
              [[f"`{v}`", what[v]] + [cell(v, n) for n in shots] for v in variants]),
    ])


def section_atf_tuning(d: dict[str, Any]) -> str:
    """ATF few-labels design study (issue 12): validation accuracy per variant; also written into
    docs/methods/atf.md between its ``atf_tuning`` markers."""
    rows = sorted(d["rows"], key=lambda r: (r["bench"], r["order"]))
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in sorted(rows, key=lambda r: r["order"])))
    by = {(r["bench"], r["variant"]): r for r in rows}
    what = {r["variant"]: r["what"] for r in rows}

    def cell(b: str, v: str) -> str:
        r = by.get((b, v))
        if r is None:
            return "-"
        n = len(r["values"])
        if r["mean"] is None:
            return f"diverged ({r['diverged']}/{n})"
        text = f"{pct(r['mean'], r['sd'] or 0.0)}"
        if r["diverged"]:
            text += f", {r['diverged']}/{n} diverged"
        teacher = [t for t in r.get("teacher_val_after", []) if t is not None]
        if teacher:
            text += f" (teacher {100 * min(teacher):.0f}-{100 * max(teacher):.0f})"
        return text

    steps = sorted({s for r in rows for s in r["steps"]})
    return "\n".join([
        "## ATF with few labels: design study (issue 12)", "",
        f"VALIDATION accuracy (%) of the validation-selected student, mean ± sd over seeds "
        f"{', '.join(map(str, rows[0]['seeds']))} (the seed also draws the shots); in brackets the adapted "
        f"teacher's validation accuracy at the selected checkpoint (min-max over seeds). digits: 5 shots per "
        f"class, resnet20 teacher (98.3% val), resnet8 student, batch 25; synthetic: the histology study's data "
        f"(240 synthetic patients, patient split), its resnet20 teacher (89.7% val), 10 shots per class, batch 16. "
        f"Optimizer steps per run: {'/'.join(map(str, steps))}. Test accuracy was not read. "
        "Commands: " + ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", d["command"]) for r in rows))
        + f" (revision {d['revision'][:10]}; a finished run is reused).", "",
        table(["variant", "what"] + benches, [[f"`{v}`", what[v]] + [cell(b, v) for b in benches] for v in variants]),
    ])


def section_stain_speed(d: dict[str, Any]) -> str:
    b = d["budget"]
    return "\n".join([
        "## Stain jitter speed at 224 px (issue 24)", "",
        f"Command: `{d['command']}`{revision_text(d)}. {d['threads']} thread, in-process, {d['images']} "
        f"{d['image']}; medians of {d['rounds']} rounds; 1-minute load average {d['load_avg_1m']} (shared machine). "
        f"The budget is the data pipeline section above (`{b['source']}`, revision {b['revision'][:10]}): the "
        f"resnet18 student trains at {b['train_224_img_s']} images/s on this CPU, one worker augments from the "
        f"decoded cache at {b['cached_1w_img_s']} images/s.", "",
        table(["measure", "images/s (1 thread)"], [
            ["`histology` augmentation (crop, flips, rot90, colour jitter, normalise)", d["histology_img_s"]],
            ["`histology_stain` (the same + HED jitter)", d["histology_stain_img_s"]],
            ["HED jitter alone (224 px)", d["hed_jitter_alone_img_s"]],
            ["`hed_jitter` on a batch of 32 (per image)", d["hed_jitter_batch32_img_s"]],
        ]), "",
        f"HED jitter costs {d['hed_jitter_ms_per_image']} ms per 224 px image; the stain preset costs "
        f"{d['stain_preset_cost_ratio']}x the `histology` preset, and one thread running it still augments "
        f"{d['histology_stain_over_train']}x faster than the student trains: within the budget.",
    ])


def _rows(d: dict[str, Any], shots: Any = None) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in d["rows"] if r["shots"] == shots and r.get("mean") is not None}


def section_stain(d: dict[str, Any]) -> str:
    r = _rows(d)
    variants = [v for v in ("none", "jitter", "macenko", "both") if f"teacher_{v}" in r]
    steps = {str(x["steps"]) for x in r.values() if not x.get("reference")}
    per_row = {len(x["values"]) for x in r.values() if not x.get("reference")}

    def cell(name: str, metric: str) -> str:
        x = r.get(name)
        if x is None:
            return "-"
        m = x if metric == "acc" else x.get("patient_recognition_rate")
        return pct(m["mean"], m["sd"]) if m else "-"

    summary = table(["variant", "teacher (resnet20) accuracy %", "teacher patient RR %", "KD student (resnet8) "
                     "accuracy %", "KD student patient RR %"],
                    [[v, cell(f"teacher_{v}", "acc"), cell(f"teacher_{v}", "prr"), cell(f"kd_{v}", "acc"),
                      cell(f"kd_{v}", "prr")] for v in variants])
    syn = d.get("config", {}).get("data", {}).get("synthetic", {})
    return "\n".join([
        "## Stain variation: an unseen centre (issue 24)", "",
        f"Synthetic H&E from {syn.get('centres')} centres, each with its own stain vectors and intensity "
        f"(`benchmarks/studies/stain_centres.yaml`, {syn.get('patients')} patients): train and validate on "
        "centres 0 and 1, test on centre 2, which no run sees before its test. Variants: `none` (the "
        "`histology` preset), `jitter` (`histology_stain`: HED jitter, scale 0.05 and shift 0.05, Tellez et "
        "al.'s light setting), `macenko` (Macenko normalisation fitted to 16 training images, applied at "
        "decode), `both`. Each variant trains a resnet20 teacher on the whole training split"
        + (" and a resnet8 KD student of that variant's seed-0 teacher" if any(f"kd_{v}" in r for v in variants) else
           "; the study's resnet8 KD students of each variant's seed-0 teacher were not run (the session's shared "
           "CPU did not leave the time), so their columns are empty")
        + ". Mean ± sd over seeds on the unseen centre:", "",
        summary, "",
        f"Checks: {len(variants)} variants; every row has {', '.join(map(str, sorted(per_row)))} per-seed values; "
        f"every run {', '.join(sorted(steps))} optimiser steps.", "",
        "All rows, paired differences to `teacher_none` (bootstrap over seeds and test patients). "
        + study_caption(d), "",
        study_table(d),
    ] + ([section_stain_macenko(load("stain_macenko"))] if load("stain_macenko") else []))


def section_stain_macenko(d: dict[str, Any]) -> str:
    t, cp, auc, ref = d["tissue"], d["colour_probe"], d["h_max_auc"], d["reference"]
    rows = [[v, f"{100 * cp[v]['class_val_acc']:.1f}", f"{100 * cp[v]['class_unseen_centre_acc']:.1f}",
             f"{100 * cp[v]['centre_val_acc']:.1f}"] for v in ("none", "macenko")]
    per_centre = ", ".join(f"{v:.2f} (centre {k.split('_')[1]})" for k, v in auc.items() if k.startswith("centre_"))
    return "\n".join([
        "### Why Macenko scores lower than none on the unseen centre", "",
        "No training (`python benchmarks/stain_macenko.py`, results/stain_macenko.json): the study's images decoded "
        "as its runs decode them, as is and Macenko-normalised with the runs' reference. "
        f"The reference was fitted on {ref['images']} training images only "
        f"({'checked' if ref['fitted_on_training_images_only'] else 'NOT only training images'}; centres "
        f"{', '.join(d['centres']['train'])}). A logistic regression on 9 colour statistics per image (mean, 90th "
        "and 99th percentile optical density of R, G, B), fitted on the training split:", "",
        table(["images", "class, validation %", "class, unseen centre %", "which training centre, validation %"],
              rows), "",
        f"- Colour alone carries most of this generator's class signal: {100 * cp['none']['class_unseen_centre_acc']:.1f}% "
        "on the unseen centre from 9 numbers. The per-image 99th percentile of the haematoxylin concentration, "
        f"which Macenko rescales to the reference's value in every image, separates benign from malignant with "
        f"ROC AUC {per_centre} within each training centre ({auc['all_training']:.2f} pooled: the centres' "
        "intensities blur it). The generator makes carcinoma nuclei darker (`hyper` 1.10-1.15 against 0.90-1.00) "
        "and more numerous.",
        f"- Normalisation does remove the centre: the training centres are told apart from colour "
        f"{100 * cp['none']['centre_val_acc']:.0f}% of the time as is, {100 * cp['macenko']['centre_val_acc']:.0f}% "
        "after (chance 50%). With that it removes the intensity cue, and the colour-only classifier loses "
        f"{100 * (cp['none']['class_unseen_centre_acc'] - cp['macenko']['class_unseen_centre_acc']):.1f} points "
        "on the unseen centre, as the networks do.",
        f"- Macenko's tissue threshold (optical density >= 0.15 in every channel) keeps "
        f"{100 * t['train']['pixel_share']:.0f}% of a training image's {t['base_pixels']} pixels and "
        f"{100 * t['test']['pixel_share']:.0f}% of an unseen-centre image's (a paler centre); "
        f"{100 * t['test']['images_left_unnormalised']:.1f}% of the unseen centre's images (training "
        f"{100 * t['train']['images_left_unnormalised']:.1f}%) have fewer than {t['min_tissue_pixels']} such pixels "
        "and are left as they are.",
        "", "So the lower score is not a fitting bug: the synthetic task puts much of its class signal in stain "
        "intensity, which per-image normalisation removes by design" + revision_text(d) + ".",
    ])


#: each method's own teacher target among a study's reference rows (how close it gets to its teachers)
UNLABELED_TARGETS = {"kd": "teacher_resnet20", "mt_kd": "ensemble_mean", "graft_fused": "ensemble_accuracy"}


def _paired(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Mean ± sd over seeds of b - a, paired by seed, in points."""
    va, vb = dict(zip(a["seeds"], a["values"])), dict(zip(b["seeds"], b["values"]))
    diffs = [vb[k] - va[k] for k in va if k in vb]
    if not diffs:
        return "-"
    mean = sum(diffs) / len(diffs)
    sd = (sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else 0.0
    return f"{100 * mean:+.1f} ± {100 * sd:.1f}"


def _budget_text(probe: dict[str, Any] | None) -> str:
    if not probe:
        return ""
    parts = []
    for name, points in probe["val_curves"].items():
        marks = [p for p in points if p[0] in (100, 200, 300, probe["steps"])]
        parts.append(f"`{name}` " + ", ".join(f"{100 * v:.0f}% at {s}" for s, v in marks))
    return (f"The budget was chosen on validation curves of a longer probe ({probe['steps']} steps, "
            f"`{probe['command']}`, revision {probe['revision'][:10]}): " + "; ".join(parts) + ".")


def section_fewshot_unlabeled_study(dataset: str, d: dict[str, Any]) -> list[str]:
    cfg = d.get("config", {})
    ub = cfg.get("data", {}).get("unlabeled_batch_size", "?")
    teachers = ", ".join(t["name"] for t in cfg.get("teachers", []))
    out = [f"### {'Real digits' if dataset == 'digits' else 'Synthetic histology'} "
           f"(`benchmarks/studies/{cfg.get('name', '?')}.yaml`)", "",
           f"Teachers {teachers} trained on the whole training split, student {cfg.get('student', {}).get('name')} "
           f"on N labelled images per class; each method with and without `data.unlabeled: train_rest` (every "
           f"step adds {ub} unlabelled images to the labelled batch; CE on the labelled ones only). "
           f"{d['steps']} optimiser steps per run, {seeds_text(d['seeds'])}"
           + (" (fewer than the issue's 5: the shared CPU's time ran out)" if len(d["seeds"]) < 5 else "") + ". "
           + _budget_text(d.get("budget_probe")), ""]
    for shots in d["shots"]:
        r = _rows(d, shots)
        refs = {name: x for name, x in r.items() if x.get("reference")}
        rows = []
        for m, target in UNLABELED_TARGETS.items():
            a, b = r.get(m), r.get(f"{m}_unlabeled")
            if a is None or b is None:
                continue
            t = refs.get(target)
            gap = (lambda x: f"{100 * (t['mean'] - x['mean']):.1f}") if t else (lambda x: "-")
            rows.append([m, f"{target} {100 * t['mean']:.1f}" if t else "-", pct(a["mean"], a["sd"]),
                         pct(b["mean"], b["sd"]), _paired(a, b), gap(a), gap(b),
                         "/".join(map(str, sorted(set(b.get("unlabeled_images") or [])))) or "-"])
        head = ["method", "its teacher(s), test %", "labelled only %", "+ unlabelled rest %",
                "Δ (paired by seed)", "gap to its teacher(s)", "gap with unlabelled", "unlabelled images"]
        ref_text = ", ".join(f"{name} {100 * x['mean']:.1f}%" for name, x in refs.items())
        out += [f"{shots} labelled images per class (teachers and ensembles on the same test images: {ref_text}):",
                "", table(head, rows), ""]
    out += ["All rows. " + study_caption(d), "", study_table(d), ""]
    return out


def section_fewshot_unlabeled(d: dict[str, Any]) -> str:
    if "studies" not in d:  # an older single-study file
        d = {"studies": {"digits": d}}
    out = ["## The unlabelled rest of the training split as a transfer set (issue 24)", "",
           "How close a few-label student gets to its teachers when the teachers also teach on the training "
           "split's unlabelled images. The gap is the test accuracy of the method's own teacher target (kd: "
           "the best teacher; mt_kd: the mean-fused ensemble; graft_fused: the accuracy-weighted ensemble) "
           "minus the student's mean: smaller is closer.", ""]
    for dataset, study in d["studies"].items():
        out += section_fewshot_unlabeled_study(dataset, study)
    return "\n".join(out)


def section_defaults_all_methods(d: dict[str, Any]) -> str:
    """Every registered method at its defaults on full-label digits (issue 23 item 2)."""
    st = d["setting"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in d["rows"]:
        by.setdefault(r["method"], []).append(r)

    def acc(rows: list[dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> str:
        v = [get(r) for r in rows]
        return f"{pct(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)} (min {100 * min(v):.1f})"

    out, lowest = [], []
    for name, rows in by.items():
        roles = sorted({k for r in rows for k in r["adapted"]})
        adapted = "; ".join(f"{k}: train {acc(rows, lambda r, k=k: r['adapted'][k]['train_acc'])}, "
                            f"val {acc(rows, lambda r, k=k: r['adapted'][k]['val_acc'])}" for k in roles) or "-"
        lowest += [v for r in rows for v in (r["student"]["train_acc"], r["student"]["val_acc"],
                                             *(a[s] for a in r["adapted"].values() for s in ("train_acc", "val_acc")))]
        out.append([name, f"`{json.dumps(rows[0]['config'])}`", acc(rows, lambda r: r["student"]["train_acc"]),
                    acc(rows, lambda r: r["student"]["val_acc"]), adapted,
                    sum(len(r["non_finite_losses"]) for r in rows), sum(len(r["stopped_teachers"]) for r in rows),
                    f"{statistics.mean(r['cpu_seconds'] for r in rows):.1f}"])
    required = "; ".join(f"{k}: {v['why']}" for k, v in st["required"].items()) or "none"
    return "\n".join([
        "## Every method at its defaults, full labels (issue 23)", "",
        f"Command: `{d['command']}`{revision_text(d)}. Each registered method with `method: {{name: X}}` and "
        f"nothing else for the method, on {st['data']} at {st['size']} px (augment {st['augment']}), student "
        f"{st['student']}, the same supervised {st['teacher']['arch']} teacher ({st['teacher']['steps']} steps, "
        f"validation accuracy {100 * st['teacher']['val_acc']:.1f}%), {st['steps']} optimiser steps at batch "
        f"{st['batch']}, {seeds_text(d['seeds'])}. Accuracy of the final weights on the training and validation "
        f"splits, mean ± sd over seeds (and the lowest seed), for the student and every network the method adapts "
        f"and saves beside it; chance is {100 * st['chance']:.0f}%. Inputs a method has no default for: {required}. "
        "The CI version (16 px, 200 steps, seed 0) is tests/methods/test_defaults_all_methods.py."
        + (f" Revision: {d['revision_note']}." if d.get("revision_note") else ""), "",
        table(["method", "config", "student train %", "student val %", "adapted networks %", "non-finite losses",
               "teachers stopped", "CPU s per run"], out), "",
        f"Lowest accuracy of any network on any split and seed: {100 * min(lowest):.1f}% "
        f"({'no collapse' if min(lowest) > 0.5 else 'a COLLAPSE'}; chance {100 * st['chance']:.0f}%).",
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
    ("study_overhead", section_study_overhead),
    ("precision", section_precision),
    ("data_throughput", section_data),
    ("multi_teacher", section_multi_teacher),
    ("fewshot_digits", section_fewshot_digits),
    ("fewshot", section_fewshot),
    ("fewshot_10shot", section_fewshot_10shot),
    ("graft_digits", section_graft_digits),
    ("graft_histology", section_graft_histology),
    ("atf", section_atf),
    ("atf_tuning", section_atf_tuning),
    ("atf_tuning_paired", section_atf_tuning_paired),
    ("atf_full_tuning", section_atf_full_tuning),
    ("atf_full", section_atf_full),
    ("atf_full_histology", section_atf_full_histology),
    ("atf_full_200steps", section_atf_full_200steps),
    ("defaults_all_methods", section_defaults_all_methods),
    ("latency", section_latency),
    ("vs_torchdistill", section_vs_torchdistill),
    ("inference_speed", section_inference),
    ("stain_speed", section_stain_speed),
    ("stain", section_stain),
    ("fewshot_unlabeled", section_fewshot_unlabeled),
    ("fewshot_families", section_fewshot_families),
    ("fewshot_families_tuning", section_fewshot_families_tuning),
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
    tuning = load("atf_tuning")
    if tuning is not None:  # the ATF design study's table also lives in the method's page
        write_between_markers(ROOT / "docs" / "methods" / "atf.md", "atf_tuning",
                              section_atf_tuning(tuning).split("\n", 2)[2])
    for name in ("atf_full", "atf_full_histology"):  # issue 23's full-label tables also live in ATF's page
        data = load(name)
        if data is not None:
            write_between_markers(ROOT / "docs" / "methods" / "atf.md", name, "\n\n".join(
                f"{study_caption(study)}\n\n{study_table(study)}" for study in data["studies"].values()))
    for name, render in (("graft_digits", section_graft_digits), ("graft_histology", section_graft_histology)):
        study = load(name)
        if study is not None:  # the design study's tables also live in the method's page
            write_between_markers(ROOT / "docs" / "methods" / "graft.md", name, render(study).split("\n", 2)[2])


if __name__ == "__main__":
    main()
