"""``graftkd demo``: the whole product on the embedded synthetic histology (or a real BreaKHis_v1).

Generates the data, trains three teachers of different architectures, then distils a small student
with KD, multi-teacher KD, multi-teacher grafting and ATF from a few labelled images per class (plus
the same student from scratch) as a ``graftkd compare`` study over several seeds (mean ± sd, paired
differences to scratch with bootstrap intervals), evaluates at image and patient level, profiles
latency (all networks interleaved), exports the best student (selected on validation) to ONNX,
writes a comparison report and prints a summary table.
"""
from __future__ import annotations

import os
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

import graftkd.methods  # noqa: F401  registers every method and its config section
from graftkd.config import ExperimentConfig, deep_merge, validate_config
from graftkd.errors import UserError


def load_demo_spec(quick: bool) -> dict[str, Any]:
    spec = yaml.safe_load(resources.files("graftkd").joinpath("configs/demo.yaml").read_text())
    q = spec.pop("quick")
    if quick:
        spec["base"] = deep_merge(spec["base"], q["base"])
        for key in ("student_shots", "student_steps", "student_seeds", "jobs"):
            spec[key] = q.get(key, spec[key])
        spec["students"] = deep_merge(spec["students"], q.get("students", {}))
    return spec


def stage_config(spec: dict[str, Any], section: dict[str, Any], name: str, out: Path,
                 data_root: str | None) -> ExperimentConfig:
    raw = deep_merge(spec["base"], section)
    raw["name"] = name
    raw["output"] = {**raw.get("output", {}), "dir": str(out), "name": name}
    if data_root is not None:
        raw["data"]["source"] = "breakhis"
        raw["data"]["root"] = data_root
    else:
        raw["data"]["root"] = str(out / "data" / "synthetic")
    return validate_config(raw, f"demo stage '{name}'")


