"""The Bar of issue 22: `graftkd distill` with grafting, FitNet and MiR on timm networks of different
families (random weights, tiny synthetic data at 64 px), export and ONNX check."""
import pytest
import torch

from graftkd.cli import main
from graftkd.export import export_model, load_exported
from graftkd.experiment import read_metrics
from graftkd.models import load_model_file

DATA = ["data.source=synthetic", "data.image_size=64", "data.batch_size=2", "data.eval_batch_size=8",
        "data.synthetic.patients=8", "data.synthetic.images_per_patient=2", "data.synthetic.size=[64,64]",
        "data.synthetic.magnifications=[40]",
        "data.split={kind: fraction, train: 0.5, val: 0.25, test: 0.25, seed: 0}",
        "trainer.progress=false", "trainer.device=cpu", "trainer.threads=1", "output.tensorboard=false"]


@pytest.fixture(scope="module")
def resnet50_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    (out / "base.yaml").write_text("name: base\n")
    DATA[:0] = ["-c", str(out / "base.yaml")]
    assert main(["train", *DATA, f"output.dir={out}", "name=t50", "model.name=resnet50", "trainer.steps=1",
                 "trainer.epochs=null", "method={name: supervised}"]) == 0
    return out, out / "t50" / "model.pt"


@pytest.mark.parametrize("student,arch", [("resnet18", "resnet18"),
                                          ("mobilenetv3_large_100", "mobilenetv3_large_100")])
def test_graft_resnet50_into_timm_students_exports_the_plain_student(resnet50_teacher, student, arch):
    out, teacher = resnet50_teacher
    assert main(["distill", *DATA, f"output.dir={out}", f"name=g_{student}", f"model.name={student}",
                 f"teachers=[{{name: resnet50, checkpoint: {teacher}}}]", "trainer.steps=11", "trainer.epochs=null",
                 "method={name: graft, target: host, stage1_share: 0.55, stage1: {epochs: null}, "
                 "stage2: {epochs: null}}"]) == 0
    run = out / f"g_{student}"
    metrics = read_metrics(run)
    assert metrics["graft"]["exported_arch"] == arch and metrics["graft"]["junctions_after"] == []
    assert metrics["graft"]["units"][0] in ("act1", "blocks.0") and metrics["graft"]["units"][-1] == "head"
    assert len(metrics["phase_steps"]) == 11 and sum(metrics["phase_steps"].values()) == 11
    model, meta = load_model_file(run / "model.pt")
    assert meta["arch"] == arch and type(model).__name__ in ("ResNet", "MobileNetV3")
    written = export_model(run, exporter="legacy")
    assert written["onnx"].is_file()
    predict, card = load_exported(run, backend="onnx")
    assert card["arch"] == arch and card["onnx_check"]["max_abs_diff"] < 1e-4
    assert predict(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("method", ["fitnet", "mir"])
def test_feature_methods_resnet50_to_mobilenetv3(resnet50_teacher, method):
    out, teacher = resnet50_teacher
    assert main(["distill", *DATA, f"output.dir={out}", f"name={method}", "model.name=mobilenetv3_large_100",
                 f"teachers=[{{name: resnet50, checkpoint: {teacher}}}]", "trainer.steps=2", "trainer.epochs=null",
                 f"method={{name: {method}}}"]) == 0
    metrics = read_metrics(out / method)
    assert metrics["steps"] == 2 and metrics["student"] == "mobilenetv3_large_100"
    model, meta = load_model_file(out / method / "model.pt")
    assert meta["arch"] == "mobilenetv3_large_100"
