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
