"""Synthetic H&E-like histology in the BreakHis layout and naming (the embedded default data).

Images are composed in optical-density space (Beer-Lambert with Ruifrok H&E stain vectors): pink
eosin stroma with fibrous texture, white lumina, pale mucin pools, and purple hematoxylin nuclei
rendered as soft, irregular ellipses with chromatin speckle. Per subtype the nuclear coverage,
size, pleomorphism, boundary irregularity, elongation, staining and arrangement (glands, single
files, scattered) differ; every patient draws its own offsets of all of these and of the stain
vectors, so patients of different classes overlap and patient-level splits matter.
With ``centres`` > 1, patients come from that many centres (round-robin within each subtype), each
with its own stain vectors and stain intensity on top of the patients' own: a stain shift between
labs that ``split.kind: centre`` tests on (``synthetic.json`` lists every patient's centre).
Deterministic for (config, seed): all randomness comes from numpy generators seeded per patient.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn
from torchvision.io import encode_png

from graftkd.config import SyntheticConfig
from graftkd.data.breakhis import SUBTYPES
from graftkd.files import atomic_write_json
from graftkd.errors import UserError

GENERATOR_VERSION = 1
CODES = list(SUBTYPES)  # A F PT TA DC LC MC PC
MAG_SCALE = {40: 1.0, 100: 1.5, 200: 2.2, 400: 3.2}
PID_SUFFIXES = ["AB", "", "CD", "", "EF", "A", "", "B"]
H_VEC = np.array([0.650, 0.704, 0.286])
E_VEC = np.array([0.072, 0.990, 0.105])

# per subtype: coverage (nuclear area fraction), radius (px at 40X, 128 px wide), pleomorphism (log sd),
# irregularity (boundary harmonics), elongation (axis ratio), hyper (hematoxylin), ring (fraction on
# glands), line (fraction in single files), lumen (white area), mucin (pale area), stroma (eosin)
SUBTYPE_PARAMS: dict[str, dict[str, float]] = {
    "A":  dict(coverage=0.13, radius=1.55, pleo=0.10, irregular=0.05, elong=1.25, hyper=0.95, ring=0.70, line=0.0, lumen=0.14, mucin=0.0, stroma=0.60),
    "F":  dict(coverage=0.11, radius=1.50, pleo=0.10, irregular=0.05, elong=1.70, hyper=0.90, ring=0.35, line=0.0, lumen=0.05, mucin=0.0, stroma=0.75),
    "PT": dict(coverage=0.15, radius=1.65, pleo=0.14, irregular=0.07, elong=2.00, hyper=1.00, ring=0.15, line=0.0, lumen=0.04, mucin=0.0, stroma=0.80),
    "TA": dict(coverage=0.14, radius=1.55, pleo=0.10, irregular=0.05, elong=1.20, hyper=0.95, ring=0.80, line=0.0, lumen=0.18, mucin=0.0, stroma=0.55),
    "DC": dict(coverage=0.20, radius=1.95, pleo=0.26, irregular=0.14, elong=1.30, hyper=1.15, ring=0.30, line=0.0, lumen=0.06, mucin=0.0, stroma=0.55),
    "LC": dict(coverage=0.17, radius=1.80, pleo=0.20, irregular=0.10, elong=1.25, hyper=1.10, ring=0.00, line=0.60, lumen=0.03, mucin=0.0, stroma=0.70),
    "MC": dict(coverage=0.16, radius=1.90, pleo=0.24, irregular=0.12, elong=1.30, hyper=1.10, ring=0.10, line=0.0, lumen=0.03, mucin=0.40, stroma=0.50),
    "PC": dict(coverage=0.19, radius=1.95, pleo=0.24, irregular=0.13, elong=1.45, hyper=1.15, ring=0.50, line=0.0, lumen=0.10, mucin=0.0, stroma=0.55),
}
# per-patient log-normal spread of each parameter (what makes patients differ within a subtype)
PATIENT_SD = dict(coverage=0.30, radius=0.13, pleo=0.35, irregular=0.35, elong=0.12, hyper=0.12, ring=0.30,
                  line=0.30, lumen=0.40, mucin=0.25, stroma=0.18)
IMAGE_SD = 0.08


def tree_key(cfg: SyntheticConfig) -> str:
    """Short hash of the synthetic config and generator version (the cache folder name)."""
    unset = ({"images_per_patient_max"} if cfg.images_per_patient_max is None else set()) | (
        {"centres", "centre_stain_sd"} if cfg.centres == 1 else set())
    fields = cfg.model_dump(mode="json", exclude=unset or None)
    blob = json.dumps({"v": GENERATOR_VERSION, **fields}, sort_keys=True)  # keys of older trees unchanged
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def patient_ids(n: int, seed: int) -> list[str]:
    """Distinct BreakHis-style slide ids with the real quirks: ``13412``, ``22549AB``, ``16184CD``."""
    return [f"{10000 + (i * 7919 + seed * 104729) % 89999}{PID_SUFFIXES[i % len(PID_SUFFIXES)]}" for i in range(n)]


def _noise(rng: np.random.Generator, b: int, h: int, w: int, cell: float) -> torch.Tensor:
    """Smooth noise in [0, 1]: uniform values on a coarse grid (cell px), bicubic upsampled. (b, h, w)."""
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    g = torch.from_numpy(rng.random((b, 1, gh, gw), dtype=np.float32))
    up = Fn.interpolate(g, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    return up.clamp(0, 1)


def _quantile_mask(field: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Per image, 1 where ``field`` is in its top ``frac`` fraction (soft edge)."""
    b = field.shape[0]
    q = torch.quantile(field.reshape(b, -1)[:, ::7], (1 - frac.clamp(0, 0.95)).float(), dim=1)
    thr = q.diagonal().view(b, 1, 1)
    return torch.sigmoid((field - thr) * 60) * (frac.view(b, 1, 1) > 1e-3)


