"""KD training throughput: graftkd against torchdistill, same pair, data, batch, threads, augmentation.

    python benchmarks/vs_torchdistill.py [--train-images 1280] [--batch-size 64] [--threads 1]
                                         [--repeats 3] [--views 2] [--work runs/bench_vs_torchdistill]
                                         [--out benchmarks/results/vs_torchdistill.json]

One KD epoch (teacher resnet32x4 -> student resnet8x4, 100 classes, T=4, 0.1 CE + 0.9 T^2 KL, SGD
lr 0.05 momentum 0.9 wd 5e-4, batch 64, no workers) over the same synthetic CIFAR-100-format pickle
folder (``cifar-100-python/{train,test,meta}``), augmentation RandomCrop(32, pad 4) + HFlip +
Normalize, the same teacher weights, ``torch.set_num_threads(--threads)`` in both.

* graftkd: the real KD method (``METHODS.get("kd")``) run by the real ``Trainer.fit``; the time is
  the trainer's ``epoch_time_s`` (data loading + forward + backward + step, no validation).
  Variants: ``fp32``; ``bf16`` (autocast); ``bf16_cl`` (bf16 + channels_last); ``cached``
  (soft-target cache, ``--cached-precision`` settings; the cache build is timed separately).
* torchdistill (installed from PyPI with ``pip install --target benchmarks/.env-torchdistill
  torchdistill==<--torchdistill-version> --no-deps``, run in a subprocess with that folder first on
  PYTHONPATH, so it uses the same torch): ``get_distillation_box`` driven by the config dict of its
  CIFAR-100 KD sample (``configs/sample/cifar100/kd/*.yaml``: ``WeightedSumLoss`` of ``KDLoss``,
  frozen teacher, SGD), the dataset as its config builds it (torchvision ``CIFAR100`` + torchvision
  transforms), and the ``train_one_epoch`` loop of its ``examples/torchvision/image_classification.py``
  (``forward_process``, ``post_forward_process``, ``MetricLogger``, ``loss.item()`` and the NaN check
  per step). fp32, as documented for vision (no AMP). The models are the same module code
  (graftkd's RepDistiller-shaped resnet32x4/resnet8x4), as a torchdistill user brings own models.
* ``*_data``: the data pipeline alone (iterate the training loader, no model), to attribute time.

Both sides run in persistent worker processes; the variants are measured interleaved in a rotating
order after one untimed warm-up round (a few steps each), so a shared CPU slows them alike. Each
ratio is the median over rounds of the per-round ratio. Writes ``--out`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TD_ENV = ROOT / "benchmarks" / ".env-torchdistill"
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TEACHER, STUDENT, NUM_CLASSES = "resnet32x4", "resnet8x4", 100
TEMPERATURE, CE_WEIGHT, KD_WEIGHT = 4.0, 0.1, 0.9
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
GK_VARIANTS = ["gk_fp32", "gk_bf16", "gk_bf16_cl", "gk_cached"]
TD_VARIANTS = ["td_fp32"]
DATA_VARIANTS = ["gk_data", "td_data"]


# ------------------------------------------------------------------------------------ helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_synthetic_cifar100(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """A ``cifar-100-python`` folder in the exact pickle format of the real one (random-ish images)."""
    import numpy as np

    folder = root / "cifar-100-python"
    marker = folder / "bench.json"
    want = {"train": train, "test": test, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def images(n: int) -> tuple[Any, list[int]]:
        labels = (np.arange(n) % NUM_CLASSES)
        rng.shuffle(labels)
        # smooth class-coloured blobs plus noise: "random-ish", compressible like photos
        base = rng.integers(0, 256, size=(NUM_CLASSES, 3, 1, 1)).astype(np.float32)
        yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
        wave = (np.sin(xx[None] / rng.uniform(2, 6, size=(n, 1, 1))) * np.cos(yy[None] / 4.0))[:, None]
        img = base[labels] * 0.6 + 60 * wave + rng.normal(0, 25, size=(n, 3, 32, 32))
        return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()

    for name, n in (("train", train), ("test", test)):
        data, labels = images(n)
        batch = {"filenames": [f"img_{i:05d}.png" for i in range(n)], "batch_label": f"{name} batch",
                 "fine_labels": labels, "coarse_labels": [y // 5 for y in labels], "data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"fine_label_names": [f"class_{k:03d}" for k in range(NUM_CLASSES)],
            "coarse_label_names": [f"super_{k:02d}" for k in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    marker.write_text(json.dumps(want))
    return folder


def write_split_csv(path: Path, train: int, test: int) -> Path:
    """graftkd split file: every train-pickle image trains (as in torchdistill), test halves are val/test."""
    import numpy as np

    with open(path.parent / "cifar-100-python" / "train", "rb") as f:
        ytr = pickle.load(f, encoding="latin1")["fine_labels"]
    with open(path.parent / "cifar-100-python" / "test", "rb") as f:
        yte = pickle.load(f, encoding="latin1")["fine_labels"]
    rows = ["index,label,group,split"]
    rows += [f"{i},{y},train:{i},train" for i, y in enumerate(ytr)]
    rows += [f"{train + j},{y},test:{train + j},{'val' if j < test // 2 else 'test'}" for j, y in enumerate(yte)]
    del np
    path.write_text("\n".join(rows) + "\n")
    return path


def ensure_torchdistill(version: str | None) -> str:
    """Install torchdistill (no deps: it needs only torch, torchvision, numpy, pyyaml at import) into TD_ENV."""
    spec = f"torchdistill=={version}" if version else "torchdistill"
    probe = [sys.executable, "-c", "import torchdistill; print(torchdistill.__version__)"]
    env = {**os.environ, "PYTHONPATH": str(TD_ENV)}
    got = subprocess.run(probe, env=env, capture_output=True, text=True)
    if got.returncode == 0 and (version is None or got.stdout.strip() == version):
        return got.stdout.strip()
    log(f"installing {spec} into {TD_ENV}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(TD_ENV), "--upgrade",
                    "--no-deps", spec], check=True)
    got = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    return got.stdout.strip()


# ------------------------------------------------------------------------------------ workers
class GraftkdWorker:
    """graftkd side: one KD method + data bundle per variant, each run is one ``Trainer.fit`` epoch."""

    def __init__(self, a: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(a["threads"])
        self.a = a
        self.work = Path(a["work"])
        self.methods: dict[str, Any] = {}
        self.cache_build: dict[str, Any] = {}
        from graftkd.models import create_model, save_model_file

        data = self._data("probe")
        self.teacher_file = self.work / "teacher_resnet32x4.pt"
        if not self.teacher_file.is_file():
            torch.manual_seed(0)
            save_model_file(self.teacher_file, create_model(TEACHER, NUM_CLASSES), arch=TEACHER,
                            num_classes=NUM_CLASSES, classes=data.classes, mean=data.mean, std=data.std,
                            image_size=32)

    def _raw(self, name: str) -> dict[str, Any]:
        a = self.a
        precision, cl, cached = {"gk_fp32": ("fp32", False, False), "gk_bf16": ("bf16", False, False),
                                 "gk_bf16_cl": ("bf16", True, False),
                                 "gk_cached": (a["cached_precision"], a["cached_cl"], True),
                                 "probe": ("fp32", False, False), "gk_data": ("fp32", False, False)}[name]
        return {
            "name": name, "seed": 0,
            "data": {"source": "cifar100", "root": str(self.work / "data"), "image_size": 32, "augment": "cifar",
                     "batch_size": a["batch_size"], "eval_batch_size": 128, "num_workers": 0,
                     # a speed benchmark: its few val/test images need not cover the 100 classes
                     "split": {"file": str(self.work / "data" / "splits.csv"), "on_empty_class": "warn"}},
            "model": {"name": STUDENT},
            "teachers": [{"checkpoint": str(self.work / "teacher_resnet32x4.pt")}],
            "method": {"name": "kd", "temperature": TEMPERATURE, "ce_weight": CE_WEIGHT, "kd_weight": KD_WEIGHT},
            "teacher_cache": {"enabled": cached, "views": a["views"]},
            "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WD},
            "schedule": {"name": "constant"},
            "trainer": {"epochs": 1, "device": "cpu", "progress": False, "threads": a["threads"],
                        "precision": precision, "channels_last": cl},
            "output": {"dir": str(self.work / "runs"), "tensorboard": False},
        }

    def _data(self, name: str) -> Any:
        import graftkd.methods  # noqa: F401  registers the methods (the config union is built from them)
        from graftkd.config import validate_config
        from graftkd.data import build_data

        cfg = validate_config(self._raw(name), f"benchmark variant {name}")
        run_dir = self.work / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        return build_data(cfg.data, cfg.seed, run_dir)

    def _method(self, name: str) -> tuple[Any, Any, Any]:
        if name not in self.methods:
            import torch

            import graftkd.methods  # noqa: F401  registers the methods
            from graftkd.config import validate_config
            from graftkd.distributed import DistContext
            from graftkd.experiment import build_student_factory
            from graftkd.methods.base import METHODS

            cfg = validate_config(self._raw(name), f"benchmark variant {name}")
            run_dir = self.work / "runs" / name
            for f in ("soft_targets.pt", "soft_targets.json"):  # measure a fresh cache build
                (run_dir / "cache" / f).unlink(missing_ok=True)
            data = self._data(name)
            method = METHODS.get("kd")(cfg, data, build_student=build_student_factory(cfg, data.num_classes),
                                       run_dir=run_dir, device=torch.device("cpu"), dist=DistContext())
            cache = getattr(getattr(method, "targets", None), "cache", None)
            if cache is not None:
                n = len(data.train) * self.a["views"]
                self.cache_build = {"seconds": round(cache.build_seconds, 2), "images": n,
                                    "img_s": round(n / cache.build_seconds, 1), "views": self.a["views"],
                                    "built": bool(cache.built)}
            self.methods[name] = (cfg, data, method)
        return self.methods[name]

    def run(self, name: str, warmup: bool) -> dict[str, Any]:
        import torch
        from torch.utils.data import Subset

        from graftkd.engine.trainer import Trainer

        if name == "gk_data":
            return self._data_only(warmup)
        cfg, data, method = self._method(name)
        train = Subset(data.train, range(self.a["warmup_steps"] * self.a["batch_size"])) if warmup else data.train
        res = Trainer(cfg, cfg.run_dir, torch.device("cpu")).fit(method, train, data.val)
        row = res.history[-1]
        steps = len(train) // self.a["batch_size"]
        return {"seconds": float(row["epoch_time_s"]), "images": steps * self.a["batch_size"], "steps": steps,
                "trainer_img_s": row["img_s"], "train_loss": row.get("train_loss"),
                "cache_build": self.cache_build if name == "gk_cached" else None}

    def _data_only(self, warmup: bool) -> dict[str, Any]:
        from graftkd.data.loaders import EpochSampler, make_loader
        from graftkd.runtime import derived_seed

        if "gk_data" not in self.methods:
            self.methods["gk_data"] = (None, self._data("gk_data"), None)
        data = self.methods["gk_data"][1]
        bs = self.a["batch_size"]
        sampler = EpochSampler(len(data.train), derived_seed(0, 17), shuffle=True)
        loader = make_loader(data.train, bs, sampler, 0, True)
        t0, n = time.perf_counter(), 0
        for i, batch in enumerate(loader):
            n += batch["image"].shape[0]
            if warmup and i + 1 >= self.a["warmup_steps"]:
                break
        return {"seconds": time.perf_counter() - t0, "images": n, "steps": n // bs}


class TorchdistillWorker:
    """torchdistill side: a DistillationBox from a sample-style config, the example's epoch loop."""

    def __init__(self, a: dict[str, Any]) -> None:
        import torch
        import torchdistill
        from torchdistill.core.distillation import get_distillation_box
        from torchvision import transforms
        from torchvision.datasets import CIFAR100

        from graftkd.models import create_model, load_model_file

        torch.set_num_threads(a["threads"])
        self.a = a
        self.version = torchdistill.__version__
        work = Path(a["work"])

        class SyntheticCIFAR100(CIFAR100):
            """torchvision's CIFAR100 (what torchdistill's `key: CIFAR100` builds) on our synthetic
            pickles: only the md5 checks of the real download are skipped."""

            meta = {**CIFAR100.meta, "md5": None}

            def _check_integrity(self) -> bool:
                return True

        # transform_configs of the sample YAML: RandomCrop(32, 4), RandomHorizontalFlip(0.5), ToTensor, Normalize
        tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(p=0.5),
                                 transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
        self.train_set = SyntheticCIFAR100(root=str(work / "data"), train=True, download=False, transform=tf)
        teacher, _ = load_model_file(work / "teacher_resnet32x4.pt")  # the same weights as graftkd's teacher
        teacher.eval()  # torchdistill's example leaves it in train mode; eval is the correct KD setting
        torch.manual_seed(0)
        student = create_model(STUDENT, NUM_CLASSES)
        self.device = torch.device("cpu")
        train_config = {
            "log_freq": 1000000,
            "num_epochs": 1000000,
            "train_data_loader": {
                "dataset_id": "cifar100/train",
                "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
                "kwargs": {"batch_size": a["batch_size"], "num_workers": 0, "drop_last": True},
            },
            # forward_proc spelled out: torchdistill 1.1.5 raises on the implicit None key
            "teacher": {"sequential": [], "wrapper": "DataParallel", "requires_grad": False, "frozen_modules": [],
                        "forward_proc": "forward_batch_only"},
            "student": {"adaptations": None, "sequential": [], "wrapper": "DistributedDataParallel",
                        "requires_grad": True, "frozen_modules": [], "forward_proc": "forward_batch_only"},
            "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD}},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
                "criterion": {"key": "KDLoss", "kwargs": {
                    "student_module_path": ".", "student_module_io": "output",
                    "teacher_module_path": ".", "teacher_module_io": "output",
                    "temperature": TEMPERATURE, "alpha": CE_WEIGHT, "beta": KD_WEIGHT, "reduction": "batchmean"}},
                "weight": 1.0}}}},
        }
        self.box = get_distillation_box(teacher, student, {"cifar100/train": self.train_set}, train_config,
                                        self.device, None, False, 1)
        self.epoch = 0

    def run(self, name: str, warmup: bool) -> dict[str, Any]:
        if name == "td_data":
            return self._data_only(warmup)
        return self._train_one_epoch(warmup)

    def _train_one_epoch(self, warmup: bool) -> dict[str, Any]:
        """examples/torchvision/image_classification.py: pre_epoch_process + train_one_epoch."""
        import torch
        from torchdistill.misc.log import MetricLogger, SmoothedValue

        box, device = self.box, self.device
        box.pre_epoch_process(epoch=self.epoch)
        metric_logger = MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value}"))
        metric_logger.add_meter("img/s", SmoothedValue(window_size=10, fmt="{value}"))
        header = f"Epoch: [{self.epoch}]"
        t0, n, steps, loss_sum = time.perf_counter(), 0, 0, 0.0
        for sample_batch, targets, supp_dict in metric_logger.log_every(box.train_data_loader, 1000000, header):
            start_time = time.time()
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            batch_size = sample_batch.shape[0]
            metric_logger.update(loss=loss.item(), lr=box.optimizer.param_groups[0]["lr"])
            metric_logger.meters["img/s"].update(batch_size / (time.time() - start_time))
            if torch.isnan(loss) or torch.isinf(loss):
                raise ValueError(f"The training loop was broken due to loss = {loss}")
            n += batch_size
            steps += 1
            loss_sum += loss.item() * batch_size
            if warmup and steps >= self.a["warmup_steps"]:
                break
        seconds = time.perf_counter() - t0
        box.post_epoch_process()
        self.epoch += 1
        return {"seconds": seconds, "images": n, "steps": steps, "train_loss": loss_sum / max(n, 1)}

    def _data_only(self, warmup: bool) -> dict[str, Any]:
        t0, n, steps = time.perf_counter(), 0, 0
        for sample_batch, _targets, _supp in self.box.train_data_loader:
            n += sample_batch.shape[0]
            steps += 1
            if warmup and steps >= self.a["warmup_steps"]:
                break
        return {"seconds": time.perf_counter() - t0, "images": n, "steps": steps}


