"""Runs end to end with the unlabelled rest of the training split (kd, mt_kd with the soft-target
cache, graft fused) and a histology run with HED jitter and Macenko normalisation that trains,
exports and predicts."""
import json

import pytest
import torch
import torch.nn.functional as F

from graftkd.config import validate_config
from graftkd.data import build_data
from graftkd.errors import UserError
from graftkd.experiment import execute

SYN = {"patients": 16, "images_per_patient": 3, "size": [40, 40], "magnifications": [40]}


def _base(tmp_path, **data):
    return {"seed": 0, "trainer": {"steps": 4, "epochs": None, "progress": False, "device": "cpu",
                                   "eval_every_steps": 2},
            "output": {"dir": str(tmp_path), "tensorboard": False},
            "data": {"source": "synthetic", "image_size": 16, "batch_size": 8, "synthetic": SYN, **data}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return execute(validate_config({**_base(tmp), "name": "teacher", "model": {"name": "resnet8"}})) / "model.pt"


def test_kd_mt_kd_and_graft_learn_from_the_unlabelled_rest(tmp_path, teacher):
    data = {"shots": 2, "unlabeled": "train_rest", "unlabeled_batch_size": 6}
    t = {"checkpoint": str(teacher)}
    runs = {
        "kd": {"method": {"name": "kd"}, "teachers": [t]},
        "mt_kd": {"method": {"name": "kd"}, "teachers": [t, t], "fusion": {"strategy": "mean"},
                  "teacher_cache": {"enabled": True, "views": 2}},
        "graft": {"method": {"name": "graft", "target": "fused", "fused_loss": "nlmse"}, "teachers": [t]},
    }
    for name, extra in runs.items():
        base = _base(tmp_path, **data)
        if name == "graft":
            base["trainer"]["steps"] = 12  # a step for each stage-1 and stage-2 phase
        run = execute(validate_config({**base, **extra, "name": name, "model": {"name": "resnet8"}}))
        m = json.loads((run / "metrics.json").read_text())
        u = m["data"]["unlabeled"]
        assert u["source"] == "train_rest" and u["images"] > 0 and u["drawn"] == m["steps"] * 6, name
        assert m["data"]["counts"]["train"]["images"] == 4  # 2 shots x 2 classes stay the labelled set
    # the soft-target cache covers the unlabelled images (indices after the training set's), view by view
    cfg = validate_config({**_base(tmp_path, **data), **runs["mt_kd"], "name": "mt_kd", "model": {"name": "resnet8"}})
    bundle = build_data(cfg.data, cfg.seed, work_dir=tmp_path)
    stored = torch.load(tmp_path / "mt_kd" / "cache" / "soft_targets.pt", weights_only=False)
    n, n_u = len(bundle.train), len(bundle.unlabeled)
    assert stored["values"].shape == (n + n_u, 2, 2)
    from graftkd.models import load_model_file

    model, _ = load_model_file(teacher)
    x = torch.stack([bundle.unlabeled.load_view(j, 1) for j in range(n_u)])
    with torch.no_grad():
        live = F.softmax(model.eval()(x) / 4.0, 1)
    assert (stored["values"][n:, 1].float() - live).abs().max() < 2e-3


def test_label_terms_use_only_the_labelled_images(teacher):
    from graftkd.methods.base import labelled_acc, labelled_ce

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, -1, -1])
    assert torch.allclose(labelled_ce(logits, labels), F.cross_entropy(logits[:2], labels[:2]))
    assert labelled_acc(logits, labels).item() == 0.5


def test_a_method_without_a_teacher_term_refuses_unlabelled_images(tmp_path):
    cfg = validate_config({**_base(tmp_path, shots=2, unlabeled="train_rest"), "name": "sup",
                           "model": {"name": "resnet8"}})
    with pytest.raises(UserError, match="method 'supervised' has no teacher-driven term"):
        execute(cfg)
    assert not (tmp_path / "sup").exists()  # a failed start leaves no run folder


def test_confidence_fusion_needs_labels(tmp_path, teacher):
    t = {"checkpoint": str(teacher)}
    cfg = validate_config({**_base(tmp_path, shots=2, unlabeled="train_rest"), "name": "c", "model": {"name": "resnet8"},
                           "method": {"name": "kd"}, "teachers": [t, t], "fusion": {"strategy": "confidence"}})
    with pytest.raises(UserError, match="fusion.strategy = confidence"):
        execute(cfg)


