import copy

import pytest
import torch
from torch import nn

from graftkd.config import FusionConfig
from graftkd.engine.trainer import build_optimizer
from graftkd.errors import UserError
from graftkd.methods.base import StepContext
from graftkd.methods.graft import Graft, GraftMethod, shot_scaling
from graftkd.models import MODELS, create_model
from graftkd.models.staged import GraftedStudent
from graftkd.teachers.ensemble import Teacher, TeacherEnsemble
from graftkd.teachers.targets import TeacherTargets

STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def targets_of(*models: nn.Module, T: float = 4.0, fusion: FusionConfig = FusionConfig(strategy="mean"),
               val_acc: list[float] | None = None) -> TeacherTargets:
    teachers = [Teacher(m, f"t{i}", "test", *STATS, *STATS) for i, m in enumerate(models)]
    acc = torch.tensor(val_acc or [0.5] * len(models))
    return TeacherTargets(TeacherEnsemble(teachers, fusion, acc), T, False)


def make(host: str, student: str, size: int = 16, shots: int | None = None, others: tuple[nn.Module, ...] = (),
         steps: int | None = None, **opts) -> Graft:
    h, s = MODELS.get(host)(num_classes=3), MODELS.get(student)(num_classes=3)
    return Graft(GraftMethod(**opts), targets_of(h, *others, T=opts.get("temperature", 4.0)), 0, s,
                 student_name=student, input_size=size, batch_size=64, shots=shots, steps=steps)


def randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def step(method: Graft, x: torch.Tensor, y: torch.Tensor, phase_index: int = 0) -> dict:
    phase = method.phases()[phase_index]
    return method.training_step({"image": x, "label": y, "index": torch.arange(len(y)), "view": torch.zeros_like(y)},
                                StepContext(phase, 0, 0, 0, 1))


def test_identical_student_makes_every_hybrid_equal_the_host():
    m = make("resnet8", "resnet8")
    randomise(m.H.model)
    m._init_from_host()
    assert not m.t2s and not m.s2t and m.copied == len(m.net.state_dict())
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m.H.model(x)
        for phase in m.phases():
            m.start_phase(phase)
            assert torch.equal(m.eval_logits(x), ref), phase.name
    assert m.student_arch() == "resnet8" and type(m.student()) is type(m.net)


def test_phases_units_lrs_and_nshot_rule():
    assert shot_scaling(1, True, 64) == (0.1, 6)
    assert shot_scaling(5, True, 64) == (0.5, 32)
    assert shot_scaling(20, True, 64) == (2.0, 128)
    assert shot_scaling(None, True, 64) == (1.0, 64)
    assert shot_scaling(5, False, 64) == (1.0, 64)
    m = make("wrn_16_2", "wrn_40_1", shots=5)
    ph = m.phases()
    assert [(p.name, p.epochs, p.batch_size, p.select_best) for p in ph] == [
        ("stage1_stem", 100, 32, False), ("stage1_block1", 60, 32, False), ("stage1_block2", 60, 32, False),
        ("stage1_block3", 60, 32, False), ("stage1_head", 60, 32, False),
        ("stage2_to_block1", 100, 32, False), ("stage2_to_block2", 100, 32, False), ("stage2_to_block3", 100, 32, False),
        ("stage2_to_head", 100, 32, True)]
    s1, s2 = ph[2].optimizers[0], ph[-1].optimizers[0]
    assert s1.optimizer.name == "adam" and s1.optimizer.lr == pytest.approx(2.5e-4 * 0.5)
    assert s1.params[1]["lr_scale"] == pytest.approx(10.0)  # bridge lr 2.5e-3 x 0.5
    assert s2.optimizer.lr == pytest.approx(1e-4) and s2.params[1]["lr_scale"] == pytest.approx(1.0)
    assert {k: [c.in_channels, c.out_channels] for k, c in m.t2s.items()} == {"2": [32, 16], "3": [64, 32], "4": [128, 64]}
    assert {k: [c.in_channels, c.out_channels] for k, c in m.s2t.items()} == {"1": [16, 32], "2": [32, 64], "3": [64, 128]}


@pytest.mark.parametrize("phase_index,trained", [(0, {"net.conv1"}), (2, {"net.block2", "t2s.2", "s2t.2"}),
                                                 (4, {"net.bn1", "net.fc", "t2s.4"}),
                                                 (6, {"net.conv1", "net.block1", "net.block2", "t2s.2",
                                                      "s2t.1", "s2t.2"})])
