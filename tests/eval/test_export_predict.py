"""Export round trips (safetensors, ONNX), the loud ONNX failure, predict from exported files alone."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

import graftkd.export as export
from graftkd.cli import main
from graftkd.data.transforms import eval_transform
from graftkd.errors import UserError
from graftkd.export import export_model, load_exported
from graftkd.models import load_model_file

from tests.eval.conftest import CLASSES, IMAGE_SIZE, MEAN, STD


@pytest.fixture
def exported(tiny_run: Path, tmp_path: Path) -> Path:
    """Exported files copied to a folder of their own; the run folder is then deleted."""
    out = tmp_path / "export"
    export_model(tiny_run, ["safetensors", "onnx"], tiny_run / "export", exporter="legacy")
    shutil.copytree(tiny_run / "export", out)
    shutil.copy(tiny_run / "model.pt", tmp_path / "model.pt")
    shutil.rmtree(tiny_run)
    return out


def test_card_and_round_trips(tiny_run: Path, exported: Path, tmp_path: Path) -> None:
    card = json.loads((exported / "model_card.json").read_text())
    assert sorted(p.name for p in exported.iterdir()) == ["model_card.json", "student.onnx", "student.safetensors"]
    assert (card["arch"], card["classes"], card["image_size"]) == ("resnet8", CLASSES, IMAGE_SIZE)
    assert (tuple(card["mean"]), tuple(card["std"])) == (MEAN, STD)
    assert card["input"]["shape"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    assert set(card["metrics"]) == {"val", "test"} and "patient_recognition_rate" in card["metrics"]["test"]
    assert card["onnx_check"]["max_abs_diff"] < 1e-4 and card["onnx_check"]["batch"] == 5
    assert card["params"] == sum(p.numel() for p in load_model_file(tmp_path / "model.pt")[0].parameters())
    assert len(card["config_sha256"]) == 64
    ref_model = load_model_file(tmp_path / "model.pt")[0].eval()
    x = torch.randn(7, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode():
        ref = ref_model(x)
    for backend in ("torch", "onnx"):
        fn, c = load_exported(exported, backend)
        assert c == card
        assert (fn(x) - ref).abs().max().item() < 1e-4  # batch 7: the ONNX batch axis is dynamic
    fn, _ = load_exported(exported / "student.onnx")
    assert fn(x[:1]).shape == (1, 2)


def test_config_hash_is_sha256_of_config_yaml(tiny_run: Path) -> None:
    expected = hashlib.sha256((tiny_run / "config.yaml").read_bytes()).hexdigest()
    written = export_model(tiny_run, ["safetensors"])
    card = json.loads(written["card"].read_text())
    assert card["config_sha256"] == expected and card["files"] == {"safetensors": "student.safetensors"}


def test_dynamo_exporter_round_trip(tiny_run: Path) -> None:
    export_model(tiny_run, ["onnx"], exporter="dynamo")
    fn, _ = load_exported(tiny_run / "student.onnx")
    ref = load_model_file(tiny_run / "model.pt")[0].eval()
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode():
        assert (fn(x) - ref(x)).abs().max().item() < 1e-4


def test_onnx_mismatch_fails_loudly(tiny_run: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    real = export.onnx_bytes

    def perturbed(model: torch.nn.Module, hw: tuple[int, int], exporter: str) -> bytes:
        other = load_model_file(tiny_run / "model.pt")[0].eval()
        with torch.no_grad():
            other.fc.bias.add_(1e-3)  # a mismatch just above the 1e-4 tolerance
        return real(other, hw, exporter)

    monkeypatch.setattr(export, "onnx_bytes", perturbed)
    with pytest.raises(UserError, match=r"ONNX export check failed: max \|onnxruntime - PyTorch\| = 0.001"):
        export_model(tiny_run, ["onnx"], exporter="legacy")
    assert not (tiny_run / "student.onnx").exists()
    assert main(["export", str(tiny_run), "--format", "onnx", "--onnx-exporter", "legacy"]) == 2
    assert "student.onnx was not written" in capsys.readouterr().err


def _write_images(folder: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    names = ["SOB_B_A-14-22549AB-40-001.png", "SOB_B_A-14-22549AB-100-002.png", "SOB_M_DC-14-2523-40-001.png"]
    folder.mkdir()
    for n in names:
        write_png(torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8, generator=g), str(folder / n))
    return [folder / n for n in names]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_predict_from_exported_files_alone(exported: Path, tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "imgs")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(exported), str(tmp_path / "imgs"), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in paths)
    assert list(rows[0]) == ["path", "predicted", "confidence", "p_benign", "p_malignant", "group", "magnification"]
    fn, card = load_exported(exported)
    t = eval_transform(IMAGE_SIZE, MEAN, STD)
    from torchvision.io import decode_image
    x = torch.stack([t(decode_image(str(p))) for p in sorted(paths)])
    probs = fn(x).softmax(-1)
    got = torch.tensor([[float(r["p_benign"]), float(r["p_malignant"])] for r in rows])
    assert torch.allclose(got, probs, atol=1e-6)
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in probs.argmax(1).tolist()]
    patients = _rows(tmp_path / "pred_patients.csv")
    by_group = {r["group"]: r for r in patients}
    assert sorted(by_group) == ["14-22549", "14-2523"]  # patients: year-slide number
    assert by_group["14-22549"]["n_images"] == "2"
    mean = probs[[i for i, r in enumerate(rows) if r["group"] == "14-22549"]].mean(0)
    assert float(by_group["14-22549"]["p_malignant"]) == pytest.approx(float(mean[1]), abs=1e-6)


def test_predict_tta_manifest_and_onnx_backend(exported: Path, tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "imgs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,group\n" + "".join(f"{p.name},{'X' if i < 2 else 'Y'}\n" for i, p in enumerate(paths)))
    out = tmp_path / "tta.csv"
    assert main(["predict", str(exported / "student.onnx"), *map(str, paths), "--out", str(out), "--tta",
                 "--manifest", str(manifest)]) == 0
    rows = _rows(out)
    fn, _ = load_exported(exported)
    t = eval_transform(IMAGE_SIZE, MEAN, STD)
    from torchvision.io import decode_image
    x = torch.stack([t(decode_image(str(p))) for p in paths])
    views = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
    expected = torch.stack([fn(v).softmax(-1) for v in views]).mean(0)
    got = torch.tensor([[float(r["p_benign"]), float(r["p_malignant"])] for r in rows])
    assert torch.allclose(got, expected, atol=1e-5)
    assert [r["group"] for r in rows] == ["X", "X", "Y"] and "magnification" not in rows[0]
    assert [r["group"] for r in _rows(tmp_path / "tta_patients.csv")] == ["X", "Y"]


def test_unreadable_image_names_the_file(exported: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["predict", str(exported), str(bad), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {bad}" in err
    assert not (tmp_path / "p.csv").exists()