def test_histology_run_with_stain_jitter_and_macenko_trains_exports_and_predicts(tmp_path):
    from graftkd.eval.predict import predict_probs
    from graftkd.export import export_model, load_exported
    from graftkd.models import load_model_file

    base = _base(tmp_path, augment="histology_stain", stain_jitter={"scale": 0.1, "shift": 0.05},
                 stain_norm={"method": "macenko", "sample": 4},
                 split={"kind": "centre", "test_centres": ["1"], "val_fraction": 0.25})
    base["data"]["synthetic"] = {**SYN, "centres": 2}
    run = execute(validate_config({**base, "name": "stain", "model": {"name": "resnet8"}}))
    reference = json.loads((run / "stain_reference.json").read_text())
    assert reference["method"] == "macenko" and len(reference["params"]["stain_matrix"]) == 3
    _, meta = load_model_file(run / "model.pt")
    assert meta["extra"]["stain_normalization"] == reference
    written = export_model(run, formats=("safetensors",), out_dir=tmp_path / "export")
    card = json.loads(written["card"].read_text())
    assert card["stain_normalization"] == reference
    # predict normalises new images as training did: the same probabilities as the run's own test images
    data = build_data(validate_config({**base, "name": "stain"}).data, 0, work_dir=tmp_path)
    paths = [r.path for r in data.test.records[:5]]
    model, _ = load_model_file(run / "model.pt")
    with torch.no_grad():
        expected = model.eval()(torch.stack([data.test[i]["image"] for i in range(5)])).softmax(-1)
    for source in (run / "model.pt", tmp_path / "export"):
        predictor, pcard = load_exported(source)
        assert torch.allclose(predict_probs(predictor, pcard, paths), expected, atol=1e-5)


#: the methods with a teacher term besides kd/graft, as tiny runs on the resnet8 teacher (extra config)
TEACHER_TERM_METHODS = {
    "fitnet": {"name": "fitnet", "hint": -1},
    "at": {"name": "at"},
    "mir": {"name": "mir", "ce_weight": 0.5, "kd_weight": 0.5},
    "fskd": {"name": "fskd"},
    "atf": {"name": "atf", "warmup_epochs": 0},
    "dml": {"name": "dml", "peers": [{"name": "resnet8"}], "teacher_weight": 1.0},
}


@pytest.mark.parametrize("name", list(TEACHER_TERM_METHODS))
def test_every_method_with_a_teacher_term_learns_from_the_unlabelled_rest(tmp_path, teacher, name):
    """A run with train_rest records the unlabelled images it drew; in a step on labelled rows
    followed by unlabelled rows (label -1), CE and accuracy equal those of the labelled rows alone,
    the unlabelled rows' labels are never read, and the unlabelled images still move the loss."""
    from graftkd.distributed import DistContext
    from graftkd.experiment import build_student_factory
    from graftkd.methods.base import METHODS, StepContext

    data = {"shots": 2, "unlabeled": "train_rest", "unlabeled_batch_size": 6}
    cfg = validate_config({**_base(tmp_path, **data), "name": name, "model": {"name": "resnet8"},
                           "teachers": [{"checkpoint": str(teacher)}], "method": TEACHER_TERM_METHODS[name]})
    run = execute(cfg)
    m = json.loads((run / "metrics.json").read_text())
    u = m["data"]["unlabeled"]
    assert u["source"] == "train_rest" and u["images"] > 0 and u["drawn"] == m["steps"] * 6
    assert m["data"]["counts"]["train"]["images"] == 4

    # one step by hand, in eval mode (per-image BN): 4 labelled rows, then 6 unlabelled ones labelled -1
    bundle = build_data(cfg.data, cfg.seed, work_dir=tmp_path)
    method = METHODS.get(name)(cfg, bundle, build_student=build_student_factory(cfg, bundle.num_classes),
                               run_dir=tmp_path / "by_hand", device=torch.device("cpu"), dist=DistContext())
    phase = method.phases()[0]
    method.start_phase(phase)
    method.eval()
    labelled = [bundle.train[i] for i in range(4)]
    unlabelled = [bundle.unlabeled[j] for j in range(6)]
    x = torch.stack([r["image"] for r in labelled + unlabelled]).requires_grad_(True)
    y = torch.tensor([r["label"] for r in labelled] + [-1] * 6)
    batch = {"image": x, "label": y, "labeled": y >= 0, "view": torch.zeros(10, dtype=torch.long),
             "index": torch.tensor([r["index"] for r in labelled + unlabelled])}
    ctx = StepContext(phase=phase, epoch=0, step=0, step_in_epoch=0, steps_per_epoch=1, phase_step=0, phase_steps=4)
    out = method.training_step(batch, ctx)
    with torch.no_grad():
        logits = method.eval_logits(x[:4])
    assert torch.allclose(out["ce"], F.cross_entropy(logits.float(), y[:4]), atol=1e-5), name
    assert out["acc"].item() == (logits.argmax(1) == y[:4]).float().mean().item()
    out["loss"].backward()
    assert x.grad[4:].abs().sum() > 0, f"{name}: the unlabelled images do not reach the loss"
    if name == "atf":  # the collapse check counts the labelled images only
        method.window.zero_()
        method.watch_collapse(torch.zeros(1, 10, 2), y, [True])
        assert method.window[0].tolist() == [float((y[:4] == 0).sum()), 4.0]


def test_dml_without_a_teacher_term_refuses_unlabelled_images(tmp_path):
    cfg = validate_config({**_base(tmp_path, shots=2, unlabeled="train_rest"), "name": "dml",
                           "model": {"name": "resnet8"}, "method": {"name": "dml", "peers": [{"name": "resnet8"}]}})
    with pytest.raises(UserError, match="method 'dml' has no teacher-driven term.*dml with teachers and "
                                        "method.teacher_weight > 0.*set data.unlabeled=null"):
        execute(cfg)
