"""A full or read-only disk at every write point gives one line naming the path and loses nothing
(issue 21, guarantee 5, by fault injection).

Every file graftkd writes goes through ``graftkd.files._atomic`` (temp file, fsync, rename). A clean
tiny run counts those writes; then the run is repeated once per write point with that write failing
inside the real ``_atomic`` (ENOSPC or EROFS, alternately). Each time: exit 0 (the write was a cache,
which only costs time) or exit 2 with one line naming the file; the finished run beside it is
byte-identical; no temporary file is left; and a run folder that stays behind can be resumed.
"""
from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path

import graftkd.files as gio
from graftkd.cli import main

from .test_bad_input import TINY, write_png


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_disk_at_every_write_point_gives_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    tree = tmp_path / "images"
    for c, name in enumerate(("benign", "malignant")):
        for i in range(6):
            write_png(tree / name / f"{i}.png", seed=10 * c + i)
    (tmp_path / "exp.yaml").write_text("name: exp\n")
    out = tmp_path / "runs"

    def args(name: str) -> list[str]:
        return ["train", "-c", str(tmp_path / "exp.yaml"), *TINY, "trainer.epochs=1", "data.source=folder",
                f"data.root={tree}", f"output.dir={out}", f"output.name={name}"]

    real = gio._atomic
    assert main(args("done")) == 0
    done = _hashes(out / "done")
    capsys.readouterr()
    points: list[Path] = []

    for k in range(100):
        shutil.rmtree(out / "new", ignore_errors=True)
        code = (errno.ENOSPC, errno.EROFS)[k % 2]
        calls = [0]
        failed: list[Path] = []

        def faulty(path, write, mode, k=k, code=code, calls=calls, failed=failed):
            calls[0] += 1
            if calls[0] - 1 == k:
                failed.append(Path(path))

                def broken(f):
                    f.write(b"partial" if "b" in mode else "partial")
                    raise OSError(code, __import__("os").strerror(code))
                return real(path, broken, mode)
            return real(path, write, mode)

        monkeypatch.setattr(gio, "_atomic", faulty)
        rc = main(args("new"))
        monkeypatch.setattr(gio, "_atomic", real)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        if not failed:  # the run made fewer than k + 1 writes: every point has been tried
            assert rc == 0, err
            break
        points.append(failed[0])
        if rc == 0:  # only a cache may fail without stopping the run
            assert ".cache" in str(failed[0]), (k, failed, err)
        else:
            assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (k, err)
            assert str(failed[0]) in lines[0] or str(failed[0].parent) in lines[0], (k, failed, err)
            assert __import__("os").strerror(code) in lines[0], (k, err)
        assert _hashes(out / "done") == done, k  # the finished run is untouched
        assert not [p for p in out.rglob("*.tmp")], k  # no half-written file is left
        if (out / "new").exists():  # the run got past its first checkpoint: what it wrote can be resumed
            assert gio.load_checkpoint(out / "new" / "checkpoints" / "last.pt")["format"] == gio.CHECKPOINT_FORMAT
    names = {p.name for p in points}
    assert {".graftkd", "config.yaml", "splits.csv", "last.pt", "log.csv", "model.pt", "predictions.csv",
            "metrics.json"} <= names, names
