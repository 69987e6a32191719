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
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, ValidationError

import graftkd.methods  # noqa: F401  registers every method and its config section
from graftkd.config import (ExperimentConfig, Seed, Strict, apply_override, config_to_yaml, deep_merge, parse_override,
                            read_yaml, validate_config)
from graftkd.errors import UserError
from graftkd.runtime import code_revision  # noqa: F401  (re-exported: benchmarks import it from here)

STUDY_OWNED = ("seed", "name", "output.dir", "output.name", "trainer.steps", "trainer.epochs", "data.shots")


class Resources(Strict):
    """What one run of the study asks a cluster for (``graftkd compare --executor slurm``; ``local``
    and ``debug`` use the time limit only)."""

    gpus: int = Field(0, ge=0, description="GPUs per run")
    cpus: int = Field(1, ge=1, description="CPUs per run (Slurm cpus_per_task); match common.trainer.threads")
    time_min: int = Field(60, ge=1, description="time limit of one run in minutes")
    partition: str | None = Field(None, description="Slurm partition (None: the cluster's default)")
    mem_gb: float | None = Field(None, gt=0, description="memory per run in GB (None: the cluster's default)")
    slurm: dict[str, Any] = Field(default_factory=dict, description="more sbatch options, e.g. {account: x, qos: y}")


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
    seeds: list[Seed] = Field([0, 1, 2], min_length=1, description="experiment seeds (init, augmentation, draws)")
    steps: int = Field(ge=1, description="optimiser steps of every run (trainer.steps): the equal budget")
    methods: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> config fragment")
    baseline: str | None = Field(None, description="method the others are differenced against (None: the first)")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of the paired differences")
    results: Path | None = Field(None, description="also write the JSON here (e.g. benchmarks/results/x.json)")
    resources: Resources = Field(default_factory=Resources, description="per run, for --executor slurm|local|debug")

    @property
    def folder(self) -> Path:
        return self.out if self.out is not None else Path("runs") / "studies" / self.name


