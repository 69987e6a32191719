"""The issue-2 bar: `graftkd train -c <example>` then `graftkd evaluate` on a folder of images."""
import json

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from graftkd.cli import main
from graftkd.files import load_checkpoint


def make_folder(root, n=12):
    g = np.random.default_rng(0)
    for k, name in enumerate(["benign", "malignant"]):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = g.integers(0, 120, (3, 20, 20), dtype=np.uint8) + (100 if k else 0)
            write_png(torch.from_numpy(img.astype(np.uint8)), str(root / name / f"{i:03d}.png"))


def test_train_resume_evaluate_on_image_folder(tmp_path, capsys):
    make_folder(tmp_path / "imgs")
    args = ["-c", "configs/examples/folder_teacher.yaml", f"data.root={tmp_path / 'imgs'}", f"output.dir={tmp_path}",
            "data.image_size=16", "trainer.epochs=2", "trainer.progress=false", "model.name=resnet8",
            "output.tensorboard=false", "data.batch_size=8"]
    assert main(["train", *args]) == 0
    run = tmp_path / "folder_teacher"
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out
    for name in ("config.yaml", "log.csv", "splits.csv", "model.pt", "metrics.json", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selection"]["metric"] == "val_acc" and 0 <= metrics["test"]["accuracy"] <= 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["phase_index"] == 1
    last_row = (run / "log.csv").read_text().strip().splitlines()[-1].split(",")
    assert metrics["phase_steps"] == {"train": metrics["steps"]} and str(metrics["steps"]) in last_row

    # the same command again refuses to clobber the run; --resume of a finished run is a no-op re-score
    assert main(["train", *args]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", *args, "--resume"]) == 0

    assert main(["evaluate", str(run), "--split", "test"]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_misspelt_key_is_refused_with_one_line(capsys):
    assert main(["train", "-c", "configs/examples/folder_teacher.yaml", "optimiser.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optimiser" in err and "'optimizer'" in err


def test_distill_refuses_supervised_and_train_refuses_kd(capsys):
    assert main(["distill", "-c", "configs/examples/folder_teacher.yaml"]) == 2
    assert "use `graftkd train`" in capsys.readouterr().err
    assert main(["train", "-c", "configs/examples/folder_teacher.yaml", "method.name=kd"]) == 2
    assert "use `graftkd distill`" in capsys.readouterr().err