def _f32(a: np.ndarray | float) -> torch.Tensor:
    """float32 tensor from a numpy array."""
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def render(params: dict[str, np.ndarray], size: tuple[int, int], mag: int, rng: np.random.Generator) -> torch.Tensor:
    """Render a batch of images (uint8, B x 3 x H x W) from per-image parameters (arrays of length B)."""
    w, h = size
    b = len(params["coverage"])
    s = MAG_SCALE[mag] * w / 128.0
    # ---- tissue: stroma texture, lumina (partly around gland centres), mucin pools
    fibres = 0.55 * _noise(rng, b, h, w, 10 * s) + 0.45 * _noise(rng, b, h, w, 3 * s)
    stroma = torch.from_numpy(params["stroma"].astype(np.float32)).view(b, 1, 1) * (0.55 + 0.75 * fibres)
    n_glands = 4
    gc = torch.from_numpy(rng.random((b, n_glands, 2), dtype=np.float32)) * torch.tensor([w, h])
    g_rad = torch.from_numpy((rng.uniform(9, 15, (b, n_glands)) * s).astype(np.float32))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    d = torch.sqrt((xx[None, None] - gc[..., 0, None, None]) ** 2 + (yy[None, None] - gc[..., 1, None, None]) ** 2)
    ring = torch.from_numpy(params["ring"].astype(np.float32)).view(b, 1, 1, 1)
    lumen_glands = (torch.sigmoid((0.55 * g_rad[..., None, None] - d) * 0.8) * (ring > 0.05)).amax(1)
    lumen_free = _quantile_mask(_noise(rng, b, h, w, 20 * s), torch.from_numpy(params["lumen"].astype(np.float32)))
    lumen = torch.maximum(lumen_glands, lumen_free)
    mucin = _quantile_mask(_noise(rng, b, h, w, 28 * s), torch.from_numpy(params["mucin"].astype(np.float32)))
    eosin = stroma * (1 - lumen) * (1 - 0.8 * mucin)
    hema = 0.05 + 0.22 * mucin * (1 - lumen)

    # ---- nuclei: counts from coverage, positions scattered / on gland rings / in single files
    radius = params["radius"] * s
    counts = np.minimum(np.rint(params["coverage"] * (1 - params["lumen"]) * w * h / (np.pi * radius ** 2)), 2000).astype(int)
    img = np.repeat(np.arange(b), counts)
    n = len(img)
    mode = rng.random(n)
    ring_p, line_p = params["ring"][img], params["line"][img]
    xy = rng.random((n, 2)) * np.array([w, h])
    on_ring = mode < ring_p
    k = rng.integers(0, n_glands, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    rr = g_rad.numpy()[img, k] * rng.normal(0.62, 0.06, n)
    cen = gc.numpy()[img, k]
    xy[on_ring] = (cen + rr[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1))[on_ring]
    on_line = (~on_ring) & (mode < ring_p + line_p)
    line_k = rng.integers(0, 3, n)
    l_ang = rng.uniform(0, np.pi, (b, 3))[img, line_k]
    l_off = rng.random((b, 3, 2))[img, line_k] * np.array([w, h])
    t = rng.uniform(-1, 1, n) * max(w, h)
    along = l_off + t[:, None] * np.stack([np.cos(l_ang), np.sin(l_ang)], 1) + rng.normal(0, radius[img] * 0.4)[:, None]
    xy[on_line] = np.mod(along, [w, h])[on_line]
    r = radius[img] * np.exp(rng.normal(0, params["pleo"][img]))
    elong = params["elong"][img] * np.exp(rng.normal(0, 0.12, n))
    a_ax, b_ax = r * np.sqrt(elong), r / np.sqrt(elong)
    theta = np.where(on_ring, ang + np.pi / 2, np.where(on_line, l_ang, rng.uniform(0, np.pi, n)))
    harm = rng.normal(0, 1, (n, 2)) * params["irregular"][img, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 2))
    dark = params["hyper"][img] * np.exp(rng.normal(0, 0.15, n))

    R = int(min(np.ceil((a_ax.max(initial=1.0)) * 1.5) + 1, 0.5 * min(w, h)))
    off = torch.arange(-R, R + 1, dtype=torch.float32)
    cx, cy = _f32(xy[:, 0]), _f32(xy[:, 1])
    px = (cx.round()[:, None, None] + off[None, None, :]).expand(n, 2 * R + 1, 2 * R + 1)
    py = (cy.round()[:, None, None] + off[None, :, None]).expand(n, 2 * R + 1, 2 * R + 1)
    lx, ly = px - cx[:, None, None], py - cy[:, None, None]
    ct, st = torch.cos(_f32(theta))[:, None, None], torch.sin(_f32(theta))[:, None, None]
    u = (lx * ct + ly * st) / _f32(a_ax)[:, None, None]
    v = (-lx * st + ly * ct) / _f32(b_ax)[:, None, None]
    rho = torch.sqrt(u * u + v * v).clamp_min(1e-6)
    c1, s1 = u / rho, v / rho  # cos and sin of the polar angle: boundary harmonics 2, 3 without atan2
    c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
    c3, s3 = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2
    hm, ph = _f32(harm), _f32(phase)
    edge = 1.0
    for j, (ck, sk) in enumerate(((c2, s2), (c3, s3))):
        amp_c = (hm[:, j] * torch.cos(ph[:, j]))[:, None, None]
        amp_s = (hm[:, j] * torch.sin(ph[:, j]))[:, None, None]
        edge = edge + amp_c * ck - amp_s * sk
    sharp = (_f32(b_ax) / 0.7)[:, None, None]
    speckle = 0.75 + 0.5 * _f32(rng.random((n, 2 * R + 1, 2 * R + 1), dtype=np.float32))
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    val = torch.sigmoid((edge - rho) * sharp) * (_f32(dark)[:, None, None] * speckle * inside)
    flat = (_f32(img)[:, None, None].long() * (h * w) + py.clamp(0, h - 1).long() * w + px.clamp(0, w - 1).long())
    nuclei = torch.zeros(b * h * w).scatter_reduce_(0, flat.reshape(-1), val.reshape(-1), "amax").view(b, h, w)
    hema = hema + 1.25 * nuclei
    eosin = eosin * (1 - 0.6 * nuclei.clamp(max=1)) + 0.12 * nuclei

    # ---- colour: per-image stain vectors, Beer-Lambert, sensor noise
    hv = _f32(params["h_vec"]).view(b, 3, 1, 1)
    ev = _f32(params["e_vec"]).view(b, 3, 1, 1)
    od = hema[:, None] * hv + eosin[:, None] * ev
    rgb = 255 * torch.exp(-od * 1.1) + _f32(rng.normal(0, 2.0, (b, 3, h, w)))
    return rgb.clamp(0, 255).round().to(torch.uint8)


