"""FitNet, AT, MiR and FSKD on the one feature contract (graftkd.methods.features)."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from graftkd.config import validate_config
from graftkd.errors import UserError
from graftkd.methods.at import AT
from graftkd.methods.base import StepContext
from graftkd.methods.fitnet import FitNet
from graftkd.methods.fskd import FSKD
from graftkd.methods.mir import MiR
from graftkd.models import MODELS

from tests.methods.test_graft import randomise, targets_of


def cfg_of(method: dict, steps: int = 10):
    return validate_config({"name": "x", "model": {"name": "resnet8"}, "method": method,
                            "trainer": {"steps": steps, "epochs": None}})


def batch(n=3, size=16, classes=3):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": torch.arange(n) % classes,
            "index": torch.arange(n), "view": torch.zeros(n, dtype=torch.long)}


def ctx(method, i=0):
    return StepContext(method.phases()[i], 0, 0, 0, 1)


def teachers(*names):
    models = [MODELS.get(n)(num_classes=3) for n in names]
    for m in models:
        randomise(m)
    return targets_of(*models)


def test_fitnet_hint_is_mse_of_the_regressed_student_map_per_teacher():
    t = teachers("resnet20", "resnet8x4")
    m = FitNet(cfg_of({"name": "fitnet", "hint": 2}), MODELS.get("resnet8")(num_classes=3), t, 16, "resnet8").eval()
    b = batch()
    out = m.training_step(b, ctx(m))
    with torch.no_grad():
        maps_s = m.S.intermediates(b["image"])[0]
        hints = [F.mse_loss(r(maps_s[2]), v.intermediates(b["image"])[0][2]) for r, v in zip(m.regressors, m.T)]
    assert [r[0].out_channels for r in m.regressors] == [32, 128]  # layer2 of resnet20 and resnet8x4
    torch.testing.assert_close(out["hint"], sum(hints) / 2, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"], out["ce"] + 100 * out["hint"], rtol=1e-6, atol=0)
    with pytest.raises(UserError, match=r"method.hint = 7, but .* share only 4 boundaries"):
        FitNet(cfg_of({"name": "fitnet", "hint": 7}), MODELS.get("resnet8")(num_classes=3), t, 16, "resnet8")


def test_attention_transfer_matches_mdistiller_formula():
    t = teachers("resnet20")
    m = AT(cfg_of({"name": "at"}), MODELS.get("resnet8")(num_classes=3), t, 16, "resnet8").eval()
    b = batch()
    out = m.training_step(b, ctx(m))

    def at(f):
        a = f.pow(2).mean(1).reshape(len(f), -1)
        return a / a.norm(dim=1, keepdim=True)

    with torch.no_grad():
        fs, ft = m.S.intermediates(b["image"])[0], m.T[0].intermediates(b["image"])[0]
        hand = sum(((at(fs[i]) - at(ft[i])) ** 2).mean() for i in (1, 2, 3))  # the stem left out
    torch.testing.assert_close(out["at"], hand, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"], out["ce"] + 1000 * out["at"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("teacher,student,size,level", [
    ("resnet20", "resnet8", 16, "pre_pool"),
    ("resnet10t", "mobilenetv3_small_050", 32, "pre_logits"),  # MobileNetV3: pool -> conv_head -> act first
])
def test_mir_uses_the_teachers_classifier_and_exports_the_plain_student(teacher, student, size, level):
    def make(name):
        return MODELS.get(name)(num_classes=3) if name in MODELS else timm.create_model(name, num_classes=3)
    t = targets_of(make(teacher))
    m = MiR(cfg_of({"name": "mir"}), make(student), t, size, student, 0)
    assert m.level == level
    for p in m.proj.parameters():
        nn.init.normal_(p, std=0.1)
    b = batch(size=size)
    out = m.training_step(b, ctx(m))
    assert set(out) == {"mimic", "loss", "acc"} and torch.equal(out["loss"], out["mimic"])
    m.eval()
    x = b["image"].double()
    m.double()
    with torch.no_grad():
        exported = m.student().eval()
        assert type(exported) is type(m.model)
        torch.testing.assert_close(exported(x), m.eval_logits(x), rtol=1e-9, atol=1e-9)
        assert torch.equal(m.eval_logits(x)[:0], m.t_clf(torch.zeros(0, m.t_clf.in_features, dtype=x.dtype)))
    trained = {id(p) for g in m.phases()[0].optimizers[0].params for p in g["params"]}
    assert not any(id(p) in trained for p in m.s_clf.parameters()) and id(m.proj.weight) in trained


def test_fskd_aligns_foldable_boundaries_and_folds_them_exactly():
    t = teachers("resnet20")
    m = FSKD(cfg_of({"name": "fskd", "align_share": 0.3}), MODELS.get("resnet8")(num_classes=3), t, 16, "resnet8", 0)
    ph = m.phases()
    assert [(p.name, p.steps) for p in ph] == [("train", 7), ("align", 3)]
    assert [m.S.stage_names[s] for _, s in m.align] == ["layer1", "layer2", "layer3"]  # the stem feeds an identity shortcut
    m.start_phase(ph[1])
    assert not any(p.requires_grad for p in m.model.parameters()) and all(p.requires_grad for p in m.q.parameters())
    b = batch()
    m.train()
    out = m.training_step(b, ctx(m, 1))
    assert m.fitted and {"align", "kd", "loss"} <= set(out)
    for q in m.q.values():
        nn.init.normal_(q.weight, std=0.3)
    m.eval().double()
    x = b["image"].double()
    with torch.no_grad():
        torch.testing.assert_close(m.student()(x), m.eval_logits(x), rtol=1e-9, atol=1e-9)
    with pytest.raises(UserError, match="teacher_map = identity needs equal widths; at layer1"):
        FSKD(cfg_of({"name": "fskd", "teacher_map": "identity"}), MODELS.get("resnet8")(num_classes=3),
             teachers("resnet8x4"), 16, "resnet8", 0)
