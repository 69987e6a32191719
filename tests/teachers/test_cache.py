"""Soft-target cache: equals the live ensemble on the same views, reused or rebuilt by manifest."""
import torch

from graftkd.config import FusionConfig, TeacherConfig
from graftkd.models import create_model
from graftkd.runtime import Inference
from graftkd.teachers import SoftTargetCache, TeacherTargets, cache_manifest, load_teachers
from graftkd.teachers.ensemble import Teacher, state_checksum
from tests.teachers.toydata import save_teacher, toy_bundle

V, T = 3, 4.0


def _setup(tmp_path, classes=3, strategy="confidence"):
    data = toy_bundle(n_train=20, n_val=12, classes=classes)
    names = [f"c{k}" for k in range(classes)]
    files = [save_teacher(tmp_path / "a.pt", create_model("resnet8", classes), "resnet8", names),
             save_teacher(tmp_path / "b.pt", create_model("vgg8", classes), "vgg8", names, mean=(0.4, 0.5, 0.6))]
    ens = load_teachers([TeacherConfig(checkpoint=f) for f in files], data, FusionConfig(strategy=strategy),
                        Inference(torch.device("cpu"), batch_size=128))
    return data, ens


def _manifest(ens, data, temperature=T, standardize=True, topk=None):
    return cache_manifest(ens, data.train, views=V, temperature=temperature, standardize=standardize, topk=topk,
                          data_config={"augment": "toy"}, data_seed=data.train.seed, image_size=16,
                          classes=list(data.classes))


def _live(ens, data, view, temperature=T, standardize=True):
    n = len(data.train)
    x = torch.stack([data.train.load_view(i, view) for i in range(n)])
    return ens.targets(x, data.train.y, temperature, standardize)


def test_cache_equals_live_targets_on_every_view(tmp_path):
    data, ens = _setup(tmp_path)
    cache = SoftTargetCache.load_or_build(tmp_path / "cache", ens, data.train, _manifest(ens, data),
                                          Inference(torch.device("cpu"), 7))
    assert cache.built and cache.values.dtype == torch.float16 and cache.values.shape == (20, V, 3)
    idx = torch.arange(20)
    for v in range(V):
        live = _live(ens, data, v)
        got = cache.lookup(idx, torch.full((20,), v))
        assert (got - live).abs().max().item() < 1e-3
        assert torch.allclose(got.sum(1), torch.ones(20), atol=1e-6)
    assert not torch.allclose(_live(ens, data, 0), _live(ens, data, 1), atol=1e-3)  # views differ


def test_training_batches_get_the_same_target_live_and_cached(tmp_path, monkeypatch):
    data, ens = _setup(tmp_path)
    cache = SoftTargetCache.build(ens, data.train, _manifest(ens, data), Inference(torch.device("cpu"), 8))
    data.train.views = V
    data.train.set_epoch(5)
    batch = torch.utils.data.default_collate([data.train[i] for i in range(20)])
    assert set(batch["view"].tolist()) <= set(range(V))
    live = TeacherTargets(ens, T, True)(batch)

    def no_teacher(*a, **k):
        raise AssertionError("a teacher ran with the cache on")

    monkeypatch.setattr(Teacher, "forward", no_teacher)  # per-epoch cost independent of K
    cached = TeacherTargets(ens, T, True, cache)(batch)
    assert (cached - live).abs().max().item() < 1e-3


def test_manifest_match_reuses_and_mismatch_rebuilds(tmp_path):
    data, ens = _setup(tmp_path)
    folder = tmp_path / "cache"
    first = SoftTargetCache.load_or_build(folder, ens, data.train, _manifest(ens, data), Inference(torch.device("cpu"), 8))
    stamp = (folder / "soft_targets.pt").stat().st_mtime_ns
    again = SoftTargetCache.load_or_build(folder, ens, data.train, _manifest(ens, data), Inference(torch.device("cpu"), 8))
    assert first.built and not again.built
    assert torch.equal(again.values, first.values)
    assert (folder / "soft_targets.pt").stat().st_mtime_ns == stamp

    other_t = SoftTargetCache.load_or_build(folder, ens, data.train, _manifest(ens, data, temperature=2.0),
                                            Inference(torch.device("cpu"), 8))
    assert other_t.built and not torch.allclose(other_t.values.float(), first.values.float(), atol=1e-3)
    got = other_t.lookup(torch.arange(20), torch.zeros(20, dtype=torch.long))
    assert (got - _live(ens, data, 0, temperature=2.0)).abs().max() < 1e-3

    with torch.no_grad():
        next(ens.teachers[0].model.parameters()).add_(0.1)
    ens.teachers[0].checksum = state_checksum(ens.teachers[0].model)
    changed = SoftTargetCache.load_or_build(folder, ens, data.train, _manifest(ens, data, temperature=2.0),
                                            Inference(torch.device("cpu"), 8))
    assert changed.built  # a teacher's weights changed: new checksum, rebuilt

    (folder / "soft_targets.json").write_text("{not json")
    assert SoftTargetCache.load_or_build(folder, ens, data.train, _manifest(ens, data, temperature=2.0),
                                         Inference(torch.device("cpu"), 8)).built


def test_topk_keeps_top_classes_and_spreads_the_residual(tmp_path):
    data, ens = _setup(tmp_path, classes=6, strategy="mean")
    cache = SoftTargetCache.build(ens, data.train, _manifest(ens, data, topk=2), Inference(torch.device("cpu"), 8))
    assert cache.values.shape == (20, V, 2) and cache.indices.dtype == torch.int16
    live = _live(ens, data, 1)
    got = cache.lookup(torch.arange(20), torch.ones(20, dtype=torch.long))
    assert torch.allclose(got.sum(1), torch.ones(20), atol=1e-3)
    top, idx = live.topk(2, 1)
    assert (got.gather(1, idx) - top).abs().max() < 1e-3
    others = got[torch.ones_like(got).scatter(1, idx, 0.0).bool()].view(20, 4)
    stored_top = cache.values[:, 1].float().sum(1, keepdim=True)
    assert torch.allclose(others, ((1 - stored_top) / 4).expand(-1, 4), atol=1e-7)  # residual spread uniformly
    assert torch.allclose(others.sum(1), 1 - top.sum(1), atol=1e-3)
