"""Datasets: item format, replayable views (workers 0 and 2), caches, bad images, few-shot."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from graftkd.config import DataConfig, SplitConfig
from graftkd.data import build_data, few_shot
from graftkd.data.datasets import FileDataset, base_shape, decode_file, verify_images
from graftkd.data.transforms import eval_transform, train_transform
from graftkd.data.types import Record
from graftkd.errors import UserError


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="breakhis", root=root, image_size=24, **kw)


def test_item_format_and_replay(synth_tree: Path, tmp_path: Path) -> None:
    b = build_data(_cfg(synth_tree), seed=3, run_dir=tmp_path / "run")
    item = b.train[5]
    assert set(item) == {"image", "label", "index", "view"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 24, 24)
    assert item["index"] == 5 and item["view"] == 0 and item["label"] == b.train.records[5].label
    assert torch.equal(item["image"], b.train.load_view(5, 0))
    torch.manual_seed(123)  # the caller's RNG state does not matter ...
    a = b.train.load_view(5, 7)
    torch.rand(10)
    assert torch.equal(a, b.train.load_view(5, 7))
    assert not torch.equal(a, b.train.load_view(5, 8))  # ... the view does
    b.train.set_epoch(4)
    assert b.train[5]["view"] == 4 and torch.equal(b.train[5]["image"], b.train.load_view(5, 4))
    b.train.views = 3
    views = [b.train[i]["view"] for i in range(len(b.train))]
    assert set(views) <= {0, 1, 2} and len(set(views)) > 1
    b.train.set_epoch(5)
    assert [b.train[i]["view"] for i in range(len(b.train))] != views
    ev1, ev2 = b.test[0], b.test[0]  # eval: deterministic, no augmentation, view 0
    assert ev1["view"] == 0 and torch.equal(ev1["image"], ev2["image"])
    b.test.set_epoch(9)
    assert torch.equal(b.test[0]["image"], ev1["image"])


def test_same_views_with_workers_0_and_2(synth_tree: Path, tmp_path: Path) -> None:
    b = build_data(_cfg(synth_tree, decoded_cache="mmap"), seed=1, run_dir=tmp_path / "run")
    b.train.set_epoch(2)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(b.train, batch_size=8, num_workers=workers, shuffle=False)
        batches.append([(x["image"], x["view"], x["index"]) for x in loader])
    for (i0, v0, n0), (i2, v2, n2) in zip(*batches):
        assert torch.equal(i0, i2) and torch.equal(v0, v2) and torch.equal(n0, n2)
    assert (tmp_path / ".cache" / "decoded").is_dir()
    assert any(p.suffix == ".u8" for p in (tmp_path / ".cache" / "decoded").iterdir())


@pytest.mark.parametrize("cache", ["memory", "mmap"])
def test_cache_gives_identical_views(synth_tree: Path, tmp_path: Path, cache: str) -> None:
    plain = build_data(_cfg(synth_tree, decoded_cache="none"), seed=0, run_dir=tmp_path / "a")
    cached = build_data(_cfg(synth_tree, decoded_cache=cache), seed=0, run_dir=tmp_path / "b")
    for epoch in (0, 1):  # epoch 1 reads from the cache
        for i in range(0, len(plain.train), 7):
            assert torch.equal(plain.train.load_view(i, epoch), cached.train.load_view(i, epoch))
    assert cached.train.cache is not None and cached.train.cache.filled.sum() > 0
    again = build_data(_cfg(synth_tree, decoded_cache=cache), seed=0, run_dir=tmp_path / "b")
    if cache == "mmap":  # a second run re-uses the filled file
        assert again.train.cache.filled.sum() == cached.train.cache.filled.sum()


def test_base_shape_keeps_aspect() -> None:
    assert base_shape(700, 460, 256) == (256, 390)
    assert base_shape(32, 32, 256) == (32, 32)  # never enlarged


def test_bad_images_name_the_file(tmp_path: Path, png) -> None:
    good = png(tmp_path / "a" / "0.png", size=(64, 48))
    data = good.read_bytes()
    (tmp_path / "a" / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "a" / "junk.png").write_bytes(b"this is not an image at all")
    for name, msg in [("trunc.png", "cannot decode image .*trunc.png"), ("zero.png", r"zero.png: empty file \(0 bytes\)"),
                      ("junk.png", "cannot decode image .*junk.png")]:
        with pytest.raises(UserError, match=msg):
            decode_file(str(tmp_path / "a" / name))
    for i in range(4):
        png(tmp_path / "a" / f"{i + 1}.png", seed=10 + i)
        png(tmp_path / "b" / f"{i}.png", seed=20 + i)
    cfg = DataConfig(source="folder", root=tmp_path, image_size=16, split=SplitConfig(train=0.5, val=0.25, test=0.25))
    with pytest.raises(UserError, match=r"cannot decode image .*/a/junk\.png: cannot identify image file "
                                         r"\(set data.on_bad_file=skip to leave such files out; 2 more\)$"):
        build_data(cfg, seed=0, run_dir=None, work_dir=tmp_path / "w")  # full decode at scan time, sorted order
    b = build_data(cfg.model_copy(update={"on_bad_file": "skip", "decoded_cache": "none"}), 0, None, work_dir=tmp_path / "w")
    assert b.info["skipped_unreadable"] == 3  # truncated, empty and junk
    assert sorted(Path(e.split(":")[0]).name for e in b.info["unreadable_examples"]) == ["junk.png", "trunc.png", "zero.png"]
    assert sum(map(len, (b.train, b.val, b.test))) == 9


def test_verification_is_remembered_per_content_hash(tmp_path: Path, png, monkeypatch) -> None:
    import os

    import graftkd.data.datasets as ds

    paths = [str(png(tmp_path / f"{i}.png", seed=i)) for i in range(5)]
    calls: list[str] = []
    real = ds._Worker.verify
    monkeypatch.setattr(ds._Worker, "verify", lambda self, p, m: calls.append(p) or real(self, p, m))
    memo = tmp_path / "memo.json"
    first = verify_images(paths, memo)
    assert sorted(calls) == sorted(paths) and first[paths[0]] == (40, 32)
    calls.clear()
    assert verify_images(paths, memo) == first and calls == []  # a rescan decodes nothing
    data = bytearray(Path(paths[2]).read_bytes())
    st = os.stat(paths[2])
    data[len(data) // 2] ^= 0xFF  # damaged in place: same size, same mtime, other content
    Path(paths[2]).write_bytes(bytes(data))
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    again = verify_images(paths, memo)
    assert calls == [paths[2]] and isinstance(again[paths[2]], str) and "CRC" in again[paths[2]]
    calls.clear()
    assert verify_images(paths, memo)[paths[2]] == again[paths[2]] and calls == []  # bad results remembered too
    assert verify_images(paths, memo, max_pixels=40 * 32 - 1)[paths[0]].startswith("40 x 32 = 1280 pixels is over")
    memo.write_text("{not json")
    assert verify_images(paths, memo) == again  # a broken memo only costs time


def test_transforms_presets() -> None:
    img = torch.randint(0, 256, (3, 46, 70), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for preset in ("histology", "cifar", "none"):
        out = train_transform(preset, 32, mean, std)(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    ev = eval_transform(32, mean, std)(img)
    assert torch.equal(ev, eval_transform(32, mean, std)(img)) and ev.shape == (3, 32, 32)
    ds = FileDataset([Record("unused", 0, "g")], train_transform("histology", 32, mean, std), eval_transform(32, mean, std),
                     seed=0, side=36)
    ds.base = lambda i: img  # type: ignore[method-assign]
    rot = {tuple(ds.load_view(0, v).shape) for v in range(8)}
    assert rot == {(3, 32, 32)}


def test_few_shot_counts_and_determinism() -> None:
    recs = [Record(f"{i}", i % 2, f"p{i % 6}") for i in range(60)]
    idx, info = few_shot(recs, 4, None, seed=1)
    assert Counter(recs[i].label for i in idx) == {0: 4, 1: 4} and info["per_class"] == {0: 4, 1: 4}
    assert few_shot(recs, 4, None, seed=1)[0] == idx and few_shot(recs, 4, None, seed=2)[0] != idx
    idx, info = few_shot(recs, 5, 1, seed=0)  # 3 patients per class, at most 1 image each
    assert Counter(recs[i].label for i in idx) == {0: 3, 1: 3} and info["short"] == {0: 3, 1: 3}
    assert all(c == 1 for c in Counter(recs[i].group for i in idx).values())
    assert few_shot(recs, None, None, 0) == (list(range(60)), {})


def test_build_few_shot_only_train(synth_tree: Path) -> None:
    cfg = _cfg(synth_tree, shots=3, max_per_group=2, split=SplitConfig(train=0.5, val=0.25, test=0.25))
    b = build_data(cfg, seed=0, run_dir=None, work_dir=synth_tree.parent / "w")
    assert Counter(r.label for r in b.train.records) == {0: 3, 1: 3}
    assert len(b.val) + len(b.test) == 64 and b.info["fewshot"]["per_class"] == {"benign": 3, "malignant": 3}
    assert b.info["counts"]["train"]["images"] == 6 and b.info["split_seed"] == 0
    assert set(b.info["groups"]["train"]).isdisjoint(b.info["groups"]["test"])


def test_a_file_changed_in_place_never_serves_its_old_pixels_from_the_mmap_cache(tmp_path: Path) -> None:
    """Same size, same mtime, other pixels: the scan memo and the mmap cache are keyed by content."""
    import os

    import numpy as np
    from PIL import Image

    def save(path: Path, seed: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, compress_level=0)  # stored, not compressed: the size depends on 20x20 only

    for c in ("a", "b"):
        for i in range(4):
            save(tmp_path / "d" / c / f"{i}.png", seed=10 * (c == "b") + i)
    cfg = DataConfig(source="folder", root=tmp_path / "d", image_size=16, decoded_cache="mmap", augment="none",
                     split=SplitConfig(train=0.5, val=0.25, test=0.25))
    first = build_data(cfg, 0, None, work_dir=tmp_path / "w")
    target = Path(first.train.records[0].path)
    old = [first.train.base(i).clone() for i in range(len(first.train))]
    st = os.stat(target)
    save(target, seed=99)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(target).st_size == st.st_size
    again = build_data(cfg, 0, None, work_dir=tmp_path / "w")
    fresh = build_data(cfg.model_copy(update={"decoded_cache": "none"}), 0, None, work_dir=tmp_path / "w2")
    assert torch.equal(again.train.base(0), fresh.train.base(0)) and not torch.equal(again.train.base(0), old[0])
    assert all(torch.equal(again.train.base(i), old[i]) for i in range(1, len(old)))