def load_study(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    raw = read_yaml(path) or {}
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
        base = read_yaml(study.base) or {}
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


def _run_in_process(job: Job) -> None:
    from graftkd.experiment import execute

    execute(job.cfg, overwrite=True)


def run_config_file(cfg_file: str) -> str | None:
    """One run of a study from its resolved config file, in the process that calls it (a forked
    worker, a submitit job on a cluster node): None when it finished, else the user error that
    stopped it (a crash raises, and the caller records it as the run's failure)."""
    import graftkd.methods  # noqa: F401  registers every method and its config section
    from graftkd.config import load_config
    from graftkd.experiment import execute

    try:
        execute(load_config(cfg_file, []), overwrite=True)
    except UserError as e:
        print(f"graftkd: error: {e}", file=sys.stderr, flush=True)
        return str(e)
    return None


def _forked_run(cfg_file: str, log_file: str, conn: Any) -> None:
    """Body of a forked worker: stdout and stderr to the run's log, the outcome down ``conn``. The
    worker ends when ``compare`` ends (``end_with_study``): no orphan run outlives it to race a rerun."""
    import os
    import traceback

    end_with_study()

    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:
        conn.send(run_config_file(cfg_file))
    except BaseException as e:  # noqa: BLE001  anything else ends this run, not the study
        traceback.print_exc()
        conn.send(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class WarmPool:
    """Runs each job in its own process forked from one warm server process that has imported torch,
    timm and graftkd once (``multiprocessing``'s forkserver): a run starts in milliseconds instead
    of seconds, and a run that crashes (segfault, out of memory, an exception) ends its process
    only: the study records it as failed and goes on. Children still running when the pool closes
    (the study interrupted) are terminated."""

    #: modules a run needs besides graftkd's own; graftkd's are all preloaded (``preload``)
    PRELOAD = ["timm", "torchvision"]
    #: graftkd modules a run never imports (the commands, the HTML report)
    SKIP = ("graftkd.cli", "graftkd.__main__", "graftkd.commands", "graftkd.demo", "graftkd.study",
            "graftkd.eval.report")

    @classmethod
    def preload(cls) -> list[str]:
        """Every graftkd module a run may import, so the workers run the code of the study's start
        (a source file edited while the study runs does not mix into its runs), then timm and
        torchvision."""
        pkg = Path(__file__).resolve().parent
        mods = []
        for f in sorted(pkg.rglob("*.py")):
            parts = f.relative_to(pkg.parent).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if not name.endswith(".commands") and not any(name == s or name.startswith(s + ".") for s in cls.SKIP):
                mods.append(name)
        return mods + cls.PRELOAD

    def __init__(self) -> None:
        import multiprocessing as mp

        os.environ[STUDY_PID_ENV] = str(os.getpid())  # the forkserver (started on first use) and its workers see it
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(self.preload())
        self.live: set[Any] = set()

    def run(self, cfg_file: Path, log_file: Path, target: Any = None) -> str | None:
        """None when the run finished, else why it did not. ``target`` replaces ``_forked_run``
        (a module-level function of the same arguments; tests make a run crash with it)."""
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=target or _forked_run, args=(str(cfg_file), str(log_file), send), daemon=False)
        proc.start()
        self.live.add(proc)
        send.close()
        try:
            outcome = recv.recv()
        except EOFError:
            proc.join()
            outcome = f"the run's process died (exit {proc.exitcode})"
        finally:
            recv.close()
        proc.join()
        self.live.discard(proc)
        if outcome is None and proc.exitcode != 0:
            outcome = f"the run's process ended with exit {proc.exitcode}"
        return outcome

    def close(self) -> None:
        for proc in list(self.live):
            if proc.is_alive():
                proc.terminate()  # SIGTERM: a starting run puts back what it replaced (RunStart)
        for proc in list(self.live):
            proc.join(timeout=30)


def _write_job_config(job: Job, log_dir: Path) -> Path:
    cfg_file = log_dir / f"{job.cfg.name}.yaml"
    cfg_file.write_text(config_to_yaml(job.cfg))
    return cfg_file


STUDY_PID_ENV = "GRAFTKD_STUDY_PID"


def end_with_study(poll_s: float = 0.5) -> None:
    """In a forked run: SIGTERM to itself once the ``compare`` process (``GRAFTKD_STUDY_PID``) is gone.
    The worker's parent is the forkserver, which outlives ``compare`` by however long its own exit
    takes, so its death signal (``end_with_parent``) alone is late; a watcher thread checks the study
    process itself."""
    import signal
    import threading

    end_with_parent()
    pid = int(os.environ.get(STUDY_PID_ENV, "0"))
    if pid <= 0:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass
            time.sleep(poll_s)

    threading.Thread(target=watch, name="graftkd-end-with-study", daemon=True).start()


def end_with_parent() -> None:
    """In a run's process: SIGTERM when the process that started it ends (Linux ``PR_SET_PDEATHSIG``;
    the forkserver ends with ``compare``), so a study's runs never outlive ``compare`` however it
    ends; a run stopped before its first checkpoint rolls back, a later one can be resumed."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent already ended between fork and prctl
        os._exit(143)


def claim_study_folder(folder: Path) -> None:
    """Mark a new study folder as graftkd's; an existing one must be a study (marked, or an older
    graftkd study: compare.json, logs/ or runs/) and not a folder of the user's."""
    from graftkd.files import folder_kind, mark_folder, require_mark

    if folder_kind(folder) == "study":
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"study folder {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / n).exists() for n in ("compare.json", "logs", "runs")):
        require_mark(folder, "study", "write a study into")
    folder.mkdir(parents=True, exist_ok=True)
    mark_folder(folder, "study")


def run_jobs(jobs: list[Job], revision: dict[str, str], parallel: int, log_dir: Path,
             executor: str = "pool", resources: "Resources | None" = None) -> tuple[dict[str, bool], dict[str, str]]:
    """Run what is not finished; returns run name -> reused, and run name -> error for runs that
    failed (a diverged loss, say, or a crashed process): the others go on.

    ``executor``: ``pool`` runs ``parallel`` at once on this machine (in this process when 1, else in
    warm forked workers, ``WarmPool``); ``local``, ``slurm`` and ``debug`` submit each run as a job
    through submitit (``submit_jobs``)."""
    from graftkd.files import atomic_write_json

    shas: dict[str, str] = {}
    prints = {j.cfg.name: fingerprint(j.cfg, revision["code"], shas) for j in jobs}
    reused = {j.cfg.name: finished(j, prints[j.cfg.name]) for j in jobs}
    todo = [j for j in jobs if not reused[j.cfg.name]]
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[compare] {len(jobs)} runs, {len(jobs) - len(todo)} reused, {len(todo)} to run"
          + (f" (executor {executor})" if executor != "pool" else ""), flush=True)

    failed: dict[str, str] = {}
    started: dict[str, float] = {}

    def done(job: Job, error: str | None) -> None:
        t = started.get(job.cfg.name, t0)
        if error is not None:
            failed[job.cfg.name] = error
            print(f"[compare {time.perf_counter() - t0:6.0f}s] {job.cfg.name}: FAILED: {error}", flush=True)
            return
        atomic_write_json(job.run_dir / "study.json", {"fingerprint": prints[job.cfg.name], **revision})
        m = json.loads((job.run_dir / "metrics.json").read_text())
        print(f"[compare {time.perf_counter() - t0:6.0f}s] {job.cfg.name}: val {m['val']['accuracy']:.4f} "
              f"test {m['test']['accuracy']:.4f}, {m.get('steps')} steps, {time.perf_counter() - t:.0f} s", flush=True)

    if executor != "pool":
        submit_jobs(todo, executor, resources or Resources(), parallel, log_dir, done, started)
    elif parallel == 1:
        for job in todo:
            started[job.cfg.name] = time.perf_counter()
            try:
                _run_in_process(job)
            except UserError as e:
                done(job, str(e))
                continue
            done(job, None)
    elif todo:
        pool = WarmPool()

        def one(job: Job) -> None:
            started[job.cfg.name] = time.perf_counter()
            log = log_dir / f"{job.cfg.name}.log"
            error = pool.run(_write_job_config(job, log_dir), log)
            done(job, None if error is None else f"run {job.cfg.name} failed: {error}; see {log}")

        try:
            with ThreadPoolExecutor(parallel) as threads:
                list(threads.map(one, todo))
        finally:
            pool.close()
    return reused, failed


