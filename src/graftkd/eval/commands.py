"""``graftkd evaluate | report | export | predict``: argument parsers and runners."""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

from graftkd.errors import UserError, positive_int


# ----------------------------------------------------------------------------------- evaluate
def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", type=Path, metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (uses its config.yaml and model.pt) or a model file (needs -c)")
    p.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides")
    p.add_argument("-c", "--config", type=Path, help="experiment YAML (default: the run's config.yaml)")
    p.add_argument("--split", nargs="+", choices=("val", "test"), default=["test"], help="split(s) to score")
    p.add_argument("--latency", action="store_true",
                   help="also profile params/MACs/size/CPU latency of the student, each teacher and the ensemble")
    p.add_argument("--repeats", type=positive_int, default=20, help="latency: timed repeats per batch size")
    p.add_argument("--out", type=Path, help="metrics JSON for a model file (default: <model>_metrics.json)")


def _latency_entry(cfg: Any, student: Any, num_classes: int, repeats: int) -> dict[str, Any]:
    """Profiles of the student, each configured teacher and the teachers run together."""
    from graftkd.eval.latency import latency_entry
    from graftkd.models import create_model, load_model_file

    teachers = [(t.name, load_model_file(t.checkpoint)[0] if t.checkpoint is not None
                 else create_model(t.name, num_classes, **t.kwargs)) for t in cfg.teachers]
    return latency_entry(student, teachers, cfg.data.image_size, repeats)


def evaluate(target: Path, config: Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             splits: tuple[str, ...] = ("test",), latency: bool = False, repeats: int = 20,
             out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Score a run's student (or a model file) on ``splits``; update and return the metrics file."""
    import graftkd.methods  # noqa: F401  registers every method and its config section
    from graftkd.config import load_config
    from graftkd.data import build_data
    from graftkd.eval.metrics import score_split
    from graftkd.files import atomic_write_json
    from graftkd.models import load_model_file
    from graftkd.runtime import resolve_device

    target = Path(target)
    is_run = target.is_dir()
    if is_run:
        model_path = target / "model.pt"
        cfg_path = config or target / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"{target} has no config.yaml; pass -c cfg.yaml")
    else:
        if not target.is_file():
            raise UserError(f"{target} not found: pass a run folder or a model file")
        if config is None:
            raise UserError(f"evaluating the model file {target} needs -c cfg.yaml for the data")
        model_path, cfg_path = target, config
    cfg = load_config(cfg_path, overrides)
    model, meta = load_model_file(model_path)
    data = build_data(cfg.data, cfg.seed, None, work_dir=(target if is_run else Path.cwd()).resolve().parent)
    if list(meta["classes"]) != list(data.classes):
        raise UserError(f"{model_path}: its classes {meta['classes']} differ from the data's {data.classes}")
    device = resolve_device(cfg.trainer.device)
    model = model.to(device).eval()
    metrics_path = target / "metrics.json" if is_run else (out or model_path.with_name(f"{model_path.stem}_metrics.json"))
    other = is_run and other_data_name(target, cfg)
    if other:  # scores on other data go beside the run's own, which stay as the run was selected and reported
        metrics_path = target / "evaluations" / other / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if other:
        metrics.update({"run": str(target), "model": str(model_path), "seed": cfg.seed,
                        "data": cfg.data.model_dump(mode="json")})
    for split in splits:
        result = score_split(model, getattr(data, split), cfg, device, data.classes)
        metrics[split] = {"split": split, "checkpoint": str(model_path), **result}
    if latency:
        metrics["latency"] = _latency_entry(cfg, model.cpu(), len(data.classes), repeats)
    from graftkd.files import FolderLock

    with FolderLock(target) if is_run else contextlib.nullcontext():  # not while a run is writing its folder
        atomic_write_json(metrics_path, metrics)
    return metrics_path, metrics


def other_data_name(run: Path, cfg: Any) -> str | None:
    """None when ``cfg`` scores the run's own data (its saved data section and seed), else the name
    of the folder under ``RUN/evaluations/`` for this data: source and a hash of the data section."""
    import hashlib

    from graftkd.config import read_yaml

    saved = read_yaml(run / "config.yaml")
    data = cfg.data.model_dump(mode="json")
    if isinstance(saved, dict) and saved.get("data") == data and saved.get("seed") == cfg.seed:
        return None
    key = hashlib.blake2b(json.dumps([data, cfg.seed], sort_keys=True).encode(), digest_size=4).hexdigest()
    return f"{cfg.data.source}-{key}"


def run_evaluate(args: argparse.Namespace) -> int:
    path, metrics = evaluate(args.target, args.config, args.overrides, tuple(args.split), args.latency,
                             args.repeats, args.out)
    for split in args.split:
        m = metrics[split]
        prr = f", patient RR {m['patient_recognition_rate']:.4f} ({m['n_patients']} patients)" \
            if "patient_recognition_rate" in m else ""
        print(f"{split}: n={m['n']} accuracy {m['accuracy']:.4f} [{m['accuracy_ci95'][0]:.3f}, "
              f"{m['accuracy_ci95'][1]:.3f}], balanced {m['balanced_accuracy']:.4f}{prr}")
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------- report
def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="one run folder, or several to compare")
    p.add_argument("--out", type=Path, help="HTML file (default: RUN/report.html, or compare.html for several)")


def run_report(args: argparse.Namespace) -> int:
    from graftkd.eval.report import write_report

    print(f"wrote {write_report(args.runs, args.out)}")
    return 0


# ------------------------------------------------------------------------------------- export
def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (its model.pt) or a model file")
    p.add_argument("--format", nargs="+", default=None, dest="formats", metavar="FORMAT",
                   help="safetensors and/or onnx (default: every format graftkd.export.FORMATS)")
    p.add_argument("--out", type=Path, help="output folder (default: the run folder)")
    p.add_argument("--onnx-exporter", choices=("dynamo", "legacy"), default="dynamo",
                   help="torch.onnx exporter (both are verified against PyTorch)")


def run_export(args: argparse.Namespace) -> int:
    from graftkd.export import FORMATS, export_model

    written = export_model(args.run, args.formats or FORMATS, args.out, args.onnx_exporter)
    card = json.loads(written["card"].read_text())
    if "onnx_check" in card:
        print(f"ONNX check: max |onnxruntime - PyTorch| = {card['onnx_check']['max_abs_diff']:.2e} "
              f"on a batch of {card['onnx_check']['batch']}")
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


# ------------------------------------------------------------------------------------ predict
def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL",
                   help="export folder (model_card.json + student.safetensors/.onnx), one of those files, or a model.pt")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="per-image CSV (default predictions.csv)")
    p.add_argument("--tta", action="store_true", help="average over flips and 90-degree rotations")
    p.add_argument("--manifest", type=Path, help="CSV with path,group columns giving each image's patient")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    p.add_argument("--batch-size", type=positive_int, default=32)


def run_predict(args: argparse.Namespace) -> int:
    from graftkd.eval.predict import collect_images, image_groups, predict_probs, write_predictions
    from graftkd.export import load_exported

    model, card = load_exported(args.model, args.backend)
    paths = collect_images(args.images)
    probs = predict_probs(model, card, paths, args.tta, args.batch_size)
    groups, mags = image_groups(paths, args.manifest)
    written = write_predictions(args.out, paths, probs, card["classes"], groups, mags)
    counts = probs.argmax(1).bincount(minlength=len(card["classes"])).tolist()
    print(f"{len(paths)} images: " + ", ".join(f"{c} {n}" for c, n in zip(card["classes"], counts)))
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0
