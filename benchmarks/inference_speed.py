"""CPU inference throughput: the exported student (onnxruntime) vs PyTorch eager vs the teacher ensemble.

    python benchmarks/inference_speed.py [--num-classes 100] [--image-size 32] [--threads 1]
                                         [--repeats 5] [--min-time 1.0]
                                         [--work runs/bench_inference_speed]
                                         [--out benchmarks/results/inference_speed.json]

The student (resnet8x4) is saved as a graftkd model file (random weights: speed does not depend on
them), exported with ``graftkd.export.export_model(..., formats=("safetensors", "onnx"))`` and
loaded back with ``graftkd.export.load_exported`` (``backend="onnx"``: onnxruntime CPU, its session given
``intra_op_num_threads = --threads`` like torch;
``backend="torch"``: PyTorch eager from the safetensors file, fp32, ``inference_mode``). The
teacher ensemble is resnet32x4 + wrn_40_2 + vgg13 run one after the other on the same batch and
fused as the mean of their softmax (``graftkd.eval.latency``'s ensemble forward), fp32; the
PyTorch rows are also given with bf16 autocast + channels_last, the fastest PyTorch CPU setting.

Images/s at batch 1 and 64 on random normalised inputs. Variants are measured interleaved in a
rotating order (one untimed warm-up round, then ``--repeats`` rounds of at least ``--min-time``
seconds each); the table gives medians and the speedup over the fp32 teacher ensemble of the same
round (median of per-round ratios). Writes ``--out`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
STUDENT = "resnet8x4"
TEACHERS = ["resnet32x4", "wrn_40_2", "vgg13"]
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, min_time: float) -> float:
    """Images/s of ``fn`` on ``x``: calls until ``min_time`` seconds have passed (at least one)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n * x.shape[0] / dt


