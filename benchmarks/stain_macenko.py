"""Why Macenko normalisation scores lower than none on the unseen centre (issue 24 item 4).

    python benchmarks/stain_macenko.py

No training: the synthetic tree of ``benchmarks/studies/stain_centres.yaml`` (3 centres; train and
validate on centres 0 and 1, test on centre 2) is decoded as the runs decode it (base images at the
runs' size), once as is and once Macenko-normalised with the runs' reference (16 training images).
Measured on those images:

- ``reference``: what the reference was fitted on (training images only) and its stain matrix.
- ``tissue``: the share of pixels Macenko counts as tissue (optical density >= beta in every
  channel) and the share of images with fewer than ``MIN_TISSUE`` such pixels, which are left
  unnormalised, per split.
- ``colour_probe``: a logistic regression on 9 colour statistics per image (mean, 90th and 99th
  percentile optical density of R, G, B), fitted on the training split: its accuracy on validation
  and on the unseen centre, and how well the same statistics tell the two training centres apart
  (a second probe, scored on validation): what colour carries about the class and the centre.
- ``h_max_auc``: how well the per-image 99th percentile of the haematoxylin concentration, which
  Macenko rescales to the reference's value in every image, separates benign from malignant
  (ROC AUC, all training images and per training centre).

Writes ``benchmarks/results/stain_macenko.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "studies" / "stain_centres.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "stain_macenko.json"


def colour_stats(img: torch.Tensor) -> np.ndarray:
    """Mean, 90th and 99th percentile optical density per RGB channel (9 values)."""
    from graftkd.data.stain import optical_density

    od = optical_density(img).numpy()
    return np.concatenate([od.mean(0), np.percentile(od, 90, axis=0), np.percentile(od, 99, axis=0)])


def main(argv: list[str] | None = None) -> int:
    import graftkd.methods  # noqa: F401  (registers the method configs)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from graftkd.config import validate_config
    from graftkd.data import build_data
    from graftkd.data.stain import MIN_TISSUE, macenko_stains, tissue_pixels
    from graftkd.files import atomic_write_json
    from graftkd.study import code_revision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("runs/stain/data"), help="the study's synthetic tree")
    p.add_argument("--work", type=Path, default=Path("runs/stain/probe"), help="decoded-cache folder")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = {**yaml.safe_load(STUDY.read_text())["data"], "root": str(args.root)}
    splits = ("train", "val", "test")
    bundles = {}
    for variant, extra in (("none", {}), ("macenko", {"stain_norm": {"method": "macenko"}})):
        cfg = validate_config({"name": "probe", "data": {**data, **extra}, "model": {"name": "resnet8"},
                               "output": {"dir": str(args.work)}})
        bundles[variant] = build_data(cfg.data, 0, work_dir=args.work)
    records = {s: getattr(bundles["none"], s).records for s in splits}
    labels = {s: np.array([r.label for r in records[s]]) for s in splits}
    centres = {s: np.array([r.meta["centre"] for r in records[s]]) for s in splits}
    images = {v: {s: [getattr(b, s).base(i) for i in range(len(getattr(b, s)))] for s in splits}
              for v, b in bundles.items()}
    ref = bundles["macenko"].info["stain_norm"]
    out: dict = {"reference": {"fitted_on_training_images_only": set(ref["fitted_on"]["images"]) <= {
                     str(Path(r.path).relative_to(args.root)) for r in records["train"]} | {
                     r.path for r in records["train"]},
                               "images": ref["fitted_on"]["training_sample"], "stain_matrix": ref["params"]["stain_matrix"],
                               "max_concentrations": ref["params"]["max_concentrations"]},
                 "centres": {s: sorted(set(centres[s].tolist())) for s in splits},
                 "images": {s: len(records[s]) for s in splits}}
    n_px = images["none"]["train"][0].shape[1] * images["none"]["train"][0].shape[2]
    tissue = {}
    for s in splits:
        t = np.array([tissue_pixels(im) for im in images["none"][s]])
        tissue[s] = {"pixel_share": round(float((t / n_px).mean()), 4),
                     "images_left_unnormalised": round(float((t < MIN_TISSUE).mean()), 4)}
    out["tissue"] = {"min_tissue_pixels": MIN_TISSUE, "base_pixels": n_px, **tissue}
    probe = {}
    for v in bundles:
        X = {s: np.stack([colour_stats(im) for im in images[v][s]]) for s in splits}
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X["train"], labels["train"])
        cen = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X["train"], centres["train"])
        probe[v] = {"class_val_acc": round(clf.score(X["val"], labels["val"]), 4),
                    "class_unseen_centre_acc": round(clf.score(X["test"], labels["test"]), 4),
                    "centre_val_acc": round(cen.score(X["val"], centres["val"]), 4)}
    out["colour_probe"] = probe
    h_max, ok = [], []
    for im in images["none"]["train"]:
        good = tissue_pixels(im) >= MIN_TISSUE
        ok.append(good)
        h_max.append(float(macenko_stains(im)[2][0]) if good else np.nan)
    h, y, c, ok = np.array(h_max), labels["train"], centres["train"], np.array(ok)
    out["h_max_auc"] = {"all_training": round(float(roc_auc_score(y[ok], h[ok])), 4),
                        **{f"centre_{k}": round(float(roc_auc_score(y[ok & (c == k)], h[ok & (c == k)])), 4)
                           for k in sorted(set(c.tolist()))}}
    out.update(data=data, classes=list(bundles["none"].classes), revision=code_revision()["commit"],
               command=" ".join(["python benchmarks/stain_macenko.py", *(argv if argv is not None else sys.argv[1:])]),
               load_avg_1m=round(os.getloadavg()[0], 2))
    atomic_write_json(args.out, out)
    print({k: out[k] for k in ("reference", "tissue", "colour_probe", "h_max_auc")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