def test_phase_trains_only_its_units(phase_index, trained):
    m = make("wrn_16_2", "wrn_40_1")
    phase = m.phases()[phase_index]
    m.start_phase(phase)
    m.train()
    opt = build_optimizer(phase.optimizers[0])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in in_opt}
    assert {".".join(n.split(".")[:2]) for n in names} == trained
    assert names == {n for n, p in m.named_parameters() if p.requires_grad}
    before = copy.deepcopy(m.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    out = step(m, x, y)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    for n, p in m.named_parameters():
        if id(p) not in in_opt:
            assert p.grad is None and torch.equal(p, before[n]), n
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names
    host_bn = {k: v for k, v in m.state_dict().items() if k.startswith("targets.") and "running" in k}
    assert all(torch.equal(v, before[k]) for k, v in host_bn.items())  # host BN statistics fixed


def test_host_loss_is_netgraft_normalised_mse_and_fused_is_t2_kl():
    m = make("resnet8", "resnet8", target="host")
    randomise(m.net)
    m.start_phase(m.phases()[0])
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    out = step(m, x, y)
    with torch.no_grad():
        s, z = m.hybrid(x), m.H.model(x)
    hand = sum(((s[b] / s[b].norm() - z[b] / z[b].norm()) ** 2).sum() for b in range(3))
    torch.testing.assert_close(out["nlmse"], hand, rtol=1e-6, atol=0)
    assert torch.equal(out["loss"], out["nlmse"])
    f = make("resnet8", "resnet8", target="fused", fused_loss="kl", temperature=2.0, ce_weight=0.5)
    randomise(f.net)
    f.start_phase(f.phases()[0])
    out = step(f, x, y)
    with torch.no_grad():
        s, z = f.hybrid(x), f.H.model(x)
    p, logq = torch.softmax(z / 2, 1), torch.log_softmax(s / 2, 1)
    kd = 4 * (p * (p.log() - logq)).sum(1).mean()
    ce = torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(out["kd"], kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], kd + 0.5 * ce, rtol=1e-5, atol=1e-7)


def test_fused_logits_in_the_normalised_logit_loss_per_stage_targets_and_fused_kd():
    """fused_loss=nlmse: NetGraft's loss to the fused logit vector; stage1.target=host: the host's
    logits in stage 1 and the fused target in stage 2; kd_weight adds T^2 KL to the fused probabilities."""
    other = MODELS.get("resnet8x4")(num_classes=3)
    randomise(other)
    m = make("resnet8", "resnet8", others=(other,), target="fused", fused_loss="nlmse",
             fused_logits="normalized_mean", stage1={"target": "host"}, kd_weight=0.5, temperature=2.0)
    randomise(m.net), randomise(m.H.model)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])

    def nlmse(s, t):
        return sum(((s[b] / s[b].norm() - t[b] / t[b].norm()) ** 2).sum() for b in range(len(s)))

    with torch.no_grad():
        z0, z1 = m.H.model(x), other(x)
    p = 0.5 * torch.softmax(z0 / 2, 1) + 0.5 * torch.softmax(z1 / 2, 1)
    for index, teacher_logits in ((0, z0), (len(m.phases()) - 1, 0.5 * z0 / z0.norm(dim=1, keepdim=True)
                                                             + 0.5 * z1 / z1.norm(dim=1, keepdim=True))):
        phase = m.phases()[index]
        m.start_phase(phase)
        assert m.active.target == ("host" if phase.name.startswith("stage1") else "fused")
        out = step(m, x, y, index)
        with torch.no_grad():
            s = m.hybrid(x)
        kd = 4 * (p * (p.log() - torch.log_softmax(s / 2, 1))).sum(1).mean()
        torch.testing.assert_close(out["nlmse"], nlmse(s, teacher_logits), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["kd"], kd, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["loss"], out["nlmse"] + 0.5 * kd, rtol=1e-6, atol=0)


def test_cache_needs_a_phase_that_reads_fused_probabilities():
    from graftkd.methods.graft import uses_fused_probs

    assert uses_fused_probs(GraftMethod(target="fused", fused_loss="kl"))
    assert uses_fused_probs(GraftMethod(target="host", stage2={"target": "fused"}, fused_loss="kl"))
    assert uses_fused_probs(GraftMethod(target="host", kd_weight=0.1))
    assert not uses_fused_probs(GraftMethod(target="host"))
    assert not uses_fused_probs(GraftMethod(target="fused", fused_loss="nlmse"))


