"""The bars of issues 13 (nothing lost, nothing leaked) and 21 (ownership, decoding, truthful run
folders, one writer), checked end to end through the real CLI.

1. a small synthetic run, then ``--overwrite`` with an unknown model name: the old ``model.pt`` is
   byte-identical afterwards;
2. a failed start under a new name leaves no folder;
3. ``--nproc 2`` with a misspelt key exits 2 in at most 3 lines of output;
4. on a BreakHis-layout tree with ``SOB_M_DC-14-13412`` and ``SOB_M_LC-14-13412`` both slides are in
   the same split for split seeds 0-9;
5. (issue 21) with two finished runs in one output.dir, ``output.name=. --overwrite`` exits non-zero and
   both runs stay byte-identical (every file hashed);
6. a PNG with one byte flipped inside its image data: exit 2 and one line (no signal);
7. ``--resume`` with a changed ``optimizer.lr`` exits 2 and leaves ``config.yaml`` byte-identical;
8. of two ``train`` processes started together on one ``output.name``, one exits 2 naming the other's PID.

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


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_idat_byte(path: Path) -> None:
    """Flip one byte in the middle of the first IDAT chunk's data."""
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    data[at + 4 + length // 2] ^= 0x20
    path.write_bytes(bytes(data))


def issue21(work: Path, cfg: Path) -> list[tuple[str, bool, str]]:
    """The issue-21 bar: ownership, decoding, truthful resume, one writer."""
    results: list[tuple[str, bool, str]] = []
    out = [f"output.dir={work / 'runs21'}"]
    for name in ("first", "second"):
        p = graftkd("train", "-c", str(cfg), *TINY, *out, f"output.name={name}", cwd=work)
        if p.returncode != 0:
            return [(f"issue 21: finished run {name}", False, p.stderr[-500:])]
    runs = {n: work / "runs21" / n for n in ("first", "second")}
    before = {n: tree_hashes(d) for n, d in runs.items()}
    p = graftkd("train", "-c", str(cfg), *TINY, *out, "output.name=.", "--overwrite", cwd=work)
    same = all(tree_hashes(d) == before[n] for n, d in runs.items())
    results.append(("output.name=. --overwrite exits non-zero, both finished runs byte-identical",
                    p.returncode != 0 and same, f"exit {p.returncode}, {p.stderr.strip()}"))

    tree = work / "flipped"
    rng = np.random.default_rng(0)
    import torch
    from torchvision.io import encode_png
    for c in ("benign", "malignant"):
        (tree / c).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            img = torch.from_numpy(rng.integers(0, 256, (3, 24, 24), dtype=np.uint8))
            (tree / c / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    flip_idat_byte(tree / "benign" / "0.png")
    p = graftkd("train", "-c", str(cfg), *TINY, *out, "data.source=folder", f"data.root={tree}",
                "output.name=flipped", cwd=work)
    lines = p.stderr.strip().splitlines()
    results.append(("a PNG with one byte flipped in its image data: exit 2, one line, no signal",
                    p.returncode == 2 and len(lines) == 1 and not (work / "runs21" / "flipped").exists(),
                    f"exit {p.returncode}, {' / '.join(lines)}"))

    config = runs["first"] / "config.yaml"
    before_cfg = config.read_bytes()
    p = graftkd("train", "-c", str(cfg), *TINY, *out, "output.name=first", "optimizer.lr=0.1", "--resume", cwd=work)
    results.append(("--resume with a changed optimizer.lr exits 2, config.yaml byte-identical",
                    p.returncode == 2 and config.read_bytes() == before_cfg and tree_hashes(runs["first"]) == before["first"],
                    f"exit {p.returncode}, {p.stderr.strip()}"))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "graftkd", "train", "-c", str(cfg), *TINY, *out, "output.name=race", "trainer.epochs=6"]
    procs = [subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    ends = [(q.pid, q.wait(timeout=600), q.stderr.read()) for q in procs]
    for q in procs:
        q.stdout.close()
        q.stderr.close()
    codes = sorted(rc for _, rc, _ in ends)
    loser = [e for e in ends if e[1] == 2]
    winner = [e for e in ends if e[1] == 0]
    ok = codes == [0, 2] and f"PID {winner[0][0]}" in loser[0][2] and len(loser[0][2].strip().splitlines()) == 1
    results.append(("two train processes on one output.name: one exits 2 naming the other's PID", ok,
                    f"exits {[rc for _, rc, _ in ends]}, " + " / ".join(e[2].strip()[-300:] for e in loser)))
    return results


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

    results += issue21(work, cfg)
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({detail})")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