def submit_jobs(todo: list[Job], executor: str, resources: "Resources", parallel: int, log_dir: Path,
                done: Any, started: dict[str, float]) -> None:
    """Each run as a submitit job (``executor``: ``slurm``, ``local`` or ``debug``) with the study's
    ``resources``; finished jobs are collected as they end (``done(job, error)``). On Slurm every run
    is submitted at once (the scheduler spreads them); ``local`` and ``debug`` keep ``parallel`` in
    flight. A job that ends without a result (killed, timed out, crashed) is a failed run."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"--executor {executor} needs submitit (pip install submitit)") from None
    folder = log_dir / "submitit"
    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    params: dict[str, Any] = {"timeout_min": resources.time_min, "cpus_per_task": resources.cpus,
                              "gpus_per_node": resources.gpus, "nodes": 1, "tasks_per_node": 1}
    if resources.mem_gb is not None:
        params["mem_gb"] = resources.mem_gb
    if executor == "slurm":
        if resources.partition is not None:
            params["slurm_partition"] = resources.partition
        if resources.slurm:
            params["slurm_additional_parameters"] = dict(resources.slurm)
    ex.update_parameters(**params)
    queue = list(todo)
    limit = len(queue) if executor == "slurm" else max(1, parallel)
    pending: dict[Any, Job] = {}
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                job = queue.pop(0)
                ex.update_parameters(name=f"graftkd_{job.cfg.name}")
                started[job.cfg.name] = time.perf_counter()
                sub = ex.submit(run_config_file, str(_write_job_config(job, log_dir).resolve()))
                pending[sub] = job
                print(f"[compare] submitted {job.cfg.name} as job {sub.job_id}", flush=True)
            ended = [s for s in pending if s.done()]
            if not ended:
                time.sleep(0.5)
                continue
            for sub in ended:
                job = pending.pop(sub)
                try:
                    error = sub.result()
                except Exception as e:  # noqa: BLE001  the job's failure, not the study's
                    first = str(e).strip().splitlines()
                    error = f"job {sub.job_id} ended without a result: {first[0] if first else type(e).__name__}"
                if error is not None:
                    error = f"run {job.cfg.name} failed: {error}; see {sub.paths.stderr}"
                done(job, error)
    finally:
        for sub in pending:
            sub.cancel(check=False)


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
            methods: list[str] | None = None, executor: str = "pool") -> dict[str, Any]:
    """Run (or reuse) every run of the study and write compare.json, compare.md and compare.png.
    ``methods`` restricts the study to those methods (their runs are the same as in the full study).
    The study folder is locked while compare writes it: a second compare on it gets one line."""
    from graftkd.files import FolderLock

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
    with FolderLock(folder, "study folder"):  # one compare per study folder
        claim_study_folder(folder)
        return _compare_locked(study, all_jobs, revision, folder, jobs, results, command, study_path, overrides, t0,
                               executor)


def _compare_locked(study: StudyConfig, all_jobs: list[Job], revision: dict[str, str], folder: Path, jobs: int,
                    results: Path | None, command: str | None, study_path: Path,
                    overrides: list[str] | tuple[str, ...], t0: float, executor: str) -> dict[str, Any]:
    from graftkd.files import atomic_write_json, atomic_write_text

    reused, failed = run_jobs(all_jobs, revision, jobs, folder / "logs", executor, study.resources)
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
           "seconds": round(time.perf_counter() - t0, 1), "executor": executor, "jobs": jobs,
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
