"""``graftkd compare``: a study that runs every method x shots x seed on one step budget and compares them.

One YAML names the data, teachers, student, shots, seeds, the optimiser-step budget and the methods
(each a config fragment). Every run is an ordinary run folder; a finished one is reused only when
its resolved config, its teachers' checkpoint files and the code revision are those of this
invocation. Results: a table of mean ± sd per method, paired differences against a baseline with
bootstrap 95% intervals over seeds and test images (test patients when images are grouped), a
plot, and every row as JSON (code revision, command, per-seed values, steps).
"""
from __future__ import annotations

import csv
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, ValidationError

import graftkd.methods  # noqa: F401  registers every method and its config section
from graftkd.config import (ExperimentConfig, Strict, apply_override, config_to_yaml, deep_merge, parse_override,
                            validate_config)
from graftkd.errors import UserError

STUDY_OWNED = ("seed", "name", "output.dir", "output.name", "trainer.steps", "trainer.epochs", "data.shots")


class StudyConfig(Strict):
    """A comparison study (the YAML of ``graftkd compare``). Sections are config fragments merged in
    this order: ``base`` file, ``data``/``teachers``/``student``, ``common``, the method's fragment;
    the study then sets ``seed``, ``data.shots``, ``trainer.steps`` and the run folder."""

    name: str = Field(description="study name: the folder out/ and the JSON title")
    out: Path | None = Field(None, description="folder of the study's runs and results (None: runs/studies/<name>)")
    base: Path | None = Field(None, description="experiment YAML every run starts from (optional)")
    data: dict[str, Any] = Field(default_factory=dict, description="the data section of every run")
    teachers: list[dict[str, Any]] = Field(default_factory=list, description="the teachers section of every run")
    student: dict[str, Any] = Field(default_factory=dict, description="the model section (the student) of every run")
    common: dict[str, Any] = Field(default_factory=dict, description="any other config sections every run shares")
    shots: list[int | None] = Field([None], min_length=1, description="labelled images per class (null: the "
                                                                       "whole training split / data's given set)")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="experiment seeds (init, augmentation, draws)")
    steps: int = Field(ge=1, description="optimiser steps of every run (trainer.steps): the equal budget")
    methods: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> config fragment")
    baseline: str | None = Field(None, description="method the others are differenced against (None: the first)")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of the paired differences")
    results: Path | None = Field(None, description="also write the JSON here (e.g. benchmarks/results/x.json)")

    @property
    def folder(self) -> Path:
        return self.out if self.out is not None else Path("runs") / "studies" / self.name


