"""ATF: gradient isolation, exact reductions (offline KD, KL), theta_0 anchor, warm-up, BN modes."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.engine.toy import ToyNet, ToyViews
from graftkd.config import TeacherConfig, load_config
from graftkd.data.types import DataBundle
from graftkd.engine.trainer import Trainer
from graftkd.errors import UserError
from graftkd.losses import standardize
from graftkd.methods.atf import ATF, build_atf
from graftkd.methods.base import StepContext
from graftkd.models import create_model, load_model_file, save_model_file
from graftkd.teachers.ensemble import Teacher

STATS = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
VAL = ToyViews(16, seed=1, augment=False)


#: the toy teachers (ToyNet) have no stage view, so the whole teacher adapts; the student loss is the
#: standardised alpha-divergence (the CIFAR-100 preset's, the class defaults before issue 23)
FORMER = ["method.adapt=all", "method.lam=1", "method.temperature=2", "method.standardize=true",
          "method.kd_weight=9", "method.divergence.kind=alpha", "method.divergence.alpha=0.5"]


def make_cfg(tmp_path, *extra):
    return load_config(None, [f"output.dir={tmp_path}", "output.name=run", "output.tensorboard=false",
                              "trainer.progress=false", "trainer.epochs=2", "data.batch_size=8",
                              "optimizer.lr=0.1", "schedule.name=constant", "method.name=atf",
                              "method.warmup_epochs=0", *FORMER, *extra])


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


def test_alpha_one_equals_kl(tmp_path):
    outs = []
    for div in (["method.divergence.kind=kl"], ["method.divergence.alpha=1", "method.divergence.iw_clip=1e6"]):
        method = make_method(make_cfg(tmp_path, "method.temperature=3", *div)).eval()
        outs.append(method.training_step(batch(), ctx()))
    kl, alpha = outs
    with torch.no_grad():
        s, z = method.model(batch()["image"]), method.teachers[0](batch()["image"])
    by_hand = 9 * F.kl_div(torch.log_softmax(standardize(s) / 3, -1), torch.softmax(standardize(z) / 3, -1),
                           reduction="batchmean")
    assert kl["kd"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    for key in ("kd", "teacher_kd", "student_loss", "teacher_loss"):
        assert alpha[key].item() == pytest.approx(kl[key].item(), rel=1e-6, abs=1e-5), key


def test_theta0_is_a_fixed_buffer_copy_and_the_drift_term_is_exact(tmp_path):
    method = make_method(make_cfg(tmp_path, "method.mu=0.01", "method.lam=0")).eval()
    teacher, anchor = method.teachers[0].model, method.anchors[0]
    assert not list(anchor.parameters())
    assert all(f"anchors.0.p{i}" in method.state_dict() for i in range(len(list(teacher.parameters()))))
    theta0 = [b.clone() for b in anchor.buffers()]
    n = sum(p.numel() for p in teacher.parameters())
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5)
    assert all(torch.equal(a, b) for a, b in zip(anchor.buffers(), theta0))
    out = method.training_step(batch(), ctx())
    assert out["teacher_drift"].item() == 0.25 * n
    assert out["teacher_loss"].item() == pytest.approx(out["teacher_ce"].item() + 0.01 * 0.25 * n, rel=1e-6)
    norm0 = math.sqrt(sum(float(b.square().sum()) for b in theta0))
    assert anchor.relative_change(teacher) == pytest.approx(0.5 * math.sqrt(n) / norm0, rel=1e-6)


def test_atf_with_lam_mu_ratio_zero_equals_offline_kd_after_training(tmp_path):
    offline = fit(cfg := make_cfg(tmp_path / "a", "method.mode=offline"), make_method(cfg))
    zero = make_cfg(tmp_path / "b", "method.lam=0", "method.mu=0", "method.lr_ratio=0", "method.teacher_bn=eval")
    atf = make_method(zero)
    before = teacher_state(atf)
    fit(zero, atf)
    for key, value in offline.model.state_dict().items():
        assert torch.equal(value, atf.model.state_dict()[key]), key
    assert all(torch.equal(v, teacher_state(atf)[k]) for k, v in before.items())
    assert not torch.equal(before["fc.weight"], make_method(zero, seed=2).teachers[0].model.fc.weight)


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_warmup_keeps_the_teacher_unchanged(tmp_path, bn):
    cfg = make_cfg(tmp_path, "method.warmup_epochs=2", f"method.teacher_bn={bn}", "method.lr_ratio=1",
                   "optimizer.weight_decay=0.1")
    method = make_method(cfg)
    before, student = teacher_state(method), method.model.fc.weight.clone()
    fit(cfg, method)
    assert all(torch.equal(v, teacher_state(method)[k]) for k, v in before.items())
    assert not torch.equal(student, method.model.fc.weight)


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_teacher_bn_mode(tmp_path, bn):
    cfg = make_cfg(tmp_path, f"method.teacher_bn={bn}", "method.lr_ratio=1")
    method = make_method(cfg)
    before = teacher_state(method)
    fit(cfg, method)
    after = teacher_state(method)
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    stats = [k for k in before if "running" in k or "num_batches" in k]
    assert len(stats) == 3
    assert all(torch.equal(before[k], after[k]) == (bn == "eval") for k in stats)


def test_teacher_every_and_warmup_decide_the_update_steps(tmp_path):
    method = make_method(make_cfg(tmp_path, "method.teacher_every=3", "method.warmup_epochs=1")).train()
    assert [method.updates_teachers(ctx(e, s)) for e, s in [(0, 2), (1, 5), (1, 6), (1, 7), (1, 8)]] == \
        [False, True, False, False, True]
    out = method.training_step(batch(), ctx(1, 6))
    assert out["loss"].grad_fn is not None and out["teacher_loss"].grad_fn is None
    assert torch.equal(out["loss"], out["student_loss"])
    assert method.phases()[0].optimizers[1].every == 3


def test_modes_switch_the_teacher_terms(tmp_path):
    keys = {}
    for mode in ("offline", "offline_joint", "atf", "online"):
        method = make_method(make_cfg(tmp_path, f"method.mode={mode}", "method.lam=2", "method.lr_ratio=0.5",
                                      "method.peer_lr_ratio=0.8"))
        keys[mode] = sorted(k for k in method.training_step(batch(), ctx()) if k.startswith("teacher_"))
        specs = method.phases()[0].optimizers
        ratios = [s.params[0].get("lr_scale", 1.0) for s in specs]
        assert ratios == {"offline": [1.0], "online": [1.0, 0.8]}.get(mode, [1.0, 0.5]), mode
        assert all(p.requires_grad == (mode != "offline") for p in method.teachers[0].model.parameters())
        assert (method.teachers[0] in method.frozen) == (mode == "offline")
    assert keys["offline"] == []
    assert keys["offline_joint"] == ["teacher_acc", "teacher_ce", "teacher_drift", "teacher_loss"]
    assert keys["atf"] == ["teacher_acc", "teacher_ce", "teacher_drift", "teacher_kd", "teacher_loss"]
    assert keys["online"] == ["teacher_acc", "teacher_ce", "teacher_kd", "teacher_loss"]


def toy_bundle():
    return DataBundle(ToyViews(), VAL, ToyViews(16, seed=2, augment=False), ["neg", "pos"], *STATS, 8)


def teacher_file(tmp_path, seed):
    torch.manual_seed(seed)
    return save_model_file(tmp_path / f"t{seed}.pt", create_model("resnet8", 2), arch="resnet8", num_classes=2,
                           classes=["neg", "pos"], mean=STATS[0], std=STATS[1], image_size=8)


def test_build_train_and_report_two_adapting_teachers(tmp_path):
    files = [teacher_file(tmp_path, seed) for seed in (1, 2)]
    cfg = make_cfg(tmp_path, "fusion.strategy=confidence", "method.lr_ratio=1", "trainer.epochs=1")
    cfg.teachers = [TeacherConfig(name="resnet8", checkpoint=f) for f in files]
    data = toy_bundle()
    method = build_atf(cfg, data, build_student=ToyNet, device=torch.device("cpu"))
    with torch.no_grad():
        pretrained = [load_model_file(f)[0].eval()(VAL.x).argmax(1) for f in files]
    assert all(torch.equal(method.val_pred0[k], pretrained[k]) for k in range(2))
    Trainer(cfg, cfg.run_dir).fit(method, data.train, data.val)
    assert [s.name for s in method.phases()[0].optimizers] == ["student", "teacher0", "teacher1"]
    assert sorted(method.extra_outputs()) == ["teacher_adapted_0", "teacher_adapted_1"]
    saved = method.extra_outputs()["teacher_adapted_1"]
    assert saved.arch == "resnet8" and saved.module is method.teachers[1].model
    assert (saved.mean, saved.std) == (method.teachers[1].mean, method.teachers[1].std)
    report = method.final_metrics(lambda fn, split: {"n": len(getattr(data, split))})["atf"]
    assert report["effective"] == {"lam": 1.0, "mu": 1e-3, "lr_ratio": 1.0, "teacher_every": 1,
                                   "warmup_epochs": 0, "teacher_bn": "eval", "warmup_steps": None,
                                   "teacher_weight_decay": 0.0, "teacher_ce_weight": 1.0, "adapt": "all",
                                   "guard": None, "guard_every": None, "collapse_drop": 0.25,
                                   "collapse_window": 10}
    method.eval()
    with torch.no_grad():
        s_pred = method.model(VAL.x).argmax(1)
    for k, row in enumerate(report["teachers"]):
        with torch.no_grad():
            t_pred = method.teachers[k](VAL.x).argmax(1)  # best.pt's teacher (the trainer restored it)
        assert row["relative_weight_change"] > 0 and row["val"] == {"n": 16} and row["test"] == {"n": 16}
        assert row["val_acc_before"] == pytest.approx((pretrained[k] == VAL.y).float().mean().item())
        sel = row["selected_checkpoint"]
        assert sel["val_acc_after"] == pytest.approx((t_pred == VAL.y).float().mean().item())
        assert row["val_acc_change"] == pytest.approx(row["val_acc_after"] - row["val_acc_before"])
        assert row["agreement_before"] == pytest.approx((s_pred == pretrained[k]).float().mean().item())
        assert sel["agreement_after"] == pytest.approx((s_pred == t_pred).float().mean().item())


def test_online_peers_start_from_random_init_and_need_a_label_free_fusion(tmp_path):
    files = [teacher_file(tmp_path, seed) for seed in (1, 2)]
    cfg = make_cfg(tmp_path, "method.mode=online")
    cfg.teachers = [TeacherConfig(name="resnet8", checkpoint=f) for f in files]
    with pytest.raises(UserError, match="fusion.strategy='accuracy'"):
        build_atf(cfg, toy_bundle(), build_student=ToyNet, device=torch.device("cpu"))
    cfg.fusion.strategy = "mean"
    method = build_atf(cfg, toy_bundle(), build_student=ToyNet, device=torch.device("cpu"))
    loaded = load_model_file(files[0])[0]
    assert not torch.equal(method.teachers[0].model.fc.weight, loaded.fc.weight)
    assert method.teachers[0].source == "random init (online peer)"
    assert method.eff.mu == 0 and method.eff.warmup_epochs == 0 and method.eff.teacher_bn == "train"


def test_teacher_weight_decay_is_the_teachers_own(tmp_path):
    """The teacher optimiser's weight decay is method.teacher_weight_decay, not optimizer.weight_decay:
    with every teacher term off, a teacher with no decay does not move; with decay it shrinks."""
    moved = {}
    for wd in (0.0, 0.1):
        cfg = make_cfg(tmp_path / str(wd), "optimizer.weight_decay=0.5", "optimizer.momentum=0", "method.lam=0",
                       "method.mu=0", "method.teacher_ce_weight=0", "method.lr_ratio=1",
                       f"method.teacher_weight_decay={wd}")
        method = make_method(cfg)
        groups = [s.params[0] for s in method.phases()[0].optimizers]
        assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == wd
        before = teacher_state(method)
        fit(cfg, method)
        moved[wd] = float(before["fc.weight"].norm() - method.teachers[0].model.fc.weight.detach().norm())
    assert moved[0.0] == 0.0 and moved[0.1] > 0


def test_teacher_ce_weight_scales_the_label_term(tmp_path):
    out = {}
    for w in (1.0, 0.25):
        method = make_method(make_cfg(tmp_path, "method.mu=0", f"method.teacher_ce_weight={w}")).eval()
        out[w] = method.training_step(batch(), ctx())
    for w, o in out.items():
        assert o["teacher_loss"].item() == pytest.approx(w * o["teacher_ce"].item() + o["teacher_kd"].item(), rel=1e-6)
    assert out[0.25]["teacher_ce"].item() == out[1.0]["teacher_ce"].item()


@pytest.mark.parametrize("adapt, trained", [("head", {"fc"}), ("last_stage", {"layer3", "fc"}),
                                            ("all", {"conv1", "bn1", "layer1", "layer2", "layer3", "fc"})])
def test_adapt_trains_only_the_chosen_part_of_the_teacher(tmp_path, adapt, trained):
    cfg = make_cfg(tmp_path, f"method.adapt={adapt}", "method.lr_ratio=1", "method.teacher_bn=train")
    cfg.teachers = [TeacherConfig(name="resnet8", checkpoint=teacher_file(tmp_path, 1))]
    data = toy_bundle()
    method = build_atf(cfg, data, build_student=ToyNet, device=torch.device("cpu"))
    model = method.teachers[0].model
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == trained
    before = {n: p.clone() for n, p in model.named_parameters()}
    Trainer(cfg, cfg.run_dir).fit(method, data.train, data.val)
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained


def test_adapt_needs_a_stage_view(tmp_path):
    with pytest.raises(UserError, match="no stage view"):
        make_method(make_cfg(tmp_path, "method.adapt=last_stage"))


def test_guard_keeps_the_best_teacher_and_rolls_back_and_stops_on_a_drop(tmp_path):
    cfg = make_cfg(tmp_path, "method.guard=0.05", "method.lr_ratio=1")
    method = make_method(cfg).eval()
    teacher = method.teachers[0].model
    theta0 = teacher_state(method)
    # a better teacher is kept as the best state
    with torch.no_grad():
        teacher.fc.bias.add_(0.01)
    method.best_acc.fill_(0.0)
    log = method.after_validation()
    acc = log["teacher0_acc"]
    improved = teacher_state(method)
    assert method.best_acc[0].item() == pytest.approx(acc) and not method.stopped[0]
    # a drop within the tolerance changes nothing; a larger one restores the best state and stops
    with torch.no_grad():
        teacher.fc.weight.add_(1.0)
        worse = (teacher(VAL.x).argmax(1) == VAL.y).float().mean().item()
    perturbed = teacher_state(method)
    method.best_acc.fill_(2.0)  # nothing beats it: no new best
    method.val_acc0.fill_(worse + 0.04)
    assert method.after_validation()["teacher0_acc"] == pytest.approx(worse)
    assert not method.stopped[0] and torch.equal(teacher.fc.weight, perturbed["fc.weight"])
    method.val_acc0.fill_(worse + 0.06)
    method.after_validation()
    assert method.stopped[0] and all(torch.equal(v, improved[k]) for k, v in teacher_state(method).items())
    assert not torch.equal(improved["fc.bias"], theta0["fc.bias"])
    out = method.train().training_step(batch(), ctx())
    assert out["teacher_loss"].grad_fn is None and out["loss"].grad_fn is not None
    row = method.final_metrics(lambda fn, split: {})["atf"]["teachers"][0]
    assert row["guard"] == {"best_val_acc": 2.0, "scored_from": "validation pass"}
    assert row["stop"]["stopped"] and row["stop"]["stopped_at_step"] == 0
    assert row["stop"]["reason"].startswith("guard: validation accuracy") and \
        row["stop"]["reason"].endswith("rolled back to its best validated state")
    assert row["weights"] == "rolled back at step 0"


def test_guard_logs_the_teachers_validation_accuracy(tmp_path):
    cfg = make_cfg(tmp_path, "method.guard=0.5", "method.lr_ratio=1")
    fit(cfg, make_method(cfg))
    import csv
    rows = list(csv.DictReader(open(cfg.run_dir / "log.csv")))
    assert all(0 <= float(r["val_teacher0_acc"]) <= 1 for r in rows)


def make_staged_method(cfg, seed=1):
    """ATF with a resnet8 teacher (a stage view, so a head probe applies) on the toy data."""
    torch.manual_seed(seed)
    teacher = Teacher(create_model("resnet8", num_classes=2), "resnet8", "test", (0.1, 0.2, 0.3),
                      (1.5, 1.0, 0.5), *STATS)  # re-normalises: the probe must too
    with torch.no_grad():
        z0 = teacher.eval()(VAL.x)[None]
    return ATF(cfg, ToyNet(), [teacher], z0, VAL.y, predict_val)


def test_head_probe_scores_the_teacher_as_a_validation_pass_does(tmp_path):
    cfg = make_cfg(tmp_path, "method.guard=0.01", "method.adapt=head", "method.teacher_bn=eval")
    method = make_staged_method(cfg).eval()
    teacher = method.teachers[0]
    assert method.probe_views[0] is not None and method.val_features0.shape == (16, 64, 2, 2)
    for shift in (0.0, 0.3, -0.7):  # the head moves; the cached features stay valid
        with torch.no_grad():
            teacher.model.fc.bias.add_(torch.tensor([shift, -shift]))
            full = (teacher(VAL.x).argmax(1) == VAL.y).float().mean()
        assert method.teacher_val_accuracy()[0].item() == pytest.approx(full.item(), abs=1e-7)
    row = method.final_metrics(lambda fn, split: {})["atf"]["teachers"][0]
    assert row["guard"]["scored_from"] == "cached head features"
    # no probe when more than the head adapts or BN trains
    for extra in ("method.adapt=last_stage", "method.teacher_bn=train"):
        other = make_staged_method(make_cfg(tmp_path, "method.guard=0.01", "method.adapt=head", "method.teacher_bn=eval", extra))
        assert other.probe_views[0] is None and other.val_features0 is None


def test_guard_every_checks_after_every_n_teacher_updates(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "method.guard=0.5", "method.guard_every=2", "method.adapt=head", "method.teacher_bn=eval",
                   "method.warmup_steps=3", "trainer.eval_every_steps=1000")
    method = make_staged_method(cfg)
    checks = []
    real = ATF.check_guard

    def spy(self, acc):
        checks.append((self._step, int(self.teacher_updates) if self.training else None))
        return real(self, acc)

    monkeypatch.setattr(ATF, "check_guard", spy)
    fit(cfg, method)
    # 2 epochs x 6 steps; updates on steps 3..11 (9 of them); checked before updates 3, 5, 7, 9 (after
    # 2, 4, 6, 8 updates), and at the one validation (the last step: eval_every_steps exceeds the budget)
    assert [c for c in checks if c[1] is not None] == [(5, 2), (7, 4), (9, 6), (11, 8)]
    assert [c for c in checks if c[1] is None] == [(11, None)]
    assert int(method.teacher_updates) == 9


def test_guard_every_needs_a_guard(tmp_path):
    with pytest.raises(UserError, match="method.guard_every is set but method.guard is not"):
        make_cfg(tmp_path, "method.guard_every=5")


def test_collapse_check_stops_a_teacher_whose_training_accuracy_collapses(tmp_path, caplog):
    """On by default: every collapse_window updates the teachers' training accuracy on their update
    batches is compared with their validation accuracy before training; a drop of more than
    collapse_drop stops the teacher and rolls it back to its pretrained weights (one log line, and
    metrics.json says so). The toy teacher is at chance on its batches; claiming 100% before
    training makes that a collapse."""
    cfg = make_cfg(tmp_path, "method.collapse_window=2", "method.lr_ratio=1")
    method = make_method(cfg)
    theta0 = teacher_state(method)
    method.val_acc0.fill_(1.0)
    with caplog.at_level("WARNING", logger="graftkd.methods.atf"):
        fit(cfg, method)
    # updates on every step from step 0; the first window closes on step 1 (its two updates were
    # counted before step 1's own update), so the teacher moved once and is put back
    assert method.stopped.tolist() == [True] and method.stopped_at.tolist() == [1]
    assert all(torch.equal(v, method.end_state["teachers"][0][k]) for k, v in theta0.items())
    [line] = [r.getMessage() for r in caplog.records if "stopped adapting" in r.getMessage()]
    assert line.startswith("atf: teacher 0 (toy) stopped adapting at step 1: collapse check: its training "
                           "accuracy over the last 16 samples was ")
    assert line.endswith("below 0.750 (validation accuracy before training 1.000 - collapse_drop 0.25); "
                         "rolled back to its pretrained weights")
    row = method.final_metrics(lambda fn, split: {})["atf"]["teachers"][0]
    assert row["weights"] == "rolled back at step 1" and row["relative_weight_change"] == 0.0
    assert row["stop"]["stopped"] and row["stop"]["stopped_at_step"] == 1
    # switched off, the same teacher keeps adapting
    off = make_cfg(tmp_path / "off", "method.collapse_window=2", "method.lr_ratio=1", "method.collapse_drop=null")
    kept = make_method(off)
    kept.val_acc0.fill_(1.0)
    fit(off, kept)
    assert not kept.stopped.any() and kept.best_states is None
    assert not torch.equal(kept.end_state["teachers"][0]["fc.weight"], theta0["fc.weight"])


def test_collapse_check_stops_a_teacher_with_non_finite_logits_at_once(tmp_path):
    """A teacher whose logits are not finite is rolled back before the step uses them: the step's
    losses stay finite (the trainer would stop the run on a non-finite loss)."""
    method = make_method(make_cfg(tmp_path)).train()
    theta0 = teacher_state(method)
    with torch.no_grad():
        method.teachers[0].model.fc.weight[0, 0] = math.nan
    out = method.training_step(batch(), ctx(step=3))
    assert all(torch.isfinite(v).all() for v in out.values())
    assert method.stopped.tolist() == [True] and method.stopped_at.tolist() == [3]
    assert all(torch.equal(v, teacher_state(method)[k]) for k, v in theta0.items())
    assert method.stop_reason[0] == ("collapse check: its logits were not finite; rolled back to its "
                                     "pretrained weights")


def test_the_report_measures_the_teacher_it_had_at_the_end(tmp_path):
    """The trainer ends by restoring best.pt (the student's best validation), teacher included; the
    report is measured on the weights the teacher had after the last step, and on the selected
    checkpoint's teacher separately."""
    method = make_method(make_cfg(tmp_path, "method.collapse_drop=null")).eval()
    teacher, anchor = method.teachers[0].model, method.anchors[0]
    selected = teacher_state(method)
    norm0 = math.sqrt(sum(float(b.double().square().sum()) for b in anchor.buffers()))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5)
        teacher.fc.weight.neg_()  # and the classifier flipped: other predictions
        teacher.fc.bias.neg_()
        moved = (method.teachers[0](VAL.x).argmax(1) == VAL.y).float().mean().item()
    change = math.sqrt(sum(float((p.detach().double() - b.double()).square().sum())
                           for p, b in zip(teacher.parameters(), anchor.buffers()))) / norm0
    method._step = 11
    method.after_validation()  # the last validation, after the last step
    teacher.load_state_dict(selected)  # what restoring best.pt does
    row = method.final_metrics(lambda fn, split: {})["atf"]["teachers"][0]
    assert row["weights"] == "end of training (after step 12)"
    assert change > 0.5 and row["relative_weight_change"] == pytest.approx(change, rel=1e-5)
    assert row["val_acc_after"] == pytest.approx(moved)
    assert row["val_acc_after"] != row["val_acc_before"]
    assert row["selected_checkpoint"]["relative_weight_change"] == 0.0
    assert row["selected_checkpoint"]["val_acc_after"] == pytest.approx(row["val_acc_before"])
    assert all(torch.equal(v, teacher_state(method)[k]) for k, v in selected.items())  # put back