@pytest.mark.parametrize("host,student,size,shared,arch,junctions", [
    ("vgg16", "vgg16_graft", 32, 3, "vgg16_graft", []),  # VGG blocks start with a conv: folded into it
    ("wrn_16_2", "wrn_40_1", 16, 0, "graft:wrn_40_1", [1, 2, 3]),  # pre-activation blocks: junctions
    ("resnet8x4", "resnet8", 16, 0, "graft:resnet8", [0]),  # identity shortcut after the stem
])
def test_folded_student_equals_hybrid_chain(host, student, size, shared, arch, junctions):
    m = make(host, student, size=size, shared_units=shared).double()
    for u in range(m.k, m.n_units):
        for module in m.unit_modules(u) + m.unit_bridges(u):
            randomise(module)
    m.start_phase(m.phases()[-1])
    m.eval()
    folded = m.student()
    assert m.student_arch() == arch and isinstance(folded, GraftedStudent) == bool(junctions)
    assert m.junction_boundaries == junctions
    for slot, conv in getattr(folded, "junctions", {}).items():  # slots the host did not need stay the identity
        eye = torch.eye(conv.in_channels).view_as(conv.weight)
        assert (int(slot) not in junctions) == (torch.equal(conv.weight, eye) and not conv.bias.any()), slot
    assert not any(mod is b for mod in folded.modules() for b in list(m.t2s.values()) + list(m.s2t.values()))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m.hybrid(x), rtol=0, atol=1e-5)
        rebuilt = create_model(arch, num_classes=3).double().eval()
        rebuilt.load_state_dict(folded.state_dict())
        assert torch.equal(rebuilt(x), folded(x))
    counts = m.param_counts()
    bridges = sum(p.numel() for d in (m.t2s, m.s2t) for p in d.parameters())
    assert counts["teacher"] == sum(p.numel() for p in m.H.model.parameters())
    assert counts["hybrid"] == sum(p.numel() for p in m.net.parameters()) + bridges
    if host == "vgg16":  # NetGraft: 5,412,682 parameters, every bridge folded away
        assert counts["teacher"] == 14_983_498 - 10 * 513 + 3 * 513
        assert counts["student"] == 5_412_682 - 7 * 513


def test_refusals():
    with pytest.raises(UserError, match="'conv1' must have the same tensors in both: 'conv1.weight' is "
                                        r"\(32, 3, 3, 3\) in host teacher 0 \(t0\) and \(16, 3, 3, 3\)"):
        make("resnet8x4", "resnet8", shared_units=1)
    with pytest.raises(UserError, match=r"shared_units = 5 but grafting .* has only 5 units \(stem, layer1"):
        make("resnet8", "resnet20", shared_units=5)
    h = MODELS.get("resnet8")(num_classes=3)
    t = TeacherTargets(TeacherEnsemble([Teacher(h, "t", "x", (0.1,) * 3, (0.2,) * 3, *STATS)], FusionConfig(),
                                       torch.tensor([1.0])), 4.0, False)
    with pytest.raises(UserError, match="set data.mean/data.std"):
        Graft(GraftMethod(), t, 0, MODELS.get("resnet8")(num_classes=3), student_name="resnet8", input_size=16,
              batch_size=8, shots=None)


