"""Synthetic centres and the split by centre; the unlabelled transfer set (``data.unlabeled``) and
its patient rules; the unlabelled stream the trainer joins to every batch."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from graftkd.config import DataConfig, SyntheticConfig
from graftkd.data import build_data
from graftkd.data.loaders import UnlabeledStream, join_batches
from graftkd.data.synthetic import generate_tree, tree_key
from graftkd.errors import UserError

SYN = dict(patients=24, images_per_patient=2, size=(32, 32), magnifications=[40], seed=0)


def test_one_centre_keeps_the_tree_keys_of_older_versions():
    # keys written by the generator before centres existed (a changed key would regenerate every tree)
    assert tree_key(SyntheticConfig()) == "6969037eda38"
    assert tree_key(SyntheticConfig(patients=8, images_per_patient=2, size=(24, 24), magnifications=[40],
                                    images_per_patient_max=3)) == "88eeff7b6726"
    assert tree_key(SyntheticConfig(centres=3)) != "6969037eda38"


def test_centres_change_only_the_stain(tmp_path):
    one = generate_tree(tmp_path / "one", SyntheticConfig(**SYN))
    three = generate_tree(tmp_path / "three", SyntheticConfig(**SYN, centres=3))
    assert "centres" not in one and sorted(set(three["centres"].values())) == [0, 1, 2]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "three") for p in (tmp_path / "three").rglob("*.png"))
    from torchvision.io import read_image

    def mean_colour(root: Path, centre: int) -> torch.Tensor:
        imgs = [read_image(str(root / f)).float() for f in files if three["centres"][f.parts[-3]] == centre]
        return torch.stack([i.mean((1, 2)) for i in imgs]).mean(0)

    # each centre's own stain moves its mean colour away from the one-centre tree's
    shifts = [(mean_colour(tmp_path / "three", c) - mean_colour(tmp_path / "one", c)).abs().max() for c in range(3)]
    assert all(s > 2 for s in shifts), shifts


def test_split_by_centre_tests_on_the_unseen_centre(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(**SYN, centres=3), image_size=16,
                     split={"kind": "centre", "test_centres": ["2"], "val_fraction": 0.25})
    data = build_data(cfg, 0, tmp_path / "run", work_dir=tmp_path)
    centre = {s: {r.meta["centre"] for r in getattr(data, s).records} for s in ("train", "val", "test")}
    assert centre == {"train": {"0", "1"}, "val": {"0", "1"}, "test": {"2"}}
    assert len(data.test) == 8 * 2 and data.info["split"]["test_centres"] == ["2"]
    with pytest.raises(UserError, match="'5' not among the data's centres"):
        build_data(cfg.model_copy(update={"split": cfg.split.model_copy(update={"test_centres": ["5"]})}), 0,
                   work_dir=tmp_path)
    with pytest.raises(UserError, match="has no centre"):
        build_data(DataConfig(synthetic=SyntheticConfig(**SYN), split=cfg.split), 0, work_dir=tmp_path)
    with pytest.raises(ValueError, match="needs split.test_centres"):
        DataConfig(split={"kind": "centre"})


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"synthetic": SyntheticConfig(**{**SYN, "images_per_patient": 3}), "image_size": 16, "shots": 2,
                         **kw})


def test_train_rest_is_the_unlabelled_rest_of_the_training_split(tmp_path):
    data = build_data(_cfg(unlabeled="train_rest"), 0, work_dir=tmp_path)
    full = build_data(_cfg(shots=None), 0, work_dir=tmp_path)
    labelled = {r.path for r in data.train.records}
    pool = {r.path for r in data.unlabeled.records}
    assert pool | labelled == {r.path for r in full.train.records} and not pool & labelled
    held_out = {r.group for s in (data.val, data.test) for r in s.records}
    assert not {r.group for r in data.unlabeled.records} & held_out
    assert all(r.label == -1 for r in data.unlabeled.records)
    item = data.unlabeled[0]
    assert item["label"] == -1 and item["index"] == len(data.train)  # after the training set's indices
    assert data.info["unlabeled"] == {"source": "train_rest", "images": len(pool),
                                      "patients": len({r.group for r in data.unlabeled.records})}
    with pytest.raises(UserError, match="every training image is labelled"):
        build_data(_cfg(shots=None, unlabeled="train_rest"), 0, work_dir=tmp_path)


def test_a_folder_or_csv_never_brings_images_of_validation_or_test_patients(tmp_path):
    data = build_data(_cfg(), 0, work_dir=tmp_path)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    val, test, train = data.val.records[0], data.test.records[0], data.train.records[0]
    for r in (val, test, train):  # BreakHis names: the file name names the patient
        shutil.copy(r.path, folder / Path(r.path).name)
    other = data.val.records[1]  # another image of a validation patient, renamed: caught by its group in a CSV
    shutil.copy(other.path, folder / "renamed.png")
    rest = [r for r in build_data(_cfg(shots=None), 0, work_dir=tmp_path).train.records
            if r.path not in {x.path for x in data.train.records}]
    shutil.copy(rest[0].path, folder / Path(rest[0].path).name)
    got = build_data(_cfg(unlabeled=str(folder)), 0, work_dir=tmp_path)
    names = sorted(Path(r.path).name for r in got.unlabeled.records)
    # renamed.png has no patient in its name: it is its own group, kept (a CSV with groups catches it); a
    # copy of a labelled training image is another file of a training patient: allowed
    assert names == sorted([Path(rest[0].path).name, Path(train.path).name, "renamed.png"])
    assert got.info["unlabeled"]["excluded_val_test"] == 2 and got.info["unlabeled"]["excluded_labelled"] == 0

    manifest = tmp_path / "unlabelled.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "group"])
        w.writerow(["unlabelled/renamed.png", other.group])
        w.writerow([f"unlabelled/{Path(rest[0].path).name}", rest[0].group])
        w.writerow([test.path, "someone"])  # the file itself is a test image
        w.writerow([train.path, "someone else"])  # a labelled image is not unlabelled
    got = build_data(_cfg(unlabeled=str(manifest)), 0, work_dir=tmp_path)
    assert [Path(r.path).name for r in got.unlabeled.records] == [Path(rest[0].path).name]
    assert got.info["unlabeled"]["excluded_val_test"] == 2 and got.info["unlabeled"]["excluded_labelled"] == 1
    with pytest.raises(UserError, match="neither 'train_rest', a folder nor a CSV"):
        build_data(_cfg(unlabeled=str(tmp_path / "missing")), 0, work_dir=tmp_path)


def test_unlabelled_stream_is_a_function_of_phase_epoch_and_step(tmp_path):
    data = build_data(_cfg(unlabeled="train_rest"), 0, work_dir=tmp_path)
    n = len(data.unlabeled)

    def take(epoch: int, steps: int) -> list[dict]:
        stream = UnlabeledStream(data.unlabeled, 4, seed=3, num_workers=0)
        stream.start(0, epoch, epoch)
        return [stream.next() for _ in range(steps)]

    steps = n // 4 + 2  # past the end of one pass: a new permutation follows
    a, b = take(1, steps), take(1, steps)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"]) for x, y in zip(a, b))
    first_pass = torch.cat([x["index"] for x in a[: n // 4]])
    assert len(set(first_pass.tolist())) == len(first_pass)  # without replacement within a pass
    assert not all(torch.equal(x["index"], y["index"]) for x, y in zip(a, take(2, steps)))
    labelled = torch.utils.data.default_collate([data.train[i] for i in range(2)])
    joined = join_batches(labelled, a[0])
    assert joined["image"].shape[0] == 6 and joined["labeled"].tolist() == [True, True] + [False] * 4
    assert joined["label"][2:].eq(-1).all() and joined["index"][2:].ge(len(data.train)).all()


def test_stain_normalised_images_are_what_the_cache_holds(tmp_path):
    cfg = _cfg(stain_norm={"method": "macenko", "sample": 4}, decoded_cache="mmap")
    data = build_data(cfg, 0, work_dir=tmp_path)
    plain = build_data(_cfg(decoded_cache="mmap"), 0, work_dir=tmp_path)
    assert data.info["stain_norm"]["method"] == "macenko" and len(data.info["stain_norm"]["fitted_on"]["images"]) == 4
    a, b = data.test.base(0), plain.test.base(0)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert torch.equal(a, data.stain(plain.test.base(0)))
    again = build_data(cfg, 0, work_dir=tmp_path)  # the mmap cache (keyed by the normaliser) gives the same
    assert torch.equal(again.test.base(0), a)
    assert json.dumps(data.info["stain_norm"])  # plain JSON (run folder, model file, card)
