"""Deployment benchmark (issue 14): a distilled student against the three-teacher ensemble it
replaces, on synthetic histology (binary, patient split) with the full training split.

1. Synthetic histology with many patients (``--patients``, default 200, x 4 magnifications x
   ``--images-per-patient``), split 60/20/20 by patient, so the test split has hundreds of images.
2. The three teachers of the demo (resnet32, wrn_16_2, vgg8) trained on the whole training split.
3. Students (``--students``, default resnet8, each for every ``--student-epochs``) distilled from the mean-fused ensemble (the soft-target
   cache), each selected on validation; the deployed student is the best on validation among those
   at least ``--min-speedup`` times faster than the ensemble at both batch sizes.
4. Params, MACs and CPU latency (PyTorch eager, inference mode, batch 1 and 64; what ``graftkd
   evaluate --latency`` reports) of every network and of the ensemble (the teachers run together,
   mean of their softmax: the classifier whose test accuracy is reported). Latency is measured in
   interleaved rounds, speed-ups are per-round ratios (median).

    python benchmarks/latency.py [--out runs/bench_latency] [--threads 1] [--rounds 5]

Runs are re-used when their metrics.json exists. Writes benchmarks/results/latency.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from graftkd.study import code_revision
from graftkd.config import load_config
from graftkd.eval.latency import count_macs, measure_latency, size_on_disk
from graftkd.experiment import execute, read_metrics
from graftkd.files import atomic_write_json
from graftkd.models import count_params, load_model_file

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = {"resnet32": 0.05, "wrn_16_2": 0.05, "vgg8": 0.02}  # the demo's teachers and their learning rates


def data_overrides(args: argparse.Namespace) -> list[str]:
    return ["data.source=synthetic", "data.task=binary", f"data.image_size={args.image_size}", "data.augment=histology",
            f"data.synthetic={{patients: {args.patients}, images_per_patient: {args.images_per_patient}, "
            f"size: [{args.source_size}, {args.source_size}], seed: 0}}",
            "data.split={kind: fraction, train: 0.6, val: 0.2, test: 0.2}", "data.batch_size=64",
            "data.eval_batch_size=256", f"trainer.threads={args.train_threads}", "trainer.progress=false",
            "output.tensorboard=false", f"output.dir={args.out}"]


def run(overrides: list[str]) -> tuple[Path, dict]:
    cfg = load_config(None, overrides)
    if not (cfg.run_dir / "metrics.json").is_file():
        t = time.perf_counter()
        execute(cfg, overwrite=True)
        print(f"  {cfg.run_dir.name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return cfg.run_dir, read_metrics(cfg.run_dir)


def train_teacher(args: argparse.Namespace, arch: str, lr: float) -> tuple[Path, dict]:
    return run(data_overrides(args) + [
        "name=latency_teacher", "method={name: supervised}", f"model.name={arch}", "optimizer.name=sgd",
        f"optimizer.lr={lr}", "optimizer.nesterov=true", "optimizer.weight_decay=5e-4", "schedule.name=cosine",
        "schedule.warmup_epochs=1", f"trainer.epochs={args.teacher_epochs}", f"output.name=teacher_{arch}"])


def distil(args: argparse.Namespace, arch: str, epochs: int, teachers: list[tuple[str, Path]]) -> tuple[Path, dict]:
    listed = ", ".join(f"{{name: {n}, checkpoint: {p}}}" for n, p in teachers)
    return run(data_overrides(args) + [
        "name=latency_student", f"model.name={arch}", f"teachers=[{listed}]", "fusion.strategy=mean",
        "teacher_cache={enabled: true, views: 8}",
        "method={name: kd, temperature: 4.0, ce_weight: 0.1, kd_weight: 0.9}", "optimizer.name=sgd",
        "optimizer.lr=0.05", "optimizer.nesterov=true", "optimizer.weight_decay=5e-4", "schedule.name=cosine",
        "schedule.warmup_epochs=1", f"trainer.epochs={epochs}", f"output.name=student_{arch}_kd_e{epochs}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_latency")
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--images-per-patient", type=int, default=5)
    p.add_argument("--source-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student-epochs", type=int, nargs="+", default=[30], help="one student run per value")
    p.add_argument("--students", nargs="+", default=["resnet8"])
    p.add_argument("--min-speedup", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the latency measurement")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads of teacher and student training")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per network, batch and round")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "latency.json")
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/latency.py", *(sys.argv[1:] if argv is None else argv)])
    revision = code_revision()["commit"]
    t0 = time.perf_counter()
    teacher_runs = {arch: train_teacher(args, arch, lr) for arch, lr in TEACHERS.items()}
    ckpts = [(arch, d / "model.pt") for arch, (d, _) in teacher_runs.items()]
    student_runs = {f"{arch} e{ep}": distil(args, arch, ep, ckpts) for arch in args.students for ep in args.student_epochs}
    train_s = time.perf_counter() - t0

    torch.set_num_threads(args.threads)
    nets = {arch: load_model_file(d / "model.pt")[0].eval() for arch, (d, _) in teacher_runs.items()}
    nets.update({f"student {arch}": load_model_file(d / "model.pt")[0].eval() for arch, (d, _) in student_runs.items()})
    groups = {name: [m] for name, m in nets.items()}
    groups["ensemble"] = [nets[a] for a in TEACHERS]
    ms: dict[str, dict[str, list[float]]] = {n: {"b1": [], "b64": []} for n in groups}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):  # interleaved: every network once per round
        for name, models in groups.items():
            for b in (1, 64):
                ms[name][f"b{b}"].append(measure_latency(models, args.image_size, b, args.repeats, warmup=2))
        load.append(os.getloadavg()[0])
    any_run = next(iter(student_runs.values()))[1]
    acc = {arch: m["test"]["accuracy"] for arch, (_, m) in teacher_runs.items()}
    val = {arch: m["val"]["accuracy"] for arch, (_, m) in teacher_runs.items()}
    acc["ensemble"], val["ensemble"] = any_run["ensemble"]["test"]["accuracy"], any_run["ensemble"]["val"]["accuracy"]
    for arch, (_, m) in student_runs.items():
        acc[f"student {arch}"], val[f"student {arch}"] = m["test"]["accuracy"], m["val"]["accuracy"]
    networks = {}
    for name, models in groups.items():
        networks[name] = {"test_acc": acc[name], "val_acc": val[name], "params": count_params(models),
                          "macs": count_macs(models, args.image_size), "size_bytes": size_on_disk(models),
                          "ms_b1": round(statistics.median(ms[name]["b1"]), 3),
                          "ms_b64": round(statistics.median(ms[name]["b64"]), 3),
                          "ms_b1_rounds": [round(x, 3) for x in ms[name]["b1"]],
                          "ms_b64_rounds": [round(x, 3) for x in ms[name]["b64"]]}
    speed = {}
    for arch in student_runs:
        s, e = ms[f"student {arch}"], ms["ensemble"]
        speed[arch] = {b: round(statistics.median(x / y for x, y in zip(e[b], s[b])), 2) for b in ("b1", "b64")}
    fast = [a for a in student_runs if min(speed[a].values()) >= args.min_speedup] or list(student_runs)
    chosen = max(fast, key=lambda a: val[f"student {a}"])  # selected on validation, never on test
    test_counts = any_run["data"]["counts"]["test"]
    result = {
        "student": chosen, "teachers": list(TEACHERS),
        "speedup_b1": speed[chosen]["b1"], "speedup_b64": speed[chosen]["b64"],
        "accuracy_gap_pts": round(100 * (acc["ensemble"] - acc[f"student {chosen}"]), 2),
        "student_test_acc": acc[f"student {chosen}"], "ensemble_test_acc": acc["ensemble"],
        "student_ms_b1": networks[f"student {chosen}"]["ms_b1"], "ensemble_ms_b1": networks["ensemble"]["ms_b1"],
        "student_ms_b64": networks[f"student {chosen}"]["ms_b64"], "ensemble_ms_b64": networks["ensemble"]["ms_b64"],
        "test_images": test_counts["images"], "test_patients": test_counts["groups"],
        "train_images": any_run["data"]["counts"]["train"]["images"],
        "val_images": any_run["data"]["counts"]["val"]["images"],
        "speedups": speed, "networks": networks, "runtime": "PyTorch eager (inference_mode), CPU",
        "num_classes": 2, "image_size": args.image_size, "source_size": args.source_size,
        "patients": args.patients, "images_per_patient": args.images_per_patient,
        "teacher_epochs": args.teacher_epochs, "student_epochs": args.student_epochs, "threads": args.threads,
        "train_threads": args.train_threads, "rounds": args.rounds, "repeats": args.repeats, "train_seconds": round(train_s, 1),
        "load_avg_1m": [round(x, 2) for x in load], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "revision": revision, "command": command,
    }
    atomic_write_json(args.results, result)
    print("| network | test acc | params | MMACs | ms @ b1 | ms @ b64 |\n|---|---:|---:|---:|---:|---:|")
    for name, r in networks.items():
        print(f"| {name} | {100 * r['test_acc']:.2f} | {r['params'] / 1e6:.3f}M | {r['macs'] / 1e6:.1f} "
              f"| {r['ms_b1']:.2f} | {r['ms_b64']:.1f} |")
    print(f"\n{chosen}: {result['speedup_b1']}x at batch 1, {result['speedup_b64']}x at batch 64; gap "
          f"{result['accuracy_gap_pts']} points on {result['test_images']} test images "
          f"({result['test_patients']} patients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
