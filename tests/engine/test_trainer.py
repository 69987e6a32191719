import math

import pytest
import torch

from graftkd.config import load_config
from graftkd.files import load_checkpoint, save_checkpoint
from graftkd.engine.trainer import Trainer, TrainingDiverged, lr_factor
from graftkd.errors import UserError
from graftkd.methods.base import Method, OptimSpec, Phase
from graftkd.methods.supervised import Supervised

from .toy import ToyNet, ToyViews


def make_cfg(tmp_path, *extra):
    return load_config(None, [f"output.dir={tmp_path}", "output.name=run", "output.tensorboard=false",
                              "trainer.epochs=4", "trainer.progress=false", "data.batch_size=8",
                              "optimizer.lr=0.1", "schedule.name=cosine", "schedule.warmup_epochs=1", *extra])


def fit(cfg, resume=False, trainer_cls=Trainer):
    torch.manual_seed(123)  # model init; resume must not depend on it
    method = Supervised(cfg, ToyNet())
    trainer = trainer_cls(cfg, cfg.run_dir)
    result = trainer.fit(method, ToyViews(), ToyViews(16, seed=1, augment=False), resume=resume)
    return method, result


class CrashAfter(Trainer):
    crash_at = 2

    def _save_last(self, method, state):
        super()._save_last(method, state)
        if state["global_epoch"] == self.crash_at:
            raise SystemExit("simulated crash")


def test_resume_is_exact(tmp_path):
    straight, r1 = fit(make_cfg(tmp_path / "a"))
    cfg = make_cfg(tmp_path / "b")
    with pytest.raises(SystemExit):
        fit(cfg, trainer_cls=CrashAfter)
    resumed, r2 = fit(cfg, resume=True)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert [row["train_loss"] for row in r1.history] == pytest.approx([row["train_loss"] for row in r2.history], abs=1e-6)
    assert (r1.best_epoch, r1.best_metric) == (r2.best_epoch, r2.best_metric)
    log = (cfg.run_dir / "log.csv").read_text().strip().splitlines()
    assert len(log) == 1 + 4


def test_best_checkpoint_is_selected_on_validation(tmp_path):
    cfg = make_cfg(tmp_path)
    method, result = fit(cfg)
    best = load_checkpoint(cfg.run_dir / "checkpoints" / "best.pt")
    vals = [row["val_acc"] for row in result.history]
    assert best["epoch"] == vals.index(max(vals)) == result.best_epoch
    for k, v in best["model"].items():
        assert torch.equal(method.state_dict()[k], v)


def test_atomic_checkpoint_survives_interrupted_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match="previous file is unchanged"):
        save_checkpoint(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(path)
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(UserError, match="not a graftkd checkpoint"):
        load_checkpoint(path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "graftkd-checkpoint-v1", "x": Evil()}, path)
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(path)


class NaNAt(Supervised):
    def training_step(self, batch, ctx):
        out = super().training_step(batch, ctx)
        if ctx.step == 9:
            out["ce"] = out["ce"] * float("nan")
            out["loss"] = out["ce"]
        return out