def patient_params(code: str, rng: np.random.Generator) -> dict[str, float | np.ndarray]:
    """A patient's parameters: the subtype's values with a log-normal patient offset, and stain vectors."""
    base = SUBTYPE_PARAMS[code]
    p: dict[str, float | np.ndarray] = {k: base[k] * float(np.exp(rng.normal(0, PATIENT_SD[k]))) for k in base}
    p["lumen"], p["mucin"] = min(float(p["lumen"]), 0.5), min(float(p["mucin"]), 0.7)
    p["ring"] = min(float(p["ring"]), 0.9)
    p["line"] = min(float(p["line"]), 0.9 - float(p["ring"]))
    for name, vec in (("h_vec", H_VEC), ("e_vec", E_VEC)):
        jittered = vec * np.exp(rng.normal(0, 0.10, 3)) * float(np.exp(rng.normal(0, 0.12)))
        p[name] = jittered / np.linalg.norm(jittered) * np.linalg.norm(vec) * float(np.exp(rng.normal(0, 0.1)))
    return p


def image_params(pp: dict[str, float | np.ndarray], count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``count`` images of one patient: the patient's parameters with a small per-image spread."""
    out: dict[str, np.ndarray] = {}
    for k, v in pp.items():
        if isinstance(v, np.ndarray):
            out[k] = np.repeat(v[None], count, 0) * np.exp(rng.normal(0, IMAGE_SD / 2, (count, 3)))
        else:
            out[k] = v * np.exp(rng.normal(0, IMAGE_SD, count))
    return out


def centre_of(i: int, centres: int) -> int:
    """Centre of patient i: round-robin within its subtype (patients are dealt to subtypes round-robin)."""
    return (i // len(CODES)) % centres


def centre_stain(cfg: SyntheticConfig, centre: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A centre's multipliers of the haematoxylin and eosin vectors (per RGB channel) and of the
    stain intensity (optical density), from its own generator (patients' draws do not change)."""
    rng = np.random.default_rng([cfg.seed, 0xCE, centre])
    sd = cfg.centre_stain_sd
    return np.exp(rng.normal(0, sd, 3)), np.exp(rng.normal(0, sd, 3)), float(np.exp(rng.normal(0, sd)))


def images_of_patient(cfg: SyntheticConfig, i: int) -> int:
    """Images per magnification of patient i: fixed, or drawn from its own generator (so the other
    draws of a patient do not change with the option)."""
    if cfg.images_per_patient_max is None:
        return cfg.images_per_patient
    return int(np.random.default_rng([cfg.seed, i, 0xC0]).integers(cfg.images_per_patient,
                                                                    cfg.images_per_patient_max + 1))


def generate_tree(out: Path, cfg: SyntheticConfig) -> dict:
    """Write the synthetic tree under ``out`` (must not exist or be empty) atomically; returns its manifest.

    Layout: ``out/BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/SOB_<B|M>_<code>_14-<id>/<mag>X/
    SOB_<B|M>_<code>-14-<id>-<mag>-<seq>.png``. Patients are assigned to the 8 subtypes round-robin.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; choose a new folder for the synthetic tree")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose a new folder for the synthetic tree")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    width, height = cfg.size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster and does not fight DataLoader workers
    try:
        counts = {c: 0 for c in CODES}
        centres: dict[str, int] = {}
        for i, pid in enumerate(patient_ids(cfg.patients, cfg.seed)):
            code = CODES[i % len(CODES)]
            subtype, tumor_class = SUBTYPES[code]
            letter = tumor_class[0].upper()
            rng = np.random.default_rng([cfg.seed, i])
            pp = patient_params(code, rng)
            if cfg.centres > 1:
                c = centres[f"SOB_{letter}_{code}_14-{pid}"] = centre_of(i, cfg.centres)
                h_mul, e_mul, intensity = centre_stain(cfg, c)
                pp["h_vec"] = pp["h_vec"] * h_mul * intensity  # type: ignore[operator]
                pp["e_vec"] = pp["e_vec"] * e_mul * intensity  # type: ignore[operator]
            patient_dir = (stage / "BreaKHis_v1/histology_slides/breast" / tumor_class / "SOB" / subtype
                           / f"SOB_{letter}_{code}_14-{pid}")
            count = images_of_patient(cfg, i)
            for mag in cfg.magnifications:
                mrng = np.random.default_rng([cfg.seed, i, mag])
                imgs = render(image_params(pp, count, mrng), (width, height), mag, mrng)
                folder = patient_dir / f"{mag}X"
                folder.mkdir(parents=True, exist_ok=True)
                for j in range(len(imgs)):
                    data = encode_png(imgs[j]).numpy().tobytes()
                    (folder / f"SOB_{letter}_{code}-14-{pid}-{mag}-{j + 1:03d}.png").write_bytes(data)
                counts[code] += len(imgs)
        manifest = {"generator_version": GENERATOR_VERSION, "config": cfg.model_dump(mode="json"),
                    "images": sum(counts.values()), "patients": cfg.patients, "images_per_subtype": counts,
                    **({"centres": centres} if cfg.centres > 1 else {})}
        atomic_write_json(stage / "synthetic.json", manifest)
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return manifest


def ensure_tree(out: Path, cfg: SyntheticConfig) -> Path:
    """Generate the tree at ``out`` unless a complete one (with ``synthetic.json``) is there already."""
    out = Path(out)
    if (out / "synthetic.json").is_file():
        return out
    try:
        generate_tree(out, cfg)
    except OSError:
        if not (out / "synthetic.json").is_file():  # lost a race to a concurrent generator: that is fine
            raise
    return out


def record_centres(root: Path, records: list) -> list:
    """Records with ``meta['centre']`` (the centre id as text) from the tree's ``synthetic.json``,
    keyed by the patient folder; unchanged when the tree has one centre."""
    import dataclasses

    manifest = json.loads((Path(root) / "synthetic.json").read_text())
    table = manifest.get("centres")
    if not table:
        return records
    return [dataclasses.replace(r, meta={**r.meta, "centre": str(table[Path(r.path).parents[1].name])})
            for r in records]


def run_synth(args: argparse.Namespace) -> int:
    """``graftkd synth OUT ...``: write the tree and print what was written."""
    from pydantic import ValidationError

    try:
        given = {k: getattr(args, k) for k in ("patients", "images_per_patient", "images_per_patient_max", "size",
                                               "magnifications", "seed", "centres")}
        cfg = SyntheticConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise UserError("; ".join(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}"
                                  for err in e.errors())) from None
    manifest = generate_tree(args.out, cfg)
    print(f"wrote {manifest['images']} images of {cfg.patients} patients ({cfg.size[0]}x{cfg.size[1]}, "
          f"magnifications {', '.join(map(str, cfg.magnifications))}) to {args.out}")
    return 0
