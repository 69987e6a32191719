"""The bar of issue 13 (nothing lost, nothing leaked), checked end to end through the real CLI.

1. a small synthetic run, then ``--overwrite`` with an unknown model name: the old ``model.pt`` is
   byte-identical afterwards;
2. a failed start under a new name leaves no folder;
3. ``--nproc 2`` with a misspelt key exits 2 in at most 3 lines of output;
4. on a BreakHis-layout tree with ``SOB_M_DC-14-13412`` and ``SOB_M_LC-14-13412`` both slides are in
   the same split for split seeds 0-9.

``python benchmarks/reliability_bar.py [--keep DIR]``: prints one line per check, exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["data.source=synthetic", "data.synthetic.patients=8", "data.synthetic.images_per_patient=2",
        "data.synthetic.size=[32,32]", "data.synthetic.magnifications=[40]", "data.image_size=16",
        "data.batch_size=8", "model.name=resnet8", "trainer.epochs=1", "trainer.device=cpu", "trainer.threads=1",
        "trainer.progress=false", "output.tensorboard=false"]


def graftkd(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "graftkd", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def breakhis_tree(root: Path) -> Path:
    """The DC/LC slides of patient 13412 and four more patients per class, one 40X image each."""
    import torch
    from torchvision.io import encode_png

    slides = [("M", "ductal_carcinoma", "DC", "13412"), ("M", "lobular_carcinoma", "LC", "13412")]
    slides += [("B", sub, code, str(1000 + i)) for i, (sub, code) in enumerate(
        [("adenosis", "A"), ("fibroadenoma", "F"), ("phyllodes_tumor", "PT"), ("tubular_adenoma", "TA")])]
    slides += [("M", sub, code, str(2000 + i)) for i, (sub, code) in enumerate(
        [("ductal_carcinoma", "DC"), ("mucinous_carcinoma", "MC"), ("papillary_carcinoma", "PC"),
         ("lobular_carcinoma", "LC")])]
    for k, (letter, sub, code, pid) in enumerate(slides):
        cls = "benign" if letter == "B" else "malignant"
        folder = (root / "BreaKHis_v1/histology_slides/breast" / cls / "SOB" / sub / f"SOB_{letter}_{code}_14-{pid}"
                  / "40X")
        folder.mkdir(parents=True, exist_ok=True)
        img = torch.from_numpy(np.random.default_rng(k).integers(0, 256, (3, 24, 24), dtype=np.uint8))
        (folder / f"SOB_{letter}_{code}-14-{pid}-40-001.png").write_bytes(encode_png(img).numpy().tobytes())
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="graftkd-bar-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "bar.yaml"
    cfg.write_text("name: bar\n")
    out = [f"output.dir={work / 'runs'}"]
    results: list[tuple[str, bool, str]] = []

    t0 = time.perf_counter()
    p = graftkd("train", "-c", str(cfg), *TINY, *out, cwd=work)
    model = work / "runs" / "bar" / "model.pt"
    if p.returncode != 0 or not model.is_file():
        print(p.stderr[-2000:])
        return 1
    before = sha(model)
    results.append(("small synthetic run", True, f"{time.perf_counter() - t0:.1f} s, {model}"))

    p = graftkd("train", "-c", str(cfg), *TINY, *out, "model.name=resnet9", "--overwrite", cwd=work)
    same = sha(model) == before
    results.append(("--overwrite with model.name=resnet9 keeps model.pt byte-identical",
                    p.returncode == 2 and same, f"exit {p.returncode}, {p.stderr.strip()}"))

    p = graftkd("train", "-c", str(cfg), *TINY, *out, "model.name=resnet9", "output.name=fresh", cwd=work)
    results.append(("failed start under a new name leaves no folder",
                    p.returncode == 2 and not (work / "runs" / "fresh").exists(),
                    f"exit {p.returncode}, runs/: {sorted(x.name for x in (work / 'runs').iterdir())}"))

    p = graftkd("train", "-c", str(cfg), *TINY, *out, "--nproc", "2", "trainer.epoch=1", "output.name=ddp", cwd=work)
    lines = (p.stdout + p.stderr).strip().splitlines()
    results.append(("--nproc 2 with a misspelt key exits 2 in <= 3 lines", p.returncode == 2 and len(lines) <= 3,
                    f"exit {p.returncode}, {len(lines)} line(s): {' / '.join(lines)}"))

    sys.path.insert(0, str(SRC))
    from graftkd.config import DataConfig, SplitConfig
    from graftkd.data.build import build_data

    root = breakhis_tree(work / "breakhis")
    parts = []
    for seed in range(10):
        bundle = build_data(DataConfig(source="breakhis", root=root, image_size=16, decoded_cache="none",
                                       split=SplitConfig(seed=seed)), 0, None, work_dir=work / "runs")
        where = {r.meta["slide"]: part for part in ("train", "val", "test") for r in getattr(bundle, part).records}
        parts.append((where["SOB_M_DC-14-13412"], where["SOB_M_LC-14-13412"]))
    results.append(("SOB_M_DC-14-13412 and SOB_M_LC-14-13412 in the same split, split seeds 0-9",
                    all(a == b for a, b in parts), " ".join(f"{s}:{a}/{b}" for s, (a, b) in enumerate(parts))))

    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({detail})")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
