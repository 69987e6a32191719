"""Teacher loading: class-list checks, re-normalisation, freezing, validation accuracy stored once."""
import json

import pytest
import torch

from graftkd.config import FusionConfig, TeacherConfig
from graftkd.errors import UserError
from graftkd.models import create_model
from graftkd.runtime import Inference
from graftkd.teachers import ensemble as ens
from graftkd.teachers.ensemble import load_teachers
from tests.teachers.toydata import MEAN, STD, save_teacher, toy_bundle

CLASSES = ["c0", "c1", "c2"]

CPU = Inference(torch.device("cpu"), batch_size=128)


@pytest.fixture
def data():
    return toy_bundle()


@pytest.fixture
def files(tmp_path):
    a = save_teacher(tmp_path / "a.pt", create_model("resnet8", 3), "resnet8", CLASSES)
    b = save_teacher(tmp_path / "b.pt", create_model("resnet8", 3), "resnet8", CLASSES,
                     mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    return a, b


def test_mismatched_classes_name_the_teacher_and_both_lists(tmp_path, data, files):
    bad = save_teacher(tmp_path / "bad.pt", create_model("resnet8", 2), "resnet8", ["c0", "c2"])
    cfgs = [TeacherConfig(checkpoint=files[0]), TeacherConfig(checkpoint=bad)]
    with pytest.raises(UserError) as e:
        load_teachers(cfgs, data, FusionConfig(), CPU)
    msg = str(e.value)
    assert "teacher 1" in msg and "bad.pt" in msg
    assert "['c0', 'c2'] (2)" in msg and "['c0', 'c1', 'c2'] (3)" in msg


def test_same_count_different_order_is_an_error(tmp_path, data):
    swapped = save_teacher(tmp_path / "s.pt", create_model("resnet8", 3), "resnet8", ["c1", "c0", "c2"])
    with pytest.raises(UserError, match="differ from the data's"):
        load_teachers([TeacherConfig(checkpoint=swapped)], data, FusionConfig(), CPU)


def test_named_arch_must_match_file_and_weights_are_required(data, files):
    with pytest.raises(UserError, match="names it 'vgg8'"):
        load_teachers([TeacherConfig(name="vgg8", checkpoint=files[0])], data, FusionConfig(), CPU)
    with pytest.raises(UserError, match="has no weights"):
        load_teachers([TeacherConfig(name="resnet8")], data, FusionConfig(), CPU)
    with pytest.raises(UserError, match="pretrained head has 1000 classes"):
        load_teachers([TeacherConfig(name="resnet18", pretrained=True)], data, FusionConfig(), CPU)


def test_renormalisation_and_normalisation_precedence(data, files):
    e = load_teachers([TeacherConfig(checkpoint=files[0]), TeacherConfig(checkpoint=files[1]),
                       TeacherConfig(checkpoint=files[1], mean=MEAN, std=STD)], data,
                      FusionConfig(strategy="mean"), CPU)
    a, b, c = e.teachers
    assert not a.renormalise and b.renormalise and not c.renormalise  # config > checkpoint > data
    x = torch.randn(4, 3, 16, 16)
    raw = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    own = (raw - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(b(x), b.model(own), atol=1e-5)
        assert torch.equal(a(x), a.model(x))


def test_frozen_eval_inference(data, files):
    e = load_teachers([TeacherConfig(checkpoint=f) for f in files], data, FusionConfig(), CPU)
    e.train()
    assert all(not p.requires_grad for p in e.parameters())
    assert not any(m.training for m in e.modules())
    x = torch.randn(5, 3, 16, 16, requires_grad=True)
    p = e.targets(x, torch.tensor([0, 1, 2, 0, 1]), 4.0)
    assert p.shape == (5, 3) and torch.allclose(p.sum(1), torch.ones(5), atol=1e-6) and not p.is_inference()


def test_val_accuracy_measured_once_and_reused(tmp_path, data, files, monkeypatch):
    cfgs = [TeacherConfig(checkpoint=f) for f in files]
    e1 = load_teachers(cfgs, data, FusionConfig(), CPU, run_dir=tmp_path / "run")
    logits = torch.stack([t(data.val.x).argmax(1) for t in e1.teachers]).detach()
    assert e1.val_acc.tolist() == pytest.approx((logits == data.val.y).float().mean(1).tolist(), abs=1e-6)
    stored = json.loads((tmp_path / "run" / "cache" / "teacher_val.json").read_text())
    assert stored["val_accuracy"] == pytest.approx(e1.val_acc.tolist())

    def boom(*a, **k):
        raise AssertionError("measured twice")

    monkeypatch.setattr(ens, "measure_val_accuracy", boom)
    e2 = load_teachers(cfgs, data, FusionConfig(), CPU, run_dir=tmp_path / "run")
    assert torch.equal(e2.val_acc, e1.val_acc)
    with pytest.raises(AssertionError, match="measured twice"):  # other teachers: measured again
        load_teachers(cfgs[:1], data, FusionConfig(), CPU, run_dir=tmp_path / "run")
