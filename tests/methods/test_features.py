"""FitNet, AT, MiR and FSKD on the one feature contract (graftkd.methods.features)."""
import copy

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
    assert set(out) == {"mimic", "loss", "acc"} and torch.equal(out["loss"], 10 * out["mimic"])  # feat_weight 10
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


def shrink_features(net: nn.Module, c: float) -> nn.Module:
    """resnet8 with its pooled features times ``c`` and its classifier times ``1/c``: the same function
    (ReLU is positively homogeneous), features of another scale."""
    last = net.layer3[-1]
    with torch.no_grad():
        for bn in (last.bn2, last.downsample[1]):
            bn.weight.mul_(c)
            bn.bias.mul_(c)
        net.fc.weight.div_(c)
    return net


def blobs(n: int, seed: int, size: int = 16):
    """Three classes: channel y brightened, Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.5 * torch.randn(n, 3, size, size, generator=g)
    x[torch.arange(n), y] += 1.0
    return x, y


def mimic(teacher: nn.Module, steps: int, x: torch.Tensor, y: torch.Tensor, **opts) -> MiR:
    """MiR's student (resnet8, seed 1) after ``steps`` steps of SGD (lr 0.05, momentum 0.9, the
    benchmark's) on one batch."""
    from graftkd.engine.trainer import build_optimizer
    from graftkd.methods.base import OptimSpec

    torch.manual_seed(1)
    cfg = validate_config({"name": "x", "model": {"name": "resnet8"}, "method": {"name": "mir", **opts},
                           "trainer": {"steps": steps, "epochs": None},
                           "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
                           "schedule": {"name": "constant"}})
    m = MiR(cfg, MODELS.get("resnet8")(num_classes=3), targets_of(teacher), 16, "resnet8", 0)
    opt = build_optimizer(m.phases()[0].optimizers[0])
    m.train()
    for i in range(steps):
        out = m.training_step({"image": x, "label": y}, ctx(m))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return m.eval()


def test_mir_standardises_the_teacher_features_so_their_scale_does_not_matter():
    teacher = MODELS.get("resnet8")(num_classes=3)
    randomise(teacher)
    small = shrink_features(copy.deepcopy(teacher), 0.05).eval()
    x, y = blobs(12, 0)
    with torch.no_grad():
        torch.testing.assert_close(small(x), teacher.eval()(x), rtol=1e-4, atol=1e-4)
    a, b = mimic(teacher, 1, x, y), mimic(small, 1, x, y)
    assert a.level == "pre_pool"
    with torch.no_grad():  # the first batch fixes mu and s: per channel over images and positions of the map
        f = teacher.forward_features(x)
    torch.testing.assert_close(a.t_shift, f.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.t_scale, f.var((0, 2, 3), correction=0).mean().sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(b.t_scale, 0.05 * a.t_scale, rtol=1e-4, atol=0)
    a, b = mimic(teacher, 3, x, y), mimic(small, 3, x, y)
    with torch.no_grad():
        torch.testing.assert_close(b.eval_logits(x), a.eval_logits(x), rtol=1e-3, atol=1e-3)
    # the plain MSE (MiR's own, standardize: false) takes 400x smaller steps on the small features
    a, b = mimic(teacher, 3, x, y, standardize=False), mimic(small, 3, x, y, standardize=False)
    with torch.no_grad():
        assert not torch.allclose(b.eval_logits(x), a.eval_logits(x), rtol=1e-2, atol=1e-2)


def test_mir_student_agrees_with_a_trained_teacher_after_mimicking():
    """Features of a trained teacher at a small scale (like a ResNet's pooled post-ReLU features): after
    mimicking, the student through the teacher's head predicts what the teacher predicts on new images.
    With the plain MSE (``standardize: false``) the agreement after these 20 steps is 0.43 (chance 1/3)."""
    torch.manual_seed(0)
    teacher = MODELS.get("resnet8")(num_classes=3)
    x, y = blobs(48, 0)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(15):
        loss = F.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher = shrink_features(teacher.eval(), 0.01)
    xv, _ = blobs(60, 1)
    m = mimic(teacher, 20, x, torch.zeros_like(y))  # no labels: MiR never sees them
    with torch.no_grad():
        agree = (m.eval_logits(xv).argmax(1) == teacher(xv).argmax(1)).float().mean()
        assert torch.equal(m.student().eval()(xv).argmax(1), m.eval_logits(xv).argmax(1))
    assert agree >= 0.9


def test_mir_first_step_backpropagates_its_label_and_kd_terms_through_the_fitted_standardisation():
    """mu and s are fitted on the first batch; the logits of that same step must already use them (and the
    in-place fit must not break the step's backward pass)."""
    t = targets_of(MODELS.get("resnet20")(num_classes=3))
    m = MiR(cfg_of({"name": "mir", "ce_weight": 0.5}), MODELS.get("resnet8")(num_classes=3), t, 16, "resnet8", 0)
    b = batch(size=16)
    out = m.training_step(b, ctx(m))
    out["loss"].backward()
    assert bool(m.standardized) and float(m.t_scale) != 1.0
    assert m.proj.weight.grad is not None and torch.isfinite(m.proj.weight.grad).all()
    with torch.no_grad():
        again = F.cross_entropy(m._features(b["image"])[1].float(), b["label"])
    torch.testing.assert_close(out["ce"].detach(), again, rtol=1e-5, atol=1e-6)
