"""``graftkd demo``: the whole product on the embedded synthetic histology (or a real BreaKHis_v1).

Generates the data, trains three teachers of different architectures, distils a small student
with KD, multi-teacher KD, multi-teacher grafting and ATF from a few labelled images per class
(plus the same student from scratch), evaluates at image and patient level, profiles latency,
exports the best student (selected on validation) to ONNX, writes a comparison report and prints
a summary table.
"""
from __future__ import annotations

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
        spec["student_shots"], spec["student_steps"] = q["student_shots"], q["student_steps"]
        spec["students"] = deep_merge(spec["students"], q.get("students", {}))
    for stage in spec["students"].values():  # one optimiser-step budget and precision for every student
        trainer = stage.setdefault("trainer", {})
        trainer.update(steps=spec["student_steps"], epochs=None, precision=spec["student_precision"],
                       eval_every_steps=max(1, spec["student_steps"] // 8))
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
            "ms_b64": (latency or {}).get("ms_b64")}


def format_table(rows: list[dict[str, Any]], ensemble_ms_b64: float | None) -> str:
    head = ["model", "val acc", "test acc", "test patient RR", "params", "CPU ms (b=1)", "CPU ms (b=64)",
            "speedup vs ensemble (b=64)"]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speed = ensemble_ms_b64 / r["ms_b64"] if ensemble_ms_b64 and r.get("ms_b64") else None
        lines.append("| " + " | ".join([r["model"], f(r["val_acc"], ".3f"), f(r["test_acc"], ".3f"),
                                        f(r["test_patient_rr"], ".3f"), f(r["params"], ","), f(r["ms_b1"], ".2f"),
                                        f(r["ms_b64"], ".1f"), "-" if speed is None else f"{speed:.1f}x"]) + " |")
    return "\n".join(lines)


def run_demo(quick: bool = False, data_root: str | None = None, out: str | Path = "runs/demo") -> int:
    """Run the pipeline; prints progress lines, the summary table and where everything is."""
    from graftkd.files import atomic_write_json, atomic_write_text
    from graftkd.experiment import execute, read_metrics
    from graftkd.eval.latency import latency_entry, profile_model
    from graftkd.eval.report import write_report
    from graftkd.export import export_model
    from graftkd.models import load_model_file

    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data {data_root}: no such folder (point it at an unpacked BreaKHis_v1)")
    out = Path(out)
    spec = load_demo_spec(quick)
    t_all = time.perf_counter()

    def stage(name: str, section: dict[str, Any]) -> Path:
        t0 = time.perf_counter()
        cfg = stage_config(spec, section, name, out, data_root)
        run = execute(cfg, overwrite=True)
        m = read_metrics(run)
        print(f"[demo] {name:<18} val acc {m['val']['accuracy']:.3f}  test acc {m['test']['accuracy']:.3f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return run

    teachers: dict[str, dict[str, Any]] = {}
    for name, section in spec["teachers"].items():
        run = stage(f"teacher_{name}", {**section, "method": {"name": "supervised"}})
        teachers[name] = {"arch": section["model"]["name"], "model": str(run / "model.pt"),
                          "val_acc": read_metrics(run)["val"]["accuracy"], "run": run}

    shots = {"data": {"shots": spec["student_shots"]}, "model": {"name": spec["student_model"]}}
    students: dict[str, Path] = {}
    student_teachers: dict[str, list[dict[str, Any]]] = {}
    for name, section in spec["students"].items():
        section = deep_merge(shots, section)
        choice = section.pop("teachers", None)
        host = section.pop("host", None)
        if choice is not None:
            section["teachers"] = _teacher_entries(choice, teachers)
        if host is not None:
            section["method"]["host"] = [t["checkpoint"] for t in section["teachers"]].index(teachers[host]["model"])
        students[name] = stage(f"student_{name}", section)
        student_teachers[name] = section.get("teachers", [])

    # latency of every student, each teacher and the ensemble, each network profiled once; written
    # into each student run's metrics.json in the layout of `graftkd evaluate --latency`
    repeats = 3 if quick else 20
    size = spec["base"]["data"]["image_size"]
    by_checkpoint = {t["model"]: (t["arch"], load_model_file(t["model"])[0]) for t in teachers.values()}
    profiles: dict[tuple[int, ...], dict[str, Any]] = {}

    def profile(model: Any, image_size: int, repeats: int) -> dict[str, Any]:
        key = tuple(id(m) for m in (model if isinstance(model, list) else [model]))
        if key not in profiles:
            profiles[key] = profile_model(model, image_size, repeats=repeats)
        return profiles[key]

    metrics: dict[str, dict[str, Any]] = {}
    for name, run in students.items():
        m = read_metrics(run)
        run_teachers = [by_checkpoint[t["checkpoint"]] for t in student_teachers[name]]
        m["latency"] = latency_entry(load_model_file(run / "model.pt")[0], run_teachers, size, repeats, profile)
        atomic_write_json(run / "metrics.json", m)
        metrics[name] = m
    mt = metrics["mt_kd"]
    rows = [_row(f"teacher {t}", read_metrics(teachers[t]["run"]), entry)
            for t, entry in zip(teachers, mt["latency"]["teachers"])]
    rows.append(_row("teacher ensemble", mt["ensemble"], mt["latency"]["ensemble"]))
    rows += [_row(f"student {name} ({spec['student_model']})", m, m["latency"]["student"]) for name, m in metrics.items()]

    best = max(students, key=lambda n: metrics[n]["val"]["accuracy"])
    export_dir = out / "export"
    # --quick uses the TorchScript exporter (under a second); the full demo the dynamo one (~20 s)
    written = export_model(students[best], formats=("safetensors", "onnx"), out_dir=export_dir,
                           exporter="legacy" if quick else "dynamo")
    report = write_report([t["run"] for t in teachers.values()] + list(students.values()), out / "report.html")
    for run in students.values():
        write_report([run])
    table = format_table(rows, mt["latency"]["ensemble"]["ms_b64"])
    atomic_write_text(out / "summary.md", table + "\n")
    ranking = sorted(students, key=lambda n: -metrics[n]["test"]["accuracy"])
    atomic_write_json(out / "summary.json", {"rows": rows, "best_student": best, "ranking_by_test": ranking,
                                             "student_steps": spec["student_steps"],
                                             "export": {k: str(v) for k, v in written.items()},
                                             "seconds": round(time.perf_counter() - t_all, 1), "quick": quick,
                                             "command": "graftkd demo" + (" --quick" if quick else "")})
    print()
    print(table)
    print()
    print(f"[demo] students by test accuracy ({spec['student_shots']} labelled images per class, "
          f"{spec['student_steps']} optimiser steps each): "
          + " > ".join(f"{n} {metrics[n]['test']['accuracy']:.3f}" for n in ranking)
          + " (one seed; BENCHMARKS.md ranks them over 5 to 10 seeds)")
    print(f"[demo] best student on validation: {best}; exported to {written['onnx']} (+ safetensors, model card)")
    print(f"[demo] comparison report: {report}")
    print(f"[demo] run folder: {out}  ({time.perf_counter() - t_all:.0f} s)")
    return 0