def worker_main(kind: str, a: dict[str, Any]) -> int:
    """JSON lines protocol on stdin/stdout: {"variant", "warmup"} -> result; EOF ends."""
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the protocol
    worker = GraftkdWorker(a) if kind == "graftkd" else TorchdistillWorker(a)
    out.write(json.dumps({"ready": True, "version": getattr(worker, "version", None)}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        res = worker.run(req["variant"], req["warmup"])
        out.write(json.dumps(res) + "\n")
        out.flush()
    return 0


class Worker:
    def __init__(self, kind: str, a: dict[str, Any], env: dict[str, str]) -> None:
        self.kind = kind
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--worker-args", json.dumps(a)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = self._read()
        self.version = hello.get("version")

    def _read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker died (exit {self.p.wait()})")
        return json.loads(line)

    def run(self, variant: str, warmup: bool) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps({"variant": variant, "warmup": warmup}) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.p.stdin:
            self.p.stdin.close()
        self.p.wait(timeout=60)


# --------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-images", type=int, default=1280)
    p.add_argument("--test-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in both (1: on a shared 2-core VM, 2 threads stall at every op barrier)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--views", type=int, default=2, help="soft-target cache views per training image")
    p.add_argument("--cached-precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--cached-cl", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last in the cached variant")
    p.add_argument("--variants", default="gk_fp32,gk_bf16_cl,gk_cached,td_fp32,gk_data,td_data",
                   help=f"comma list from {GK_VARIANTS + TD_VARIANTS + DATA_VARIANTS}")
    p.add_argument("--torchdistill-version", default="1.1.5")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_vs_torchdistill")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vs_torchdistill.json")
    p.add_argument("--worker", choices=["graftkd", "torchdistill"], help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_args))

    raw_argv = argv if argv is not None else sys.argv[1:]
    from graftkd.files import atomic_write_json
    from graftkd.study import code_revision

    command = ("python benchmarks/vs_torchdistill.py " + shlex.join(raw_argv)).strip()
    revision = code_revision()["commit"]  # now: the source the workers are about to import
    print(f"$ {command}", flush=True)
    import torch
    import torchvision

    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    td_version = ensure_torchdistill(args.torchdistill_version)
    write_synthetic_cifar100(args.work / "data", args.train_images, args.test_images)
    write_split_csv(args.work / "data" / "splits.csv", args.train_images, args.test_images)
    wa = {"work": str(args.work), "threads": args.threads, "batch_size": args.batch_size, "views": args.views,
          "warmup_steps": args.warmup_steps, "cached_precision": args.cached_precision, "cached_cl": args.cached_cl}
    names = [v for v in args.variants.split(",") if v]
    base_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t_setup = time.perf_counter()
    gk = Worker("graftkd", wa, base_env)  # writes the teacher file first
    td = Worker("torchdistill", wa, {**base_env, "PYTHONPATH": os.pathsep.join(
        [str(TD_ENV), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    log(f"workers ready in {time.perf_counter() - t_setup:.1f} s (torchdistill {td.version})")

    times: dict[str, list[float]] = {n: [] for n in names}
    img_s: dict[str, list[float]] = {n: [] for n in names}
    loads: list[float] = []
    extra: dict[str, Any] = {}
    for r in range(args.repeats + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            w = gk if name.startswith("gk_") else td
            loads.append(os.getloadavg()[0])
            res = w.run(name, warmup=(r == 0))
            loads.append(os.getloadavg()[0])
            rate = res["images"] / res["seconds"]
            if name == "gk_cached" and res.get("cache_build"):
                extra["cache_build"] = res["cache_build"]
            if r:
                times[name].append(res["seconds"])
                img_s[name].append(rate)
                extra.setdefault("steps_per_epoch", {})[name] = res["steps"]
            log(f"round {r}{' (warm-up)' if not r else ''} {name}: {res['images']} img in {res['seconds']:.2f} s "
                f"= {rate:.1f} img/s  load1={os.getloadavg()[0]:.2f}")
    gk.close()
    td.close()

    med = {n: statistics.median(v) for n, v in img_s.items() if v}

    def ratio(a: str, b: str) -> float | None:
        if a not in med or b not in med:
            return None
        return round(statistics.median(x / y for x, y in zip(img_s[a], img_s[b])), 3)

    live = [n for n in ("gk_bf16", "gk_bf16_cl") if n in med]
    best = max(live, key=lambda n: med[n]) if live else None
    result: dict[str, Any] = {
        "graftkd_img_s": round(med[best], 1) if best else None,
        "torchdistill_img_s": round(med["td_fp32"], 1) if "td_fp32" in med else None,
        "graftkd_cached_img_s": round(med["gk_cached"], 1) if "gk_cached" in med else None,
        "ratio_live": ratio(best, "td_fp32") if best else None,
        "ratio_cached": ratio("gk_cached", "td_fp32"),
        "graftkd_fp32_img_s": round(med["gk_fp32"], 1) if "gk_fp32" in med else None,
        "ratio_fp32": ratio("gk_fp32", "td_fp32"),
        "graftkd_best_settings": {"gk_bf16": "bf16 autocast", "gk_bf16_cl": "bf16 autocast + channels_last"}.get(best),
        "cache_build": extra.get("cache_build"),
        "variants_img_s": {n: round(v, 1) for n, v in med.items()},
        "ratios_vs_torchdistill": {n: ratio(n, "td_fp32") for n in med if n.startswith("gk_") and n != "gk_data"},
        "data_pipeline_ratio": ratio("gk_data", "td_data"),
        "context": {
            "command": command, "revision": revision, "torchdistill": td_version, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "teacher": TEACHER, "student": STUDENT, "num_classes": NUM_CLASSES,
            "train_images": args.train_images, "batch_size": args.batch_size, "threads": args.threads,
            "num_workers": 0, "steps_per_epoch": extra.get("steps_per_epoch"), "repeats": args.repeats,
            "warmup": f"one untimed round of {args.warmup_steps} steps per variant",
            "views": args.views, "cached_settings": {"precision": args.cached_precision, "channels_last": args.cached_cl},
            "load_average_1min": {"min": round(min(loads), 2), "median": round(statistics.median(loads), 2),
                                  "max": round(max(loads), 2)},
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "img_s_per_round": {n: [round(x, 1) for x in v] for n, v in img_s.items()},
            "seconds_per_round": {n: [round(x, 2) for x in v] for n, v in times.items()},
            "loss": f"{CE_WEIGHT} CE + {KD_WEIGHT} T^2 KL, T={TEMPERATURE}",
            "augmentation": "RandomCrop(32, padding=4) + RandomHorizontalFlip + Normalize (CIFAR-100 stats)",
            "note": "images/s of one training epoch (data + forward + backward + step, no validation); "
                    "ratios are medians of per-round ratios; variants interleaved in rotating order",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)

    label = {"td_fp32": f"torchdistill {td_version}, fp32 (documented for vision)",
             "gk_fp32": "graftkd, fp32 (like for like)", "gk_bf16": "graftkd, bf16 autocast",
             "gk_bf16_cl": "graftkd, bf16 autocast + channels_last",
             "gk_cached": f"graftkd, soft-target cache ({args.cached_precision}"
                          f"{' + channels_last' if args.cached_cl else ''}, {args.views} views)",
             "gk_data": "graftkd data pipeline only", "td_data": "torchdistill data pipeline only"}
    print(f"\nKD epoch, {TEACHER} -> {STUDENT}, {args.train_images} CIFAR-shaped images, batch {args.batch_size}, "
          f"{args.threads} threads, median of {args.repeats} interleaved rounds "
          f"(1-min load average {min(loads):.1f}-{max(loads):.1f})\n")
    print("| variant | images/s | vs torchdistill fp32 |")
    print("|---|---:|---:|")
    for n in [v for v in ["td_fp32", "gk_fp32", "gk_bf16", "gk_bf16_cl", "gk_cached", "td_data", "gk_data"] if v in med]:
        rr = ratio(n, "td_fp32") if n.startswith("gk_") and n != "gk_data" else (1.0 if n == "td_fp32" else None)
        if n == "gk_data":
            rr_s = f"{ratio('gk_data', 'td_data')} (vs torchdistill data)"
        else:
            rr_s = f"{rr:.2f}x" if rr is not None else "-"
        print(f"| {label[n]} | {med[n]:.1f} | {rr_s} |")
    if extra.get("cache_build"):
        cb = extra["cache_build"]
        print(f"\nSoft-target cache build (one-off, {cb['views']} views x {args.train_images} images): "
              f"{cb['seconds']} s ({cb['img_s']} teacher img/s)")
    print(f"\nratio_fp32={result['ratio_fp32']} ratio_live={result['ratio_live']} ratio_cached={result['ratio_cached']}"
          f"  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