def _teacher_entries(choice: str, teachers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    names = list(teachers) if choice == "all" else [max(teachers, key=lambda n: teachers[n]["val_acc"])]
    return [{"name": teachers[n]["arch"], "checkpoint": teachers[n]["model"]} for n in names]


def _row(name: str, metrics: dict[str, Any], latency: dict[str, Any] | None) -> dict[str, Any]:
    test = metrics["test"]
    return {"model": name, "val_acc": metrics["val"]["accuracy"], "test_acc": test["accuracy"],
            "test_patient_rr": test.get("patient_recognition_rate"),
            "params": (latency or {}).get("params"), "ms_b1": (latency or {}).get("ms_b1"),
            "ms_b64": (latency or {}).get("ms_b64"), "speedup_b64": (latency or {}).get("speedup_b64")}


def _student_row(name: str, row: dict[str, Any], diff: dict[str, Any] | None, val: list[float],
                 latency: dict[str, Any]) -> dict[str, Any]:
    """A student method over seeds: mean ± sd of its runs, its paired difference to the baseline."""
    prr = row.get("patient_recognition_rate") or {}
    return {"model": name, "seeds": row["seeds"], "val_acc": statistics.fmean(val),
            "val_acc_values": val, "test_acc": row["mean"], "test_acc_sd": row["sd"], "test_acc_values": row["values"],
            "test_patient_rr": prr.get("mean"), "test_patient_rr_sd": prr.get("sd"),
            "delta_vs_baseline": None if diff is None else {k: diff[k] for k in ("baseline", "mean", "ci95", "unit")},
            "params": latency.get("params"), "ms_b1": latency.get("ms_b1"), "ms_b64": latency.get("ms_b64"),
            "speedup_b64": latency.get("speedup_b64")}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Teachers, ensemble and students; a student's accuracies are mean ± sd over its seeds, Δ its
    paired difference to the baseline student with a bootstrap 95% interval; latency measured
    interleaved, speed-up the median of per-round ratios to the ensemble."""
    head = ["model", "seeds", "val acc", "test acc", "Δ test acc [95% CI]", "test patient RR", "params",
            "CPU ms (b=1)", "CPU ms (b=64)", "speed-up vs ensemble (b=64)"]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def pm(v: Any, sd: Any) -> str:
        return "-" if v is None else f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = r.get("delta_vs_baseline")
        delta = ("baseline" if "seeds" in r else "-") if d is None else \
            f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
        lines.append("| " + " | ".join([
            r["model"], str(len(r["seeds"])) if "seeds" in r else "-", f(r["val_acc"], ".3f"),
            pm(r["test_acc"], r.get("test_acc_sd")), delta, pm(r["test_patient_rr"], r.get("test_patient_rr_sd")),
            f(r["params"], ","), f(r["ms_b1"], ".2f"), f(r["ms_b64"], ".1f"),
            "-" if r.get("speedup_b64") is None else f"{r['speedup_b64']:.1f}x"]) + " |")
    return "\n".join(lines)


def demo_study(spec: dict[str, Any], teachers: dict[str, dict[str, Any]], out: Path, data_root: str | None,
               seeds: list[int], jobs: int) -> dict[str, Any]:
    """The students as a `graftkd compare` study: every student method x seed on one step budget and
    one precision, the teachers the demo trained, baseline ``scratch``."""
    base = {k: v for k, v in spec["base"].items() if k not in ("seed", "name", "output")}
    data = dict(base.pop("data"))
    if data_root is not None:
        data.update(source="breakhis", root=data_root)
    else:
        data["root"] = str(out / "data" / "synthetic")
    trainer = {k: v for k, v in base.pop("trainer", {}).items() if k not in ("epochs", "steps")}
    trainer.update(precision=spec["student_precision"], eval_every_steps=max(1, spec["student_steps"] // 8))
    if jobs > 1:
        trainer["threads"] = max(1, (os.cpu_count() or 1) // jobs)
    methods: dict[str, Any] = {}
    for name, section in spec["students"].items():
        section = {k: v for k, v in section.items() if k != "trainer"}
        choice, host = section.pop("teachers", None), section.pop("host", None)
        entries = _teacher_entries(choice, teachers) if choice is not None else []
        section["teachers"] = entries
        if host is not None:
            section["method"] = {**section["method"],
                                 "host": [t["checkpoint"] for t in entries].index(teachers[host]["model"])}
        methods[name] = section
    return {"name": "demo_students", "out": str(out / "students"), "data": data,
            "teachers": _teacher_entries("all", teachers), "student": {"name": spec["student_model"]},
            "common": {**base, "trainer": trainer, "output": {"tensorboard": False}},
            "shots": [spec["student_shots"]], "seeds": seeds, "steps": spec["student_steps"],
            "baseline": "scratch", "methods": methods}


def run_demo(quick: bool = False, data_root: str | None = None, out: str | Path = "runs/demo") -> int:
    """Run the pipeline; prints progress lines, the study's table, the summary table and where
    everything is."""
    from graftkd.files import atomic_write_json, atomic_write_text
    from graftkd.experiment import execute, read_metrics
    from graftkd.eval.latency import profile_interleaved
    from graftkd.eval.report import write_report
    from graftkd.export import export_model
    from graftkd.models import load_model_file
    from graftkd.study import compare

    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data {data_root}: no such folder (point it at an unpacked BreaKHis_v1)")
    out = Path(out)
    spec = load_demo_spec(quick)
    seeds, jobs = list(spec["student_seeds"]), int(spec["jobs"])
    t_all = time.perf_counter()

    teachers: dict[str, dict[str, Any]] = {}
    for name, section in spec["teachers"].items():
        t0 = time.perf_counter()
        run = execute(stage_config(spec, {**section, "method": {"name": "supervised"}}, f"teacher_{name}", out,
                      data_root), overwrite=True)
        m = read_metrics(run)
        print(f"[demo] teacher_{name:<10} val acc {m['val']['accuracy']:.3f}  test acc {m['test']['accuracy']:.3f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        teachers[name] = {"arch": section["model"]["name"], "model": str(run / "model.pt"),
                          "val_acc": m["val"]["accuracy"], "run": run}

    # the students: every method x seed, one step budget, paired statistics (`graftkd compare`)
    study_file = out / "students.yaml"
    atomic_write_text(study_file, yaml.safe_dump(demo_study(spec, teachers, out, data_root, seeds, jobs),
                                                 sort_keys=False))
    print(f"[demo] students: {len(spec['students'])} methods x seeds {seeds} as a study ({study_file}, "
          f"{jobs} at once)", flush=True)
    study = compare(study_file, jobs=jobs, command=f"graftkd compare {study_file}" + (f" --jobs {jobs}" if jobs > 1 else ""))
    rows_by = {r["method"]: r for r in study["rows"] if not r.get("reference")}
    diffs = {d["method"]: d for d in study["differences"] if d["metric"] == "accuracy"}
    runs = {name: [Path(p) for p in rows_by[name]["runs"]] for name in spec["students"] if rows_by[name]["mean"] is not None}
    if not runs:
        raise UserError("every student run failed; see " + str(out / "students" / "logs"))

    # latency: every teacher, the ensemble and one student per method, measured interleaved
    repeats = 3 if quick else 20
    size = spec["base"]["data"]["image_size"]
    nets: dict[str, Any] = {f"teacher {t}": load_model_file(v["model"])[0] for t, v in teachers.items()}
    nets["teacher ensemble"] = list(nets.values())
    students = {name: load_model_file(rs[0] / "model.pt")[0] for name, rs in runs.items()}
    nets.update({f"student {name}": m for name, m in students.items()})
    prof = profile_interleaved(nets, size, repeats=repeats, reference="teacher ensemble")
    for name, rs in runs.items():  # each student run's metrics.json, as `graftkd evaluate --latency` writes it
        chosen = [t["name"] for t in yaml.safe_load((rs[0] / "config.yaml").read_text()).get("teachers", [])]
        arch_of = {v["arch"]: t for t, v in teachers.items()}
        entry: dict[str, Any] = {"student": prof[f"student {name}"]}
        if chosen:  # the run's own teachers; its ensemble is all of them (one teacher: that teacher)
            entry["teachers"] = [{"name": a, **prof[f"teacher {arch_of[a]}"]} for a in chosen]
            if len(chosen) in (1, len(teachers)):
                entry["ensemble"] = prof["teacher ensemble" if len(chosen) > 1 else f"teacher {arch_of[chosen[0]]}"]
        for run in rs:
            m = read_metrics(run)
            m["latency"] = entry
            atomic_write_json(run / "metrics.json", m)

    mt = read_metrics(runs["mt_kd"][0]) if "mt_kd" in runs else None
    rows = [_row(f"teacher {t}", read_metrics(v["run"]), prof[f"teacher {t}"]) for t, v in teachers.items()]
    if mt is not None and "ensemble" in mt:
        rows.append(_row("teacher ensemble", mt["ensemble"], prof["teacher ensemble"]))
    for name in runs:
        rows.append(_student_row(f"student {name} ({spec['student_model']})", rows_by[name], diffs.get(name),
                                 rows_by[name]["val"]["values"], prof[f"student {name}"]))

    # the best student on validation (mean over seeds), and its best run on validation, is exported
    best = max(runs, key=lambda n: statistics.fmean(rows_by[n]["val"]["values"]))
    vals = rows_by[best]["val"]["values"]
    best_run = runs[best][vals.index(max(vals))]
    export_dir = out / "export"
    # --quick uses the TorchScript exporter (under a second); the full demo the dynamo one (~20 s)
    written = export_model(best_run, formats=("safetensors", "onnx"), out_dir=export_dir,
                           exporter="legacy" if quick else "dynamo")
    first = [rs[0] for rs in runs.values()]
    report = write_report([t["run"] for t in teachers.values()] + first, out / "report.html")
    for run in first:
        write_report([run])
    table = format_table(rows)
    atomic_write_text(out / "summary.md", table + "\n")
    ranking = sorted(runs, key=lambda n: -rows_by[n]["mean"])
    atomic_write_json(out / "summary.json", {
        "rows": rows, "best_student": best, "best_run": str(best_run), "ranking_by_test": ranking,
        "student_steps": spec["student_steps"], "student_seeds": seeds, "jobs": jobs,
        "study": {"file": str(study_file), "results": str(out / "students" / "compare.json"),
                  "revision": study["revision"], "failures": study["failures"]},
        "export": {k: str(v) for k, v in written.items()},
        "seconds": round(time.perf_counter() - t_all, 1), "quick": quick,
        "command": "graftkd demo" + (" --quick" if quick else "")})
    print()
    print(table)
    print()
    print(f"[demo] students by mean test accuracy over seeds {seeds} ({spec['student_shots']} labelled images per "
          f"class, {spec['student_steps']} optimiser steps each): "
          + " > ".join(f"{n} {rows_by[n]['mean']:.3f} ± {rows_by[n]['sd']:.3f}" for n in ranking)
          + f"; Δ = paired difference to scratch with a bootstrap 95% interval over seeds and test patients "
            f"(BENCHMARKS.md ranks them over 5 to 10 seeds)")
    print(f"[demo] best student on validation: {best} ({best_run.name}); exported to {written['onnx']} "
          f"(+ safetensors, model card)")
    print(f"[demo] comparison report: {report}")
    print(f"[demo] run folder: {out}  ({time.perf_counter() - t_all:.0f} s)")
    return 0
