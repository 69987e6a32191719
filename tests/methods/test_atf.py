"""ATF: gradient isolation, exact reductions (offline KD, KL), theta_0 anchor, warm-up, BN modes."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.toy import ToyNet, ToyViews
from graftkd.config import load_config
from graftkd.data.types import DataBundle
from graftkd.engine.trainer import Trainer
from graftkd.errors import UserError
from graftkd.losses import standardize
from graftkd.methods.atf import ATF, build_atf
from graftkd.methods.base import StepContext
from graftkd.models import create_model, save_model_file
from graftkd.teachers.ensemble import Teacher

STATS = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
VAL = ToyViews(16, seed=1, augment=False)


def make_cfg(tmp_path, *extra):
    return load_config(None, [f"output.dir={tmp_path}", "output.name=run", "output.tensorboard=false",
                              "trainer.progress=false", "trainer.epochs=2", "data.batch_size=8",
                              "optimizer.lr=0.1", "schedule.name=constant", "method.name=atf",
                              "method.warmup_epochs=0", *extra])


def predict_val(fn):
    with torch.no_grad():
        return {"logits": fn(VAL.x), "labels": VAL.y}


def make_method(cfg, k=1, seed=1):
    torch.manual_seed(seed)
    student = ToyNet()
    teachers = [Teacher(ToyNet(), "toy", "test", *STATS, *STATS) for _ in range(k)]
    with torch.no_grad():
        z0 = torch.stack([t.eval()(VAL.x) for t in teachers])
    return ATF(cfg, student, teachers, z0, VAL.y, predict_val)


def batch(n=8):
    data = ToyViews(n, seed=3)
    return {"image": data.x, "label": data.y}


def ctx(epoch=0, step=0):
    return StepContext(phase=None, epoch=epoch, step=step, step_in_epoch=step, steps_per_epoch=6)


def fit(cfg, method):
    Trainer(cfg, cfg.run_dir).fit(method, ToyViews(), VAL)
    return method


def teacher_state(method):
    return {k: v.clone() for k, v in method.teachers[0].model.state_dict().items()}


def test_each_loss_reaches_only_its_own_network(tmp_path):
    method = make_method(make_cfg(tmp_path, "method.mu=0.1"), k=2).train()
    out = method.training_step(batch(), ctx())
    s_params = list(method.model.parameters())
    t_params = [p for t in method.teachers for p in t.model.parameters()]
    assert all(g is None for g in torch.autograd.grad(out["student_loss"], t_params, allow_unused=True,
                                                      retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(out["teacher_loss"], s_params, allow_unused=True,
                                                      retain_graph=True))
    # each teacher's loss reaches its own weights (and only the sum is optimised)
    g_t = torch.autograd.grad(out["teacher_loss"], t_params, retain_graph=True)
    g_s = torch.autograd.grad(out["student_loss"], s_params, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in (g_t[-1], g_t[len(g_t) // 2 - 1], g_s[-1]))
    assert torch.equal(out["loss"], out["student_loss"] + out["teacher_loss"])


def test_losses_match_the_formulas_with_alpha_half(tmp_path):
    cfg = make_cfg(tmp_path, "method.divergence.alpha=0.5", "method.divergence.iw_clip=1e6",
                   "method.temperature=2", "method.ce_weight=0.3", "method.kd_weight=5", "method.lam=0.7",
                   "method.mu=0")
    method = make_method(cfg).eval()  # eval: deterministic forwards to recompute by hand
    b = batch()
    out = method.training_step(b, ctx())
    with torch.no_grad():
        s, z = method.model(b["image"]), method.teachers[0](b["image"])
    p_t, p_s = torch.softmax(standardize(z) / 2, -1), torch.softmax(standardize(s) / 2, -1)

    def d_half(p, q):  # 1/(a(a-1)) sum_i q_i [(p_i/q_i)^a - 1] at a = 1/2, batch mean
        return (-4 * (q * ((p / q).sqrt() - 1)).sum(-1)).mean()

    student = 0.3 * F.cross_entropy(s, b["label"]) + 5 * 4 * d_half(p_t, p_s)
    teacher = F.cross_entropy(z, b["label"]) + 0.7 * 4 * d_half(p_s, p_t)
    assert out["student_loss"].item() == pytest.approx(student.item(), rel=1e-5)
    assert out["teacher_loss"].item() == pytest.approx(teacher.item(), rel=1e-5)
