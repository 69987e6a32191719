"""Bad input through the real CLI: one line on stderr naming the culprit, exit code 2, no traceback
(a traceback with ``--debug``). The >= 30 kinds that must also leave no trace are in test_no_trace.py;
this file holds the helpers it shares and the cases that need a run of their own."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

import graftkd.files as gio
from graftkd.cli import main
from graftkd.files import load_checkpoint
from graftkd.errors import UserError
from graftkd.models import create_model, save_model_file

from .procs import env

TINY = ["data.image_size=16", "data.batch_size=4", "data.eval_batch_size=8", "model.name=resnet8",
        "trainer.epochs=2", "trainer.progress=false", "trainer.device=cpu", "output.tensorboard=false",
        "data.split.train=0.5", "data.split.val=0.25", "data.split.test=0.25", "data.decoded_cache=none"]


def write_png(path: Path, seed: int) -> Path:
    img = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, 20, 20), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(img).numpy().tobytes())
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/<benign|malignant>/<i>.png, 8 images per class."""
    root = tmp_path / "images"
    for c, name in enumerate(("benign", "malignant")):
        for i in range(8):
            write_png(root / name / f"{i}.png", seed=10 * c + i)
    return root


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``graftkd argv`` in-process; (exit code, stderr)."""
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *culprits: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("graftkd ") and ": error: " in lines[0], err
    for c in culprits:
        assert c in lines[0], (c, err)


def base_config(tmp_path: Path) -> str:
    path = tmp_path / "base.yaml"
    path.write_text("name: experiment\n")
    return str(path)


def train(capsys, tmp_path, root: Path, *extra: str, command: str = "train") -> tuple[int, str]:
    return cli(capsys, command, "-c", base_config(tmp_path), *TINY, "data.source=folder", f"data.root={root}",
               f"output.dir={tmp_path / 'runs'}", *extra)


# ----------------------------------------------------------------------------------- images
def test_text_file_named_like_an_image_and_other_files_ignored(capsys, tmp_path, tree):
    (tree / "benign" / "notes.txt").write_text("not an image, not an image suffix: ignored\n")
    fake = tree / "malignant" / "scan.jpg"
    fake.write_text("this is text\n")
    assert_one_line_error(*train(capsys, tmp_path, tree), str(fake))
    fake.unlink()
    assert main(["data", "summary", *TINY, "data.source=folder", f"data.root={tree}"]) == 0
    assert "| benign | 8 |" in capsys.readouterr().out


def test_skipped_damaged_images_are_counted_in_the_summary_and_metrics(capsys, tmp_path, tree):
    import json

    bad = tree / "benign" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a valid header, truncated data
    (tree / "malignant" / "empty.png").write_bytes(b"")
    assert train(capsys, tmp_path, tree, "data.on_bad_file=skip", "trainer.epochs=1")[0] == 0
    data = json.loads((tmp_path / "runs" / "experiment" / "metrics.json").read_text())["data"]
    assert data["skipped_unreadable"] == 2 and any(str(bad) in e for e in data["unreadable_examples"])
    assert main(["data", "summary", *TINY, "data.source=folder", f"data.root={tree}", "data.on_bad_file=skip",
                 f"output.dir={tmp_path / 'runs'}"]) == 0
    assert "skipped unreadable: 2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- teachers
def teacher_file(tmp_path: Path, arch: str, classes: list[str]) -> Path:
    path = tmp_path / f"teacher_{arch}_{len(classes)}.pt"
    save_model_file(path, create_model(arch, num_classes=len(classes)), arch=arch, num_classes=len(classes),
                    classes=classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_size=16)
    return path


# ------------------------------------------------------------------------------ output/disk
def test_disk_full_on_checkpoint_write_keeps_the_previous_checkpoint(capsys, tmp_path, tree, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f):
        calls.append(1)
        if obj.get("kind") == "train_state" and obj.get("global_epoch") == 2:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(gio.torch, "save", save)
    rc, err = train(capsys, tmp_path, tree)
    monkeypatch.undo()
    last = tmp_path / "runs" / "experiment" / "checkpoints" / "last.pt"
    assert_one_line_error(rc, err, str(last), "No space left on device", "previous file is unchanged")
    assert load_checkpoint(last)["global_epoch"] == 1
    assert not list(last.parent.glob(".*.tmp"))


def test_foreign_checkpoint_on_resume(capsys, tmp_path, tree):
    assert train(capsys, tmp_path, tree, "trainer.epochs=1")[0] == 0
    last = tmp_path / "runs" / "experiment" / "checkpoints" / "last.pt"
    torch.save({"state_dict": {}}, last)
    assert_one_line_error(*train(capsys, tmp_path, tree, "trainer.epochs=1", "--resume"), str(last), "not a graftkd checkpoint")
    last.write_bytes(b"PK\x03\x04 truncated")
    assert_one_line_error(*train(capsys, tmp_path, tree, "trainer.epochs=1", "--resume"), str(last), "cannot load checkpoint")


# ------------------------------------------------------------------------------------ debug
def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        main(["--debug", "train", "-c", str(tmp_path / "missing.yaml")])


def test_subprocess_exit_code_and_traceback_only_with_debug(tmp_path):
    cmd = [sys.executable, "-m", "graftkd", "train", "-c", str(tmp_path / "missing.yaml")]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "missing.yaml" in p.stderr, p.stderr
    p = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr and "UserError" in p.stderr


# ------------------------------------------------------------------- where a bad key came from
def test_bad_key_names_its_real_source(capsys, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("trainer:\n  epoch: 3\n")
    assert_one_line_error(*cli(capsys, "train", "-c", str(cfg)), f"{cfg}: unknown config key 'trainer.epoch'")
    cfg.write_text("name: x\n")
    rc, err = cli(capsys, "train", "-c", str(cfg), "optimizer.lrr=0.1")
    assert_one_line_error(rc, err, "command line 'optimizer.lrr=0.1': unknown config key 'optimizer.lrr'; "
                                   "did you mean 'optimizer.lr'?")
    assert str(cfg) not in err
    rc, err = cli(capsys, "distill", "-c", str(cfg), "method.name=kdd")
    assert_one_line_error(rc, err, "command line 'method.name=kdd'", "unknown method 'kdd'")


def test_overrides_stand_on_either_side_of_flags(capsys, tmp_path):
    from graftkd.cli import parse

    args = parse(["train", "a.b=1", "-c", "x.yaml", "c.d=2", "--overwrite", "e.f=3", "--nproc", "2", "g.h=4"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3", "g.h=4"] and args.overwrite and args.nproc == 2
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: x\n")
    rc, err = cli(capsys, "train", "-c", str(cfg), "trainer.epochs=2", "--overwrite", "trainer.epochx=2")
    assert_one_line_error(rc, err, "command line 'trainer.epochx=2'")  # the override after the flag was read
    with pytest.raises(SystemExit) as ex:
        main(["train", "-c", str(cfg), "a=1", "--overwrite", "--bogus", "b=2"])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("graftkd train: error: unrecognized arguments: --bogus (see"), err


def test_unsafe_checkpoints_one_line_no_weights_only_advice_no_warning(capsys, tmp_path, tree):
    """A raw pickle (protocol 4: PyTorch warns before failing) and a torch file holding a numpy array."""
    import pickle
    import warnings

    raw, numpy_file = tmp_path / "raw.pt", tmp_path / "numpy.pt"
    raw.write_bytes(pickle.dumps({"state_dict": {"w": [1.0]}}, protocol=4))
    torch.save({"w": np.zeros(2)}, numpy_file)
    for path, reason in ((raw, "Unsupported operand"), (numpy_file, "GLOBAL numpy")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc, err = train(capsys, tmp_path, tree, f"model.checkpoint={path}")
        assert not caught, [str(w.message) for w in caught]
        assert_one_line_error(rc, err, str(path), reason, "not a weights-only PyTorch file")
        assert "weights_only" not in err and "trust" not in err


def test_user_error_in_a_dataloader_worker_is_one_line():
    """An image that breaks after the scan, read by a DataLoader worker: the worker's traceback that
    PyTorch puts into the re-raised error's message is dropped."""
    from graftkd.cli import one_line

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise UserError("cannot decode image /data/a.png: image file is truncated")

    with pytest.raises(UserError) as ex:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert "Traceback" in str(ex.value)
    assert one_line(str(ex.value)) == "cannot decode image /data/a.png: image file is truncated"
