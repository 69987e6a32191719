"""KD, DKD and DML through the method: exact losses for one batch, frozen teachers, peer gradients."""
import pytest
import torch
import torch.nn.functional as F

from graftkd.config import ExperimentConfig, ModelConfig, TeacherConfig
from graftkd.distributed import DistContext
from graftkd.losses import dkd_loss
from graftkd.methods.base import METHODS, StepContext
from graftkd.methods.dkd import DKDMethod
from graftkd.methods.dml import DMLMethod
from graftkd.methods.kd import KDMethod
from graftkd.models import create_model
from tests.teachers.toydata import save_teacher, toy_bundle

CLASSES = ["c0", "c1", "c2"]


def _teachers(tmp_path, k=2):
    archs = ["resnet8", "vgg8", "resnet20"][:k]
    return [TeacherConfig(checkpoint=save_teacher(tmp_path / f"t{i}.pt", create_model(a, 3), a, CLASSES,
                                                  mean=(0.5, 0.4, 0.5) if i else (0.5, 0.5, 0.5)))
            for i, a in enumerate(archs)]


def _build(tmp_path, method, teachers, fusion="mean", **extra):
    cfg = ExperimentConfig(teachers=teachers, method=method, fusion={"strategy": fusion}, **extra)
    data = toy_bundle(n_train=16)
    factory = METHODS.get(method.name)
    m = factory(cfg, data, build_student=lambda: create_model("resnet8", 3), run_dir=tmp_path / "run",
                device=torch.device("cpu"), dist=DistContext())
    batch = torch.utils.data.default_collate([data.train[i] for i in range(8)])
    return m, batch


def _ctx(m, epoch=0):
    return StepContext(phase=m.phases()[0], epoch=epoch, step=0, step_in_epoch=0, steps_per_epoch=1)


def _hand_target(teachers, x, T, standardize, w):
    """sum_k w_k softmax(Z?(z_k)/T) in float64, from the teacher models directly."""
    p = 0
    for k, t in enumerate(teachers):
        with torch.no_grad():
            z = t(x).double()
        if standardize:
            z = (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)
        p = p + w[k] * torch.softmax(z / T, 1)
    return p


@pytest.mark.parametrize("k,standardize", [(1, False), (2, True)])
def test_kd_loss_equals_hand_formula(tmp_path, k, standardize):
    method = KDMethod(temperature=3.0, ce_weight=0.3, kd_weight=0.7, standardize=standardize, label_smoothing=0.1)
    m, batch = _build(tmp_path, method, _teachers(tmp_path, k))
    m.train()
    out = m.training_step(batch, _ctx(m))
    s = m.model(batch["image"]).double()  # BN in train mode: same batch, same output
    y = batch["label"]
    p = _hand_target(m.targets.ensemble.teachers, batch["image"], 3.0, standardize, [1 / k] * k)
    sv = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-7) if standardize else s
    kl = (p * (p.log() - torch.log_softmax(sv / 3.0, 1))).sum(1).mean() * 9.0
    ce = F.cross_entropy(s, y, label_smoothing=0.1)
    assert out["kd"].item() == pytest.approx(kl.item(), rel=1e-5, abs=1e-6)
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((0.3 * ce + 0.7 * kl).item(), rel=1e-5)
    assert out["agreement"].item() == pytest.approx((s.argmax(1) == p.argmax(1)).double().mean().item())


def test_kd_alpha_divergence_path(tmp_path):
    teachers = _teachers(tmp_path, 1)
    m, batch = _build(tmp_path, KDMethod(temperature=2.0, divergence={"kind": "alpha", "alpha": 1.0}), teachers)
    r, _ = _build(tmp_path, KDMethod(temperature=2.0), teachers)
    r.model.load_state_dict(m.model.state_dict())
    a, b = m.training_step(batch, _ctx(m)), r.training_step(batch, _ctx(r))
    assert a["kd"].item() == pytest.approx(b["kd"].item(), rel=1e-4)  # alpha = 1 is KL


def test_teachers_frozen_eval_no_grad_not_optimised(tmp_path):
    m, batch = _build(tmp_path, KDMethod(), _teachers(tmp_path, 2))
    m.train()
    teachers = list(m.targets.ensemble.teachers)
    assert m.model.training and not any(mod.training for t in teachers for mod in t.modules())
    m.training_step(batch, _ctx(m))["loss"].backward()
    teacher_params = {id(p) for t in teachers for p in t.parameters()}
    assert all(p.grad is None and not p.requires_grad for t in teachers for p in t.parameters())
    assert all(p.grad is not None for p in m.model.parameters())
    optimised = {id(p) for ph in m.phases() for spec in ph.optimizers for g in spec.params for p in g["params"]}
    assert optimised == {id(p) for p in m.model.parameters()} and not optimised & teacher_params
    assert not any(k.startswith("targets") for k in m.student().state_dict())


def test_dkd_probability_path_equals_mdistiller_logit_form(tmp_path):
    method = DKDMethod(temperature=1.0, alpha=1.0, beta=8.0, warmup_epochs=20, ce_weight=1.0)
    m, batch = _build(tmp_path, method, _teachers(tmp_path, 1))
    out = m.training_step(batch, _ctx(m, epoch=4))
    s = m.model(batch["image"])
    with torch.no_grad():
        z = m.targets.ensemble.teachers[0](batch["image"])
    ref = 5 / 20 * dkd_loss(s, z, batch["label"], 1.0, 8.0, 1.0)  # epoch 4 counted from 0 -> 5/20
    assert out["dkd"].item() == pytest.approx(ref.item(), rel=1e-4)
    late = m.training_step(batch, _ctx(m, epoch=30))["dkd"]
    assert late.item() == pytest.approx(4 * out["dkd"].item(), rel=1e-4)


def test_dml_each_peer_gets_gradient_only_from_its_own_loss(tmp_path):
    method = DMLMethod(peers=[ModelConfig(name="resnet8"), ModelConfig(name="vgg8")], kd_weight=0.5)
    m, batch = _build(tmp_path, method, [])
    assert m.targets is None and set(m.extra_outputs()) == {"peer1", "peer2"}
    assert m.extra_outputs()["peer2"].arch == "vgg8" and m.extra_outputs()["peer2"].module is m.peers[2]
    assert m.student() is m.peers[0]
    m.train()
    m.training_step(batch, _ctx(m))["loss"].backward()
    x, y = batch["image"], batch["label"]
    for k, peer in enumerate(m.peers):
        logits = [p(x) for p in m.peers]
        own = F.cross_entropy(logits[k], y) + 0.5 * torch.stack([
            (torch.softmax(z.detach(), 1) * (torch.log_softmax(z.detach(), 1) - torch.log_softmax(logits[k], 1)))
            .sum(1).mean() for j, z in enumerate(logits) if j != k]).mean()
        grads = torch.autograd.grad(own, list(peer.parameters()))
        for p, g in zip(peer.parameters(), grads):
            assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


def test_dml_teacher_term_needs_teachers(tmp_path):
    from graftkd.errors import UserError

    with pytest.raises(UserError, match="teacher_weight"):
        _build(tmp_path, DMLMethod(peers=[ModelConfig(name="resnet8")], teacher_weight=1.0), [])
    m, batch = _build(tmp_path, DMLMethod(peers=[ModelConfig(name="resnet8")], teacher_weight=1.0),
                      _teachers(tmp_path, 1))
    out = m.training_step(batch, _ctx(m))
    assert {"agreement", "peer_agreement", "acc_peer1"} <= set(out)