def test_end_to_end_graft_run_on_synthetic(tmp_path):
    from graftkd.config import validate_config
    from graftkd.experiment import execute, read_metrics
    from graftkd.models import load_model_file

    data = {"source": "synthetic", "image_size": 16, "batch_size": 8, "shots": 2,
            "split": {"kind": "fraction", "train": 0.5, "val": 0.25, "test": 0.25, "seed": 0},
            "synthetic": {"patients": 8, "images_per_patient": 2, "size": [24, 24], "magnifications": [40]}}
    common = {"data": data, "trainer": {"progress": False, "device": "cpu"},
              "output": {"dir": str(tmp_path), "tensorboard": False}}
    teacher = validate_config({**common, "name": "t", "data": {**data, "shots": None}, "model": {"name": "resnet20"},
                               "trainer": {**common["trainer"], "epochs": 1}})
    execute(teacher)
    cfg = validate_config({**common, "name": "g", "model": {"name": "resnet8"},
                           "teachers": [{"name": "resnet20", "checkpoint": str(tmp_path / "t" / "model.pt")}],
                           "method": {"name": "graft", "target": "fused", "stage1": {"epochs": [1]},
                                      "stage2": {"epochs": [1]}}})
    run = execute(cfg)
    metrics = read_metrics(run)
    assert metrics["student"] == "resnet8" and metrics["data"]["fewshot"]["shots"] == 2
    assert metrics["selection"]["phase"] == "stage2_to_head"
    assert metrics["graft"]["units"] == ["stem", "layer1", "layer2", "layer3", "head"]
    assert metrics["graft"]["batch_size"] == 1
    assert metrics["params"]["student"] == sum(p.numel() for p in MODELS.get("resnet8")(num_classes=2).parameters())
    model, meta = load_model_file(run / "model.pt")
    assert meta["arch"] == "resnet8" and type(model).__name__ == "CifarResNet"
    # one budget in optimiser steps, shared out over the 9 phases (stage 1: round(11 * 0.5) = 6)
    method = {"name": "graft", "target": "fused", "fused_loss": "nlmse", "stage1_share": 0.5}
    steps = validate_config({**common, "name": "s", "model": {"name": "resnet8"}, "teachers": cfg.teachers,
                             "trainer": {**common["trainer"], "steps": 11}, "method": method})
    metrics = read_metrics(execute(steps))
    assert metrics["steps"] == 11 and metrics["phase_steps"] == {
        "stage1_stem": 1, "stage1_layer1": 1, "stage1_layer2": 1, "stage1_layer3": 1, "stage1_head": 2,
        "stage2_to_layer1": 1, "stage2_to_layer2": 1, "stage2_to_layer3": 1, "stage2_to_head": 2}
    both = validate_config({**steps.model_dump(mode="json"), "method": {**method, "stage1": {"epochs": [1]}}})
    with pytest.raises(UserError, match=r"trainer.steps = 11 and method.stage1.epochs = \[1\]: give grafting's length"):
        execute(both, overwrite=True)


def test_host_null_takes_the_best_teacher_the_student_can_be_grafted_into():
    """A teacher without a stage view ranked first on validation is skipped for the resnet20 behind it;
    it still contributes to the fused target."""
    from graftkd.methods.graft import first_graftable

    plain = nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    models = [plain, MODELS.get("resnet20")(num_classes=3)]
    t = targets_of(*models)

    def build(host):
        return Graft(GraftMethod(), t, host, MODELS.get("resnet8")(num_classes=3), student_name="resnet8",
                     input_size=16, batch_size=8, shots=None)

    m = first_graftable([0, 1], build, ["resnet8x4", "resnet20"])
    assert m.host_index == 1 and len(m.targets.ensemble) == 2
    with pytest.raises(UserError, match="Sequential has no stage view"):
        first_graftable([0], build, ["plain", "resnet20"])  # an explicit host: its own error
    with pytest.raises(UserError, match=r"no teacher can be the graft host:\n  teacher 0 \(plain\): .*no stage view"):
        first_graftable([0, 0], build, ["plain", "resnet20"])


def test_one_step_budget_split_into_the_phases():
    from graftkd.methods.graft import phase_steps, split_steps

    assert split_steps(10, 3) == [3, 3, 4] and split_steps(9, 3) == [3, 3, 3] and split_steps(2, 1) == [2]
    assert phase_steps(300, 0.5, 4) == ([37, 37, 38, 38], [50, 50, 50])
    assert phase_steps(300, 0.4, 4) == ([30, 30, 30, 30], [60, 60, 60])
    assert phase_steps(7, 0.5, 1) == ([7], [])  # no stage 2: stage 1 takes the whole budget
    with pytest.raises(UserError, match="every phase needs at least one step"):
        phase_steps(5, 0.5, 4)
    m = make("resnet8", "resnet20", shots=5, steps=301, stage1_share=0.4, shared_units=1)
    assert [(p.name, p.epochs, p.steps) for p in m.phases()] == [
        ("stage1_layer1", None, 30), ("stage1_layer2", None, 30), ("stage1_layer3", None, 30), ("stage1_head", None, 30),
        ("stage2_to_layer2", None, 60), ("stage2_to_layer3", None, 60), ("stage2_to_head", None, 61)]
    assert sum(p.steps for p in m.phases()) == 301
    with pytest.raises(UserError, match="method.stage2.epochs is null: give"):
        make("resnet8", "resnet20", stage2={"epochs": None})
