"""Predict new images with an exported model: per-image CSV and, when images have patients
(BreakHis file names or a manifest), a per-patient CSV aggregated by mean probability."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import torch

from graftkd.files import atomic_write_text
from graftkd.errors import UserError
from graftkd.export import Predictor

from graftkd.data.pixels import IMAGE_SUFFIXES


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files given directly, plus every image under given folders (recursive, sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"image or folder not found: {item}")
    if not paths:
        raise UserError(f"no images found in {', '.join(map(str, inputs))} (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def check_images(paths: Sequence[Path]) -> None:
    """Fully decode every image in worker processes first (a decoder crash marks the file bad instead
    of ending graftkd); the first bad file is a one-line error naming it."""
    from graftkd.data.datasets import verify_images

    checked = verify_images([str(p) for p in paths])
    bad = [(p, v) for p, v in checked.items() if isinstance(v, str)]
    if bad:
        more = f" ({len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise UserError(f"cannot read image {bad[0][0]}: {bad[0][1]}{more}")


def load_image(path: Path, transform: Any, stain: Any = None, side: int | None = None) -> torch.Tensor:
    """Decode as RGB by training's rule (``graftkd.data.pixels``: PIL, 16-bit and float scaled) and
    apply the card's eval transform; UserError naming the file. With ``stain`` (the card's fitted
    normaliser), the image is first resized to the base image (short side ``side``) and normalised,
    as the training pipeline does."""
    from graftkd.data.datasets import base_image, decode_file

    if stain is None:
        return transform(decode_file(str(path)))
    return transform(stain(base_image(str(path), side)))  # type: ignore[arg-type]


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/90-degree rotations of a batch (square images) or 4 (180-degree only otherwise)."""
    rots = range(4) if x.shape[-1] == x.shape[-2] else (0, 2)
    return [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in rots]


def predict_probs(model: Predictor, card: dict[str, Any], paths: Sequence[Path], tta: bool = False,
                  batch_size: int = 32) -> torch.Tensor:
    """Softmax probabilities [N, C] of the images (TTA: mean over the dihedral views)."""
    from graftkd.data.stain import STAIN_KEY, StainNormalizer
    from graftkd.data.transforms import base_side, eval_transform

    transform = eval_transform(card["image_size"], tuple(card["mean"]), tuple(card["std"]))
    check_images(paths)
    stain = StainNormalizer.from_description(card[STAIN_KEY]) if card.get(STAIN_KEY) else None
    size = card["image_size"]
    side = base_side(size if isinstance(size, int) else min(size))
    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([load_image(p, transform, stain, side) for p in paths[i:i + batch_size]])
        views = dihedral_views(x) if tta else [x]
        out.append(torch.stack([model(v).float().softmax(-1) for v in views]).mean(0))
    return torch.cat(out)


def read_manifest(path: Path) -> dict[str, str]:
    """Manifest CSV with columns ``path`` (or ``file``/``filename``) and ``group`` (or ``patient``):
    path -> group, keyed by the path as written and by its file name."""
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0]) if rows else set()
    pcol = next((c for c in ("path", "file", "filename") if c in cols), None)
    gcol = next((c for c in ("group", "patient") if c in cols), None)
    if pcol is None or gcol is None:
        raise UserError(f"{path}: needs a header with 'path' and 'group' columns, got {sorted(cols)}")
    out: dict[str, str] = {}
    for r in rows:
        out[r[pcol]] = r[gcol]
        out[Path(r[pcol]).name] = r[gcol]
    return out


def image_groups(paths: Sequence[Path], manifest: Path | None) -> tuple[list[str | None], list[int | None]]:
    """Patient and magnification of each image: from the manifest, else from BreakHis file names."""
    from graftkd.data.breakhis import parse_name

    if manifest is not None:
        table = read_manifest(manifest)
        groups = [table.get(str(p), table.get(p.name)) for p in paths]
        missing = [str(p) for p, g in zip(paths, groups) if g is None]
        if missing:
            raise UserError(f"{manifest}: no group for {len(missing)} image(s), e.g. {missing[0]}")
        return groups, [None] * len(paths)
    parsed = [parse_name(p.name) for p in paths]
    return [q.patient if q else None for q in parsed], [q.magnification if q else None for q in parsed]


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def aggregate_groups(probs: torch.Tensor, groups: Sequence[str]) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (first-appearance order): names, image counts, mean probabilities, majority-vote counts."""
    ids: dict[str, int] = {}
    gid = torch.tensor([ids.setdefault(g, len(ids)) for g in groups])
    n, c = len(ids), probs.shape[1]
    counts = torch.bincount(gid, minlength=n)
    mean = torch.zeros(n, c, dtype=probs.dtype).index_add_(0, gid, probs) / counts[:, None]
    votes = torch.zeros(n, c, dtype=torch.long).index_put_((gid, probs.argmax(1)), torch.ones(len(gid), dtype=torch.long),
                                                            accumulate=True)
    return list(ids), counts, mean, votes


def write_predictions(out: Path, paths: Sequence[Path], probs: torch.Tensor, classes: Sequence[str],
                      groups: Sequence[str | None], mags: Sequence[int | None]) -> dict[str, Path]:
    """``out``: one row per image; ``<out stem>_patients.csv`` when every image has a group."""
    conf, pred = probs.max(1)
    has_group = all(g is not None for g in groups)
    has_mag = any(m is not None for m in mags)
    header = ["path", "predicted", "confidence"] + [f"p_{c}" for c in classes]
    header += ["group"] if has_group else []
    header += ["magnification"] if has_mag else []
    rows = []
    for i, p in enumerate(paths):
        row: list[Any] = [str(p), classes[int(pred[i])], f"{float(conf[i]):.6f}"] + [f"{v:.6f}" for v in probs[i].tolist()]
        row += [groups[i]] if has_group else []
        row += ["" if mags[i] is None else mags[i]] if has_mag else []
        rows.append(row)
    written = {"images": atomic_write_text(out, _csv(header, rows))}
    if has_group:
        names, counts, mean, votes = aggregate_groups(probs, [str(g) for g in groups])
        gconf, gpred = mean.max(1)
        top = votes == votes.max(1, keepdim=True).values
        majority = torch.where(top, mean, torch.full_like(mean, -1.0)).argmax(1)  # ties: mean probability
        pheader = ["group", "n_images", "predicted", "confidence", "predicted_majority"] + [f"p_{c}" for c in classes]
        prows = [[g, int(counts[k]), classes[int(gpred[k])], f"{float(gconf[k]):.6f}", classes[int(majority[k])]]
                 + [f"{v:.6f}" for v in mean[k].tolist()] for k, g in enumerate(names)]
        written["patients"] = atomic_write_text(out.with_name(f"{out.stem}_patients.csv"), _csv(pheader, prows))
    return written