def torch_fn(models: list[torch.nn.Module], bf16_cl: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if bf16_cl:
        models = [m.to(memory_format=torch.channels_last) for m in models]

    def run(x: torch.Tensor) -> torch.Tensor:
        if bf16_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_cl else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            if len(models) == 1:
                return models[0](x).float()
            return torch.stack([m(x).float().softmax(-1) for m in models]).mean(0)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_inference_speed")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference_speed.json")
    args = p.parse_args(argv)
    from graftkd.files import atomic_write_json
    from graftkd.study import code_revision

    command = ("python benchmarks/inference_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    print(f"$ {command}", flush=True)

    import onnxruntime

    from graftkd.eval.latency import count_macs
    from graftkd.models import count_params
    from graftkd.export import export_model, load_exported
    from graftkd.models import create_model, save_model_file

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    classes = [f"c{k}" for k in range(args.num_classes)]
    torch.manual_seed(0)
    student = create_model(STUDENT, args.num_classes).eval()
    model_file = save_model_file(args.work / "student.pt", student, arch=STUDENT, num_classes=args.num_classes,
                                 classes=classes, mean=MEAN, std=STD, image_size=args.image_size)
    t0 = time.perf_counter()
    written = export_model(model_file, formats=("safetensors", "onnx"), out_dir=args.work / "export")
    export_s = time.perf_counter() - t0
    import graftkd.export as gexport

    make_session = gexport.onnx_session

    def session_with_threads(data: Any) -> Any:  # onnxruntime gets the same thread count as torch
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        src = data if isinstance(data, bytes) else str(data)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])

    gexport.onnx_session = session_with_threads
    try:
        onnx_pred, card = load_exported(written["onnx"], backend="onnx")
    finally:
        gexport.onnx_session = make_session
    torch_pred, _ = load_exported(written["safetensors"], backend="torch")
    teachers = [create_model(t, args.num_classes).eval() for t in TEACHERS]
    student_bf16 = create_model(STUDENT, args.num_classes).eval()
    student_bf16.load_state_dict(student.state_dict())
    teachers_bf16 = [create_model(t, args.num_classes).eval() for t in TEACHERS]
    for m, src in zip(teachers_bf16, teachers):  # same weights, own copies (channels_last moves them)
        m.load_state_dict(src.state_dict())

    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "student_onnxruntime": onnx_pred,
        "student_torch_fp32": torch_pred,
        "student_torch_bf16_cl": torch_fn([student_bf16], True),
        "ensemble_torch_fp32": torch_fn(teachers, False),
        "ensemble_torch_bf16_cl": torch_fn(teachers_bf16, True),
    }
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, args.image_size, args.image_size, generator=gen) for b in batch_sizes}
    with torch.inference_mode():  # same outputs (sanity): onnx vs eager student
        diff = float((onnx_pred(inputs[batch_sizes[-1]]) - torch_pred(inputs[batch_sizes[-1]])).abs().max())

    keys = [(v, b) for b in batch_sizes for v in variants]
    res: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    loads: list[float] = []
    for r in range(args.repeats + 1):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for v, b in order:
            loads.append(os.getloadavg()[0])
            rate = timed(variants[v], inputs[b], args.min_time if r else 0.2)
            if r:
                res[(v, b)].append(rate)
        print(f"round {r}{' (warm-up)' if not r else ''} done, load1={os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)

    def speedup(v: str, b: int) -> float:
        return statistics.median(x / y for x, y in zip(res[(v, b)], res[("ensemble_torch_fp32", b)]))

    table = {v: {f"b{b}": {"img_s": round(statistics.median(res[(v, b)]), 1),
                           "speedup_vs_ensemble_fp32": round(speedup(v, b), 2),
                           "per_round": [round(x, 1) for x in res[(v, b)]]} for b in batch_sizes}
             for v in variants}
    result = {
        "img_s": table,
        "student_onnx_vs_torch_fp32": {f"b{b}": round(statistics.median(
            x / y for x, y in zip(res[("student_onnxruntime", b)], res[("student_torch_fp32", b)])), 2)
            for b in batch_sizes},
        "models": {"student": {"arch": STUDENT, "params": count_params(student),
                               "macs": count_macs(student, args.image_size)},
                   "ensemble": {"archs": TEACHERS, "params": count_params(teachers),
                                "macs": count_macs(teachers, args.image_size)}},
        "export": {"seconds": round(export_s, 1), "onnx_check": card.get("onnx_check"),
                   "max_abs_diff_onnx_vs_torch": diff},
        "context": {"command": command, "revision": code_revision()["commit"], "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                    "threads": args.threads, "image_size": args.image_size, "num_classes": args.num_classes,
                    "repeats": args.repeats, "min_time_s": args.min_time,
                    "load_average_1min": {"min": round(min(loads), 2), "median": round(statistics.median(loads), 2),
                                          "max": round(max(loads), 2)},
                    "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "weights": "random (throughput does not depend on them)",
                    "note": "medians over interleaved rounds; speedup = median of per-round ratios"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)

    label = {"student_onnxruntime": f"student {STUDENT}, exported ONNX, onnxruntime {onnxruntime.__version__}",
             "student_torch_fp32": f"student {STUDENT}, PyTorch eager fp32",
             "student_torch_bf16_cl": f"student {STUDENT}, PyTorch eager bf16 + channels_last",
             "ensemble_torch_fp32": "teacher ensemble (" + " + ".join(TEACHERS) + "), PyTorch eager fp32",
             "ensemble_torch_bf16_cl": "teacher ensemble, PyTorch eager bf16 + channels_last"}
    print(f"\nCPU inference, {args.image_size} px, {args.num_classes} classes, {args.threads} threads, "
          f"median of {args.repeats} interleaved rounds (1-min load average {min(loads):.1f}-{max(loads):.1f})\n")
    head = " | ".join(f"batch {b} img/s | x ensemble" for b in batch_sizes)
    print(f"| model / runtime | {head} |")
    print("|---|" + "---:|---:|" * len(batch_sizes))
    for v in variants:
        cells = " | ".join(f"{table[v][f'b{b}']['img_s']:.1f} | {table[v][f'b{b}']['speedup_vs_ensemble_fp32']:.2f}"
                           for b in batch_sizes)
        print(f"| {label[v]} | {cells} |")
    print(f"\nparams: student {result['models']['student']['params']:,}, ensemble "
          f"{result['models']['ensemble']['params']:,}; MACs/image: student {result['models']['student']['macs']:,}, "
          f"ensemble {result['models']['ensemble']['macs']:,}; onnx vs eager max |diff| {diff:.2e}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