def load_study(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping")
    for text in overrides:
        apply_override(raw, *parse_override(text))
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{path}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    if study.baseline is not None and study.baseline not in study.methods:
        raise UserError(f"{path}: baseline {study.baseline!r} is not one of the methods ({', '.join(study.methods)})")
    for name, fragment in [("common", study.common)] + [(f"methods.{m}", f) for m, f in study.methods.items()]:
        for key in STUDY_OWNED:
            node: Any = fragment
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                raise UserError(f"{path}: {name} sets {key}, which the study sets for every run (seeds, shots, steps)")
    return study


# ------------------------------------------------------------------------------------ the runs
@dataclass
class Job:
    method: str
    shots: int | None
    seed: int
    cfg: ExperimentConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def run_name(method: str, shots: int | None, seed: int) -> str:
    return f"{method}_{'all' if shots is None else f'{shots}shot'}_s{seed}"


def build_jobs(study: StudyConfig) -> list[Job]:
    base: dict[str, Any] = {}
    if study.base is not None:
        if not Path(study.base).is_file():
            raise UserError(f"study base config not found: {study.base}")
        base = yaml.safe_load(Path(study.base).read_text()) or {}
    shared = {k: v for k, v in (("data", study.data), ("model", study.student)) if v}
    if study.teachers:
        shared["teachers"] = study.teachers
    jobs = []
    for shots in study.shots:
        for seed in study.seeds:
            for method, fragment in study.methods.items():
                raw = deep_merge(deep_merge(deep_merge(base, shared), study.common), fragment)
                name = run_name(method, shots, seed)
                raw["name"], raw["seed"] = name, seed
                raw.setdefault("data", {})
                if shots is not None:
                    raw["data"]["shots"] = shots
                raw["trainer"] = {**raw.get("trainer", {}), "steps": study.steps, "epochs": None, "progress": False}
                raw["output"] = {**raw.get("output", {}), "dir": str(study.folder / "runs"), "name": name}
                jobs.append(Job(method, shots, seed, validate_config(raw, f"study {study.name}, run {name}")))
    return jobs


def code_revision() -> dict[str, str]:
    """``commit``: ``git rev-parse HEAD`` of the checkout graftkd is imported from; ``code``: the git
    tree of the package source at HEAD (what reuse keys on: commits that change only benchmarks,
    configs, docs or tests leave it unchanged). Both get ``+dirty.<hash>`` when the package source
    differs from HEAD; outside a git checkout both are the package version."""
    pkg = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        tree = git("rev-parse", f"HEAD:{git('rev-parse', '--show-prefix').strip()}").strip()
        status = git("status", "--porcelain", "--untracked-files=all", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = f"graftkd-{version('graftkd')}"
        except PackageNotFoundError:
            v = "unknown"
        return {"commit": v, "code": v}
    if not status.strip():
        return {"commit": head, "code": tree}
    h = hashlib.sha256(git("diff", "HEAD", "--", ".").encode())
    for line in sorted(status.splitlines()):
        if line.startswith("??"):
            f = Path(git("rev-parse", "--show-toplevel").strip()) / line[3:]
            h.update(f.read_bytes() if f.is_file() else b"")
    dirty = f"+dirty.{h.hexdigest()[:12]}"
    return {"commit": head + dirty, "code": tree + dirty}


def _file_sha(path: Path) -> str:
    if not Path(path).is_file():
        raise UserError(f"teacher checkpoint not found: {path}")
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg: ExperimentConfig, code: str, shas: dict[str, str]) -> str:
    """What a finished run must match to be reused: resolved config, teacher files, package source."""
    teachers = [shas.setdefault(str(t.checkpoint), _file_sha(t.checkpoint)) if t.checkpoint else t.name
                for t in cfg.teachers]
    return hashlib.sha256("\n".join([config_to_yaml(cfg), *teachers, code]).encode()).hexdigest()


def finished(job: Job, fp: str) -> bool:
    d = job.run_dir
    try:
        stamp = json.loads((d / "study.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stamp.get("fingerprint") == fp and (d / "metrics.json").is_file() and (d / "predictions.csv").is_file()


def _run_job(job: Job, jobs: int, log_dir: Path) -> None:
    if jobs == 1:
        from graftkd.experiment import execute

        execute(job.cfg, overwrite=True)
        return
    # a fresh interpreter per run: its own torch threads and memory; the resolved config is the input
    cfg_file = log_dir / f"{job.cfg.name}.yaml"
    cfg_file.write_text(config_to_yaml(job.cfg))
    command = "train" if job.cfg.method.name == "supervised" else "distill"
    with (log_dir / f"{job.cfg.name}.log").open("w") as log:
        rc = subprocess.run([sys.executable, "-m", "graftkd", command, "-c", str(cfg_file), "--overwrite"],
                            stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise UserError(f"run {job.cfg.name} failed (exit {rc}); see {log_dir / f'{job.cfg.name}.log'}")


def run_jobs(jobs: list[Job], revision: dict[str, str], parallel: int, log_dir: Path) -> tuple[dict[str, bool], dict[str, str]]:
    """Run what is not finished (``parallel`` at once); returns run name -> reused, and run name ->
    error for runs that stopped with a user error (a diverged loss, say): the others go on."""
    from graftkd.files import atomic_write_json

    shas: dict[str, str] = {}
    prints = {j.cfg.name: fingerprint(j.cfg, revision["code"], shas) for j in jobs}
    reused = {j.cfg.name: finished(j, prints[j.cfg.name]) for j in jobs}
    todo = [j for j in jobs if not reused[j.cfg.name]]
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[compare] {len(jobs)} runs, {len(jobs) - len(todo)} reused, {len(todo)} to run", flush=True)

    failed: dict[str, str] = {}

    def one(job: Job) -> None:
        t = time.perf_counter()
        try:
            _run_job(job, parallel, log_dir)
        except UserError as e:
            failed[job.cfg.name] = str(e)
            print(f"[compare {time.perf_counter() - t0:6.0f}s] {job.cfg.name}: FAILED: {e}", flush=True)
            return
        atomic_write_json(job.run_dir / "study.json", {"fingerprint": prints[job.cfg.name], **revision})
        m = json.loads((job.run_dir / "metrics.json").read_text())
        print(f"[compare {time.perf_counter() - t0:6.0f}s] {job.cfg.name}: val {m['val']['accuracy']:.4f} "
              f"test {m['test']['accuracy']:.4f}, {m.get('steps')} steps, {time.perf_counter() - t:.0f} s", flush=True)

    if parallel == 1:
        for job in todo:
            one(job)
    else:
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, todo))
    return reused, failed


# ---------------------------------------------------------------------------------- statistics
def read_test_predictions(run_dir: Path) -> dict[str, tuple[str, bool]]:
    """image -> (group, correct) on the test split of a finished run."""
    with (Path(run_dir) / "predictions.csv").open(newline="") as f:
        return {r["image"]: (r["group"], r["label"] == r["pred"]) for r in csv.DictReader(f) if r["split"] == "test"}


def unit_table(preds: list[dict[str, tuple[str, bool]]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Correct counts ``[runs, units]`` and images per unit ``[units]`` over the shared test set; units
    are groups (patients), which are the images themselves when no image shares a group."""
    images = sorted(preds[0])
    if any(sorted(p) != images for p in preds[1:]):
        raise UserError("the runs do not share one test set (does the split depend on the seed? set "
                        "data.split.seed), so they cannot be paired")
    groups = sorted({preds[0][i][0] for i in images})
    index = {g: k for k, g in enumerate(groups)}
    correct = np.zeros((len(preds), len(groups)))
    count = np.zeros(len(groups))
    for i in images:
        count[index[preds[0][i][0]]] += 1
    for r, p in enumerate(preds):
        for i in images:
            correct[r, index[p[i][0]]] += p[i][1]
    return correct, count, groups


def paired_bootstrap(num: np.ndarray, den: np.ndarray, resamples: int, seed: int = 0,
                     draws: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Mean over seeds of a ratio difference and its percentile 95% interval.

    ``num[s, u]`` is, for seed s and unit u, the method's numerator minus the baseline's (correct
    images for image accuracy, per-unit accuracy for the patient recognition rate); ``den[u]`` the
    unit's denominator (its images, or 1). Each resample draws seeds and units with replacement
    (multiplicities ``V [B, S]``, ``W [B, U]``, shared by both methods: paired) and takes
    ``mean_s' (sum_u W num[s'] / sum_u W den)``. ``draws`` fixes ``(V, W)`` (tests)."""
    s, u = num.shape
    estimate = float((num.sum(1) / den.sum()).mean())
    if draws is None:
        rng = np.random.default_rng(seed)
        V = rng.multinomial(s, np.full(s, 1 / s), size=resamples).astype(float)
        W = rng.multinomial(u, np.full(u, 1 / u), size=resamples).astype(float)
    else:
        V, W = draws
    per_seed = (num @ W.T) / (W @ den)  # [S, B]
    stats = (V.T * per_seed).sum(0) / s
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": estimate, "ci95": [float(lo), float(hi)], "resamples": int(len(stats))}


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(study: StudyConfig, jobs: list[Job]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per (method, shots) and per reference network, and the paired differences."""
    baseline = study.baseline or next(iter(study.methods))
    metrics = {j.cfg.name: json.loads((j.run_dir / "metrics.json").read_text()) for j in jobs}
    rows: list[dict[str, Any]] = []
    diffs: list[dict[str, Any]] = []
    for shots in study.shots:
        group = [j for j in jobs if j.shots == shots]
        preds = {j.cfg.name: read_test_predictions(j.run_dir) for j in group}
        correct, count, units = unit_table([preds[j.cfg.name] for j in group])
        at = {j.cfg.name: k for k, j in enumerate(group)}
        grouped = len(units) < count.sum()
        for method in study.methods:
            runs = [j for j in group if j.method == method]
            if not runs:
                rows.append({"method": method, "shots": shots, "seeds": [], "values": [], "mean": None, "sd": None,
                             "steps": None})
                continue
            ms = [metrics[j.cfg.name] for j in runs]
            values = [m["test"]["accuracy"] for m in ms]
            mean, sd = summary(values)
            steps = sorted({m.get("steps") for m in ms}, key=str)
            row: dict[str, Any] = {
                "method": method, "shots": shots, "seeds": [j.seed for j in runs], "values": values,
                "mean": mean, "sd": sd, "steps": steps[0] if len(steps) == 1 else steps,
                "val": {"values": [m["val"]["accuracy"] for m in ms]},
                "train_seconds": [m.get("train_seconds") for m in ms], "runs": [str(j.run_dir) for j in runs],
                # data.unlabeled: the unlabelled images each run had (pool) and drew (steps x unlabeled batch)
                "unlabeled_images": [m["data"].get("unlabeled", {}).get("images", 0) for m in ms],
                "unlabeled_drawn": [m["data"].get("unlabeled", {}).get("drawn", 0) for m in ms]}
            if grouped:
                prr = [m["test"]["patient_recognition_rate"] for m in ms]
                row["patient_recognition_rate"] = dict(zip(("mean", "sd"), summary(prr)), values=prr)
                row["test_patients"] = len(units)
            row["test_images"] = int(count.sum())
            rows.append(row)
            if method == baseline or not any(j.method == baseline for j in group):
                continue
            base_runs = {j.seed: j for j in group if j.method == baseline}
            pairs = [(at[j.cfg.name], at[base_runs[j.seed].cfg.name]) for j in runs if j.seed in base_runs]
            a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            for metric, num, den in [("accuracy", correct[a] - correct[b], count)] + (
                    [("patient_recognition_rate", (correct[a] - correct[b]) / count, np.ones_like(count))]
                    if grouped else []):
                boot = paired_bootstrap(num, den, study.bootstrap)
                diffs.append({"method": method, "baseline": baseline, "shots": shots, "metric": metric,
                              "seeds": [j.seed for j in runs if j.seed in base_runs],
                              "values": (num.sum(1) / den.sum()).tolist(), **boot,
                              "unit": "patient" if grouped else "image"})
        rows += reference_rows(group, metrics, shots)
    return rows, diffs


def reference_rows(group: list[Job], metrics: dict[str, dict[str, Any]], shots: int | None) -> list[dict[str, Any]]:
    """The teachers and each fused ensemble, scored on the same test set (they do not train)."""
    out: dict[str, dict[str, Any]] = {}
    for j in group:
        m = metrics[j.cfg.name]
        for t in m.get("teachers", []):
            out.setdefault(f"teacher_{t['name']}", {"test": t["test"]["accuracy"], "val": t["val"]["accuracy"],
                                                    "prr": t["test"].get("patient_recognition_rate")})
        ens = m.get("ensemble")
        if ens and len(m.get("teachers", [])) > 1 and m.get("fusion", {}).get("strategy") != "best":
            out.setdefault(f"ensemble_{m['fusion']['strategy']}", {
                "test": ens["test"]["accuracy"], "val": ens["val"]["accuracy"],
                "prr": ens["test"].get("patient_recognition_rate")})
    rows = []
    for name, v in out.items():
        row = {"method": name, "shots": shots, "reference": True, "values": [v["test"]], "mean": v["test"], "sd": 0.0,
               "val": {"values": [v["val"]]}}
        if v["prr"] is not None:
            row["patient_recognition_rate"] = {"values": [v["prr"]], "mean": v["prr"], "sd": 0.0}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- outputs
def pct(mean: float, sd: float | None = None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def markdown(rows: list[dict[str, Any]], diffs: list[dict[str, Any]], title: str) -> str:
    d = {(x["method"], x["shots"], x["metric"]): x for x in diffs}
    grouped = any("patient_recognition_rate" in r and not r.get("reference") for r in rows)
    head = ["method", "shots", "test accuracy % (mean ± sd)", "per seed", "Δ vs baseline [95% CI]"]
    head += ["patient RR % (mean ± sd)", "Δ patient RR [95% CI]"] if grouped else []
    unlabeled = any(any(r.get("unlabeled_images") or []) for r in rows)
    head += ["unlabelled images"] if unlabeled else []
    head += ["steps"]
    out = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def delta(metric: str) -> str:
            x = d.get((r["method"], r["shots"], metric))
            if x is None:
                return "baseline" if not r.get("reference") else "-"
            return f"{100 * x['mean']:+.1f} [{100 * x['ci95'][0]:+.1f}, {100 * x['ci95'][1]:+.1f}]"

        if r["mean"] is None:
            out.append("| " + " | ".join([r["method"], str(r["shots"]), "every run failed"] + ["-"] * (len(head) - 3)) + " |")
            continue
        cells = [r["method"], "all" if r["shots"] is None else str(r["shots"]),
                 pct(r["mean"], None if r.get("reference") else r["sd"]),
                 ", ".join(pct(v) for v in r["values"]), delta("accuracy")]
        if grouped:
            p = r.get("patient_recognition_rate")
            cells += [pct(p["mean"], None if r.get("reference") else p["sd"]) if p else "-", delta("patient_recognition_rate")]
        if unlabeled:
            cells.append("/".join(map(str, sorted(set(r["unlabeled_images"])))) if r.get("unlabeled_images") else "-")
        cells.append(str(r.get("steps", "-")))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Per shots: each method's per-seed test accuracies (dots) with mean ± sd; teachers and
    ensembles as dashed lines."""
    from matplotlib.figure import Figure

    from graftkd.files import atomic_write_bytes
    from graftkd.eval.report import _png

    shots = list(dict.fromkeys(r["shots"] for r in rows))
    fig = Figure(figsize=(max(6.0, 4.5 * len(shots)), 4.2))
    axes = fig.subplots(1, len(shots), squeeze=False)[0]
    for ax, n in zip(axes, shots):
        students = [r for r in rows if r["shots"] == n and not r.get("reference") and r["mean"] is not None]
        for k, r in enumerate(students):
            ax.scatter([k] * len(r["values"]), [100 * v for v in r["values"]], s=14, color="tab:gray", zorder=2)
            ax.errorbar([k], [100 * r["mean"]], yerr=[100 * r["sd"]], fmt="o", color="tab:green", capsize=4, zorder=3)
        for i, r in enumerate(r for r in rows if r["shots"] == n and r.get("reference")):
            ax.axhline(100 * r["mean"], ls="--", lw=1, color=f"C{i}", label=r["method"])
        ax.set_xticks(range(len(students)), [r["method"] for r in students], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{'all' if n is None else n} shots per class", fontsize=10)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        if any(r.get("reference") for r in rows if r["shots"] == n):
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return atomic_write_bytes(path, _png(fig))


def compare(study_path: Path, overrides: list[str] | tuple[str, ...] = (), jobs: int = 1,
            results: Path | None = None, command: str | None = None, dry_run: bool = False,
            methods: list[str] | None = None) -> dict[str, Any]:
    """Run (or reuse) every run of the study and write compare.json, compare.md and compare.png.
    ``methods`` restricts the study to those methods (their runs are the same as in the full study)."""
    from graftkd.files import atomic_write_json, atomic_write_text

    study = load_study(study_path, overrides)
    if methods:
        unknown = [m for m in methods if m not in study.methods]
        if unknown:
            raise UserError(f"--methods {' '.join(unknown)}: not in the study ({', '.join(study.methods)})")
        baseline = study.baseline or next(iter(study.methods))
        study = study.model_copy(update={"methods": {m: f for m, f in study.methods.items() if m in methods},
                                         "baseline": baseline if baseline in methods else None})
    all_jobs = build_jobs(study)
    revision = code_revision()
    folder = study.folder
    if dry_run:
        shas: dict[str, str] = {}
        for j in all_jobs:
            state = "reuse" if finished(j, fingerprint(j.cfg, revision["code"], shas)) else "run"
            print(f"{state:5} {j.run_dir}")
        return {}
    t0 = time.perf_counter()
    reused, failed = run_jobs(all_jobs, revision, jobs, folder / "logs")
    rows, diffs = collect(study, [j for j in all_jobs if j.cfg.name not in failed])
    command = command or "graftkd compare " + shlex.join([str(study_path), *overrides])
    title = (f"{study.name}: test accuracy, mean ± sd over seeds {', '.join(map(str, study.seeds))}; "
             f"{study.steps} optimiser steps per run; Δ = paired difference to {study.baseline or next(iter(study.methods))}"
             f" (bootstrap 95% CI over seeds and test {'patients' if any('test_patients' in r for r in rows) else 'images'}). "
             f"Command: `{command}`")
    out = {"study": study.name, "revision": revision["commit"], "code": revision["code"], "command": command,
           "steps": study.steps,
           "baseline": study.baseline or next(iter(study.methods)), "seeds": study.seeds, "shots": study.shots,
           "rows": rows, "differences": diffs, "runs_reused": sum(reused.values()), "runs": len(all_jobs),
           "failures": [{"run": j.cfg.name, "method": j.method, "shots": j.shots, "seed": j.seed,
                         "error": failed[j.cfg.name]} for j in all_jobs if j.cfg.name in failed],
           "seconds": round(time.perf_counter() - t0, 1),
           "config": json.loads(json.dumps(study.model_dump(mode="json")))}
    atomic_write_json(folder / "compare.json", out)
    table = markdown(rows, diffs, title)
    if failed:
        table += "\n\nFailed runs (left out of the rows): " + "; ".join(f"{n}: {e}" for n, e in failed.items())
    atomic_write_text(folder / "compare.md", table + "\n")
    plot(rows, folder / "compare.png", study.name)
    target = results or study.results
    if target is not None:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(out, indent=1) + "\n")
    print(table)
    print(f"\n[compare] wrote {folder / 'compare.json'}, compare.md, compare.png"
          + (f" and {target}" if target is not None else ""))
    return out