def test_nan_loss_stops_with_step_and_term_and_keeps_last_good(tmp_path):
    cfg = make_cfg(tmp_path)
    method = NaNAt(cfg, ToyNet())
    with pytest.raises(TrainingDiverged, match=r"step 9: .*ce=nan"):
        Trainer(cfg, cfg.run_dir).fit(method, ToyViews(), ToyViews(16, seed=1, augment=False))
    state = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    assert state["global_epoch"] == 1 and state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class TwoPhases(Method):
    """Phase 1 trains the body, phase 2 only the head; resumes across the phase boundary."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.net = cfg, ToyNet()

    def phases(self):
        c = self.cfg
        return [Phase("body", 2, [OptimSpec([{"params": self.net.body.parameters()}], c.optimizer, c.schedule)],
                      select_best=False),
                Phase("head", 2, [OptimSpec([{"params": self.net.fc.parameters(), "lr_scale": 0.5}], c.optimizer,
                                            c.schedule)])]

    def training_step(self, batch, ctx):
        loss = torch.nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])
        return {"loss": loss}

    def student(self):
        return self.net


def test_multi_phase_resume_across_boundary(tmp_path):
    def run(sub, crash=None):
        cfg = make_cfg(tmp_path / sub)
        torch.manual_seed(5)
        m = TwoPhases(cfg)
        cls = Trainer
        if crash:
            cls = type("C", (CrashAfter,), {"crash_at": crash})
            with pytest.raises(SystemExit):
                cls(cfg, cfg.run_dir).fit(m, ToyViews(), ToyViews(16, seed=1, augment=False))
            torch.manual_seed(99)
            m = TwoPhases(cfg)
            Trainer(cfg, cfg.run_dir).fit(m, ToyViews(), ToyViews(16, seed=1, augment=False), resume=True)
        else:
            Trainer(cfg, cfg.run_dir).fit(m, ToyViews(), ToyViews(16, seed=1, augment=False))
        return m

    a, b = run("a"), run("b", crash=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_lr_schedule_shapes():
    cfg = load_config(None, ["schedule.name=multistep", "schedule.milestones=[2,3]", "schedule.warmup_epochs=1"])
    f = [lr_factor(cfg.schedule, 0.1, 40, 10, k) for k in range(40)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[19] == 1.0
    assert f[20] == pytest.approx(0.1) and f[30] == pytest.approx(0.01)
    cos = load_config(None, ["schedule.name=cosine", "schedule.min_lr=0.01"]).schedule
    assert lr_factor(cos, 0.1, 10, 5, 0) == pytest.approx(1.0)
    assert lr_factor(cos, 0.1, 10, 5, 5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cos, 0.1, 10, 5, 10) == pytest.approx(0.1)


@pytest.mark.parametrize("asked,native,method,ran", [
    ("auto", True, [], "bf16"),
    ("auto", False, [], "fp32"),
    ("auto", True, ["method={name: kd, standardize: true}"], "fp32"),  # Z() of tied bf16 logits
    ("auto", True, ["method={name: atf, standardize: true}"], "fp32"),  # ATF standardising (CIFAR-100 preset)
    ("auto", True, ["method={name: atf}"], "bf16"),  # ATF at its defaults (kd student loss) does not
    ("fp32", True, [], "fp32"),
    ("bf16", False, ["method={name: atf}"], "bf16"),  # asked for: honoured
])
def test_precision_auto_follows_cpu_bf16_and_standardisation(tmp_path, monkeypatch, asked, native, method, ran):
    import graftkd.runtime as T

    monkeypatch.setattr(T, "cpu_native_bf16", lambda: native)
    cfg = make_cfg(tmp_path, f"trainer.precision={asked}", *method)
    got, why = T.resolve_precision(cfg, torch.device("cpu"))
    assert got == ran and why
    assert T.autocast_dtype(cfg, torch.device("cpu")) == (torch.bfloat16 if ran == "bf16" else None)



def test_step_budget_cuts_the_last_epoch_and_is_recorded(tmp_path):
    # 48 images, batch 8: 6 steps per epoch; 15 steps = 2 full epochs + 3 steps
    cfg = make_cfg(tmp_path, "trainer.epochs=null", "trainer.steps=15", "schedule.warmup_epochs=0",
                   "schedule.warmup_steps=2")
    method, result = fit(cfg)
    assert [row["step"] for row in result.history] == [6, 12, 15]
    assert result.steps == 15 and result.phase_steps() == {"train": 15}
    assert result.best_step in (6, 12, 15)
    # cosine over the 15 steps of the phase (the logged lr is the one for the next step): 0 only at the end
    assert [row["lr"] for row in result.history] == pytest.approx(
        [0.1 * lr_factor(cfg.schedule, 0.1, 15, 6, k) for k in (6, 12, 15)])
    assert result.history[1]["lr"] > 0.01 and result.history[-1]["lr"] == 0.0


def test_steps_alone_clear_the_epochs_default_and_both_are_refused():
    assert load_config(None, ["trainer.steps=7"]).trainer.epochs is None
    with pytest.raises(UserError, match="not both"):
        load_config(None, ["trainer.steps=7", "trainer.epochs=3"])
    cfg = load_config(None, ["schedule.warmup_steps=5"])
    assert [lr_factor(cfg.schedule, 0.1, 20, 6, k) for k in (0, 4, 5)] == pytest.approx([0.2, 1.0, 1.0])


def test_step_based_evaluation_runs_mid_epoch(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.epochs=null", "trainer.steps=14", "trainer.eval_every_steps=4")
    seen = []

    class Recording(Trainer):
        def validate(self, method, val_set):
            seen.append(self.step)  # optimiser steps done
            return super().validate(method, val_set)

    _, result = fit(cfg, trainer_cls=Recording)
    assert seen == [4, 8, 12, 14]
    assert [row.get("val_step") for row in result.history] == [4, 12, 14]


def test_resume_is_exact_with_a_step_budget_and_step_evaluation(tmp_path):
    extra = ("trainer.epochs=null", "trainer.steps=20", "trainer.eval_every_steps=5")
    straight, r1 = fit(make_cfg(tmp_path / "a", *extra))
    cfg = make_cfg(tmp_path / "b", *extra)
    with pytest.raises(SystemExit):
        fit(cfg, trainer_cls=CrashAfter)
    resumed, r2 = fit(cfg, resume=True)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert (r1.best_step, r1.best_metric, r1.steps) == (r2.best_step, r2.best_metric, 20)
    assert [row["step"] for row in r2.history] == [6, 12, 18, 20]


class WithUnlabeled(Supervised):
    """CE on the labelled images plus the entropy of every prediction (a label-free term)."""

    def uses_unlabeled(self) -> bool:
        return True

    def training_step(self, batch, ctx):
        from graftkd.methods.base import labelled_ce

        logits = self.model(batch["image"])
        p = logits.softmax(1)
        entropy = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
        assert batch["label"][batch["labeled"]].ge(0).all() and batch["label"][~batch["labeled"]].eq(-1).all()
        return {"loss": labelled_ce(logits, batch["label"]) + 0.1 * entropy, "n_unlabeled": (~batch["labeled"]).sum().float()}


def test_unlabelled_images_join_every_step_and_resume_exactly(tmp_path):
    def run(cfg, resume=False, trainer_cls=Trainer):
        torch.manual_seed(123)
        method = WithUnlabeled(cfg, ToyNet())
        result = trainer_cls(cfg, cfg.run_dir).fit(method, ToyViews(), ToyViews(16, seed=1, augment=False),
                                                   resume=resume, unlabeled=ToyViews(20, seed=2))
        return method, result

    extra = ("data.unlabeled_batch_size=6",)
    straight, r1 = run(make_cfg(tmp_path / "a", *extra))
    assert all(row["train_n_unlabeled"] == 6 for row in r1.history)
    cfg = make_cfg(tmp_path / "b", *extra)
    with pytest.raises(SystemExit):
        run(cfg, trainer_cls=CrashAfter)
    resumed, _ = run(cfg, resume=True)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(UserError, match="has no teacher-driven term"):
        Trainer(cfg, tmp_path / "c").fit(Supervised(cfg, ToyNet()), ToyViews(), ToyViews(16, seed=1),
                                         unlabeled=ToyViews(20, seed=2))
