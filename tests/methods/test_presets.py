"""Every YAML under configs/ validates; the CIFAR-100 KD/DKD presets carry the mdistiller recipe."""
from pathlib import Path

import pytest

from graftkd.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_presets():
    assert len(ALL) >= 12


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_preset_validates(path):
    load_config(path)


@pytest.mark.parametrize("pair,teacher,student,beta", [("resnet32x4_resnet8x4", "resnet32x4", "resnet8x4", 8.0),
                                                       ("vgg13_vgg8", "vgg13", "vgg8", 6.0)])
def test_cifar100_presets_reproduce_mdistiller(pair, teacher, student, beta):
    kd, dkd = load_config(CONFIGS / f"cifar100/kd_{pair}.yaml"), load_config(CONFIGS / f"cifar100/dkd_{pair}.yaml")
    kd_ls, dkd_ls = (load_config(CONFIGS / f"cifar100/kd_ls_{pair}.yaml"),
                     load_config(CONFIGS / f"cifar100/dkd_ls_{pair}.yaml"))
    for c in (kd, dkd, kd_ls, dkd_ls):
        assert (c.model.name, [t.name for t in c.teachers]) == (student, [teacher])
        assert str(c.teachers[0].checkpoint) == f"runs/cifar100_{teacher}/model.pt"
        assert (c.data.source, str(c.data.root), c.data.batch_size, c.data.augment) == \
               ("cifar100", "data/cifar-100-python", 64, "cifar")
        o, s = c.optimizer, c.schedule
        assert (o.name, o.lr, o.momentum, o.weight_decay, o.nesterov) == ("sgd", 0.05, 0.9, 5e-4, False)
        assert (s.name, s.milestones, s.gamma, s.warmup_epochs, c.trainer.epochs) == \
               ("multistep", [150, 180, 210], 0.1, 0, 240)
    m = kd.method
    assert (m.temperature, m.ce_weight, m.kd_weight, m.standardize) == (4.0, 0.1, 0.9, False)
    m = dkd.method
    assert (m.temperature, m.ce_weight, m.alpha, m.beta, m.warmup_epochs, m.standardize) == (4.0, 1.0, 1.0, beta, 20, False)
    m = kd_ls.method
    assert (m.ce_weight, m.kd_weight, m.standardize) == (0.1, 9.0, True)
    assert m.temperature == (3.0 if teacher == "vgg13" else 2.0)  # LS README logs vgg13->vgg8 KD with T = 3
    m = dkd_ls.method
    assert (m.temperature, m.ce_weight, m.alpha, m.beta, m.standardize) == (2.0, 1.0, 9.0, 9 * beta, True)


def test_few_shot_atf_presets_share_the_few_shot_defaults():
    """configs/digits/atf.yaml and configs/synthetic/atf.yaml carry the same ATF method section, whose
    student loss is the `kd` method's (mode=offline minimises the same loss), only the teacher's head
    adapts, and only in the second half of the budget (steps in one, epochs in the other)."""
    from graftkd.methods.kd import KDMethod

    digits, synthetic = load_config(CONFIGS / "digits/atf.yaml"), load_config(CONFIGS / "synthetic/atf.yaml")
    warmup = {"warmup_epochs", "warmup_steps"}
    assert digits.method.model_dump(exclude=warmup) == synthetic.method.model_dump(exclude=warmup)
    assert (digits.method.warmup_epochs, 2 * digits.method.warmup_steps) == (0, digits.trainer.steps)
    assert (2 * synthetic.method.warmup_epochs, synthetic.method.warmup_steps) == (synthetic.trainer.epochs, None)
    m, kd = digits.method, KDMethod()
    assert (m.temperature, m.ce_weight, m.kd_weight, m.standardize, m.divergence) == \
           (kd.temperature, kd.ce_weight, kd.kd_weight, kd.standardize, kd.divergence)
    assert (m.mode, m.adapt, m.lam, m.teacher_weight_decay, m.teacher_ce_weight, m.guard) == \
           ("atf", "head", 0.1, 0.0, 1.0, 0.01)
    assert (digits.data.shots, digits.trainer.steps) == (5, 300)


def test_benchmark_studies_run_atf_with_the_few_shot_preset():
    from graftkd.methods.atf import ATFMethod
    from graftkd.study import load_study

    preset = load_config(CONFIGS / "digits/atf.yaml").method
    studies = sorted(s for s in (CONFIGS.parent / "benchmarks" / "studies").glob("*.yaml")
                     if not s.name.startswith("atf_full"))  # the full-label study runs ATF's class defaults
    fragments = [f["method"] for s in studies for f in load_study(s).methods.values()
                 if f.get("method", {}).get("name") == "atf"]
    assert len(fragments) >= 6
    for f in fragments:
        assert ATFMethod(**f) == preset.model_copy(update={"mode": f["mode"]})


def test_digits_graft_preset_is_the_design_chosen_on_validation():
    """docs/methods/graft.md: NetGraft's loss to the fused logit vector, 300 optimiser steps."""
    from graftkd.methods.graft import phase_steps

    c = load_config(CONFIGS / "digits/graft_fewshot.yaml")
    m = c.method
    assert (m.target, m.fused_loss, m.fused_logits, m.kd_weight, m.ce_weight, c.fusion.strategy) == \
           ("fused", "nlmse", "normalized_mean", 0.0, 0.0, "accuracy")
    assert (c.model.name, [t.name for t in c.teachers], c.data.shots, c.data.batch_size) == \
           ("resnet8", ["resnet20", "resnet8x4"], 5, 64)
    assert 4 * m.stage1.epochs[0] + sum(m.stage2.epochs) == 300  # one step per epoch at 5 and 10 shots
    assert phase_steps(300, m.stage1_share, 4) == ([35, 35, 35, 36], [53, 53, 53])
    steps = load_config(CONFIGS / "digits/graft_fewshot.yaml",
                        ["trainer.steps=300", "method.stage1.epochs=null", "method.stage2.epochs=null"])
    assert (steps.trainer.steps, steps.trainer.epochs) == (300, None)


@pytest.mark.parametrize("pair,published", [("resnet32x4_resnet8x4", {"fitnet": "73.50", "at": "73.44"}),
                                            ("vgg13_vgg8", {"fitnet": "71.02", "at": "71.43"})])
def test_cifar100_feature_presets_carry_mdistiller_recipe_and_state_the_target(pair, published):
    kd = load_config(CONFIGS / f"cifar100/kd_{pair}.yaml")
    for name, number in published.items():
        path = CONFIGS / f"cifar100/{name}_{pair}.yaml"
        c = load_config(path)
        assert f"Published top-1 it targets: {number}" in path.read_text()
        assert c.model_dump(exclude={"name", "method"}) == kd.model_dump(exclude={"name", "method"})
    fitnet, at = (load_config(CONFIGS / f"cifar100/{n}_{pair}.yaml").method for n in ("fitnet", "at"))
    assert (fitnet.hint, fitnet.feat_weight, fitnet.ce_weight, fitnet.kd_weight) == (2, 100.0, 1.0, 0.0)
    assert (at.p, at.feat_weight, at.skip_first, at.ce_weight, at.kd_weight) == (2.0, 1000.0, True, 1.0, 0.0)
