"""Nothing lost: bad input through the real CLI leaves no trace.

For every kind of bad input (>= 30, listed in ``CASES``) and both ways of starting a run (a new
run name, and ``--overwrite`` of a finished run), the command must

* exit with code 2 and print exactly one line on stderr that names the file, key or value at fault;
* create no run folder (the output folder lists the same entries, no hidden ``.<name>.replaced``);
* leave the finished run in the same output folder byte-identical (every file hashed).

One tiny finished run is shared by all cases (module fixture); almost every case fails before
training, so each takes well under a second in-process. Subprocesses are used only where the exit
code of the real process matters (``--nproc``); the case that starts torchrun ranks is marked slow.
"""
from __future__ import annotations

import hashlib
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from graftkd.cli import main
from graftkd.files import MARK, mark_folder

from .procs import env
from .test_bad_input import TINY, teacher_file, write_png

DONE = "done"  # the finished run every case must leave alone


@dataclass
class Ctx:
    root: Path  # module temp folder
    tree: Path  # good ImageFolder tree (2 classes x 8 images)
    out: Path  # output.dir holding the finished run
    config: Path  # minimal experiment YAML

    def bad_tree(self, name: str, edit: Callable[[Path], Path | None]) -> tuple[Path, str]:
        """A copy of the good tree changed by ``edit``; returns (root, the culprit ``edit`` named)."""
        dst = self.root / "trees" / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(self.tree, dst)
        culprit = edit(dst)
        return dst, str(culprit if culprit is not None else dst)


def snapshot(out: Path) -> tuple[list[str], dict[str, str]]:
    """(the output folder's entries except shared caches, sha256 of every file of the finished run)."""
    entries = sorted(p.name for p in out.iterdir() if p.name not in (".cache", ".synthetic"))
    run = out / DONE
    hashes = {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(run.rglob("*")) if p.is_file()}
    return entries, hashes


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    root = tmp_path_factory.mktemp("no_trace")
    tree = root / "images"
    for c, name in enumerate(("benign", "malignant")):
        for i in range(8):
            write_png(tree / name / f"{i}.png", seed=10 * c + i)
    config = root / "exp.yaml"
    config.write_text("name: experiment\n")
    c = Ctx(root, tree, root / "runs", config)
    rc = main(["train", "-c", str(config), *TINY, "trainer.epochs=1", "data.source=folder", f"data.root={tree}",
               f"output.dir={c.out}", f"output.name={DONE}"])
    assert rc == 0 and (c.out / DONE / "model.pt").is_file() and (c.out / DONE / "metrics.json").is_file()
    return c


@dataclass
class Case:
    """argv after ``graftkd`` (built from the context), the strings the error line must contain,
    and whether the case picks the run name itself (else it runs as a new name and as --overwrite)."""

    build: Callable[[Ctx], tuple[list[str], list[str]]]
    own_name: bool = False
    modes: tuple[str, ...] = field(default=("new", "overwrite"))


def run_args(ctx: Ctx, *extra: str, command: str = "train", root: Path | None = None,
             source: str = "folder") -> list[str]:
    return [command, "-c", str(ctx.config), *TINY, f"data.source={source}", f"data.root={root or ctx.tree}",
            f"output.dir={ctx.out}", *extra]


def simple(*extra: str, culprits: list[str], command: str = "train") -> Case:
    return Case(lambda c: (run_args(c, *extra, command=command), culprits))


def bad_image(name: str, edit: Callable[[Path], Path]) -> Case:
    def build(c: Ctx) -> tuple[list[str], list[str]]:
        root, culprit = c.bad_tree(name, edit)
        return run_args(c, root=root), [culprit]
    return Case(build)


def truncate(p: Path) -> Path:
    p.write_bytes(p.read_bytes()[:60])
    return p


def _empty_file(root: Path) -> Path:
    p = root / "benign" / "empty.png"
    p.write_bytes(b"")
    return p


def _text_jpg(root: Path) -> Path:
    p = root / "malignant" / "scan.jpg"
    p.write_text("this is text\n")
    return p


def _noise_png(root: Path) -> Path:
    p = root / "malignant" / "noise.png"
    p.write_bytes(bytes(range(256)) * 2)
    return p


def _keep_two_malignant(root: Path) -> None:
    for p in sorted((root / "malignant").iterdir())[2:]:
        p.unlink()


def _empty_class(root: Path) -> Path:
    (root / "unused").mkdir()
    return root / "unused"


def manifest(c: Ctx, name: str, text: str) -> Path:
    p = c.root / "manifests" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text(text.format(tree=c.tree))
    return p


def csv_case(name: str, text: str, *extra: str, culprits: Callable[[Path], list[str]]) -> Case:
    def build(c: Ctx) -> tuple[list[str], list[str]]:
        m = manifest(c, name, text)
        return run_args(c, *extra, root=m, source="csv"), culprits(m)
    return Case(build)


def _latin1(c: Ctx) -> Path:
    p = c.root / "manifests" / "latin1.csv"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(f"path,label\n{c.tree}/benign/0.png,b\xe9nign\n".encode("latin-1"))
    return p


GOOD_ROWS = "".join(f"{{tree}}/{cls}/{i}.png,{cls}\n" for cls in ("benign", "malignant") for i in range(8))


def teacher_case(make: Callable[[Ctx], Path], *extra: str, culprit: Callable[[Path], list[str]],
                 method: str = "kd") -> Case:
    def build(c: Ctx) -> tuple[list[str], list[str]]:
        t = make(c)
        return run_args(c, f"method.name={method}", f"teachers=[{{checkpoint: {t}}}]", *extra,
                        command="distill"), culprit(t)
    return Case(build)


def _raw_pickle(c: Ctx) -> Path:
    p = c.root / "teachers" / "raw.pt"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(pickle.dumps({"state_dict": {"w": [1.0]}}, protocol=4))
    return p


def _truncated_teacher(c: Ctx) -> Path:
    good = teacher_file(c.root / "teachers", "resnet8", ["benign", "malignant"])
    p = c.root / "teachers" / "cut.pt"
    p.write_bytes(good.read_bytes()[:200])
    return p


def _teacher(arch: str, classes: list[str]) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        (c.root / "teachers").mkdir(exist_ok=True)
        return teacher_file(c.root / "teachers", arch, classes)
    return make


def _yaml(text: str, extra: tuple[str, ...] = ()) -> Case:
    def build(c: Ctx) -> tuple[list[str], list[str]]:
        p = c.root / "configs" / f"{hashlib.sha1(text.encode()).hexdigest()[:8]}.yaml"
        p.parent.mkdir(exist_ok=True)
        p.write_text(text)
        args = run_args(c, *extra)
        args[2] = str(p)
        return args, [str(p)]
    return Case(build)


def _blocked_output(c: Ctx) -> tuple[list[str], list[str]]:
    blocker = c.root / "a_file"
    blocker.write_text("")
    args = [a for a in run_args(c) if not a.startswith("output.dir=")] + [f"output.dir={blocker / 'runs'}"]
    return args, [str(blocker)]


CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- command line and config
    "unknown key on the command line": simple("trainer.epoch=3", culprits=["command line 'trainer.epoch=3'",
                                                                           "trainer.epochs"]),
    "unknown key in the config file": _yaml("trainer:\n  epoch: 3\n"),
    "value of the wrong type": simple("trainer.epochs=many", culprits=["trainer.epochs", "'many'"]),
    "value out of range": simple("optimizer.lr=-0.1", culprits=["optimizer.lr", "-0.1"]),
    "split fractions that do not sum to 1": simple("data.split.train=0.9", culprits=["data.split", "sum to 1"]),
    "override without '='": simple("trainer.epochs", culprits=["'trainer.epochs'", "key.sub=value"]),
    "override into a value": simple("trainer.epochs.x=1", culprits=["trainer.epochs.x", "'trainer.epochs' is a value"]),
    "invalid YAML": _yaml("data:\n  source: folder\n   root: [unclosed\n"),
    "YAML top level not a mapping": _yaml("- a\n- b\n"),
    "config file not found": Case(lambda c: (["train", "-c", str(c.root / "missing.yaml")],
                                             [str(c.root / "missing.yaml")]), own_name=True),
    "unknown flag": simple("--bogus", culprits=["--bogus"]),
    "unknown method": simple("method.name=kdd", culprits=["command line 'method.name=kdd'", "'kdd'"],
                             command="distill"),
    "distillation method given to train": simple("method.name=kd", culprits=["method.name", "graftkd distill"]),
    # ------------------------------------------------------------------------------- models
    "unknown model name": simple("model.name=resnet9", culprits=["'resnet9'"]),
    "unknown model keyword": simple("model.kwargs={bogus: 1}", culprits=["resnet8", "bogus"]),
    "pretrained weights our model lacks": simple("model.pretrained=true", culprits=["resnet8", "pretrained"]),
    # --------------------------------------------------------------------------------- data
    "missing data root": simple("data.root=/nonexistent/images", culprits=["/nonexistent/images"]),
    "data root without class folders": Case(lambda c: (run_args(c, root=c.root / "trees" / "void"),
                                                       [str(c.root / "trees" / "void")])),
    "empty class folder": bad_image("empty_class", _empty_class),
    "truncated PNG": bad_image("truncated", lambda r: truncate(r / "benign" / "3.png")),
    "empty image file": bad_image("empty_file", _empty_file),
    "text file named .jpg": bad_image("text_jpg", _text_jpg),
    "random bytes named .png": bad_image("noise", _noise_png),
    "not a BreakHis tree": Case(lambda c: (run_args(c, source="breakhis"), [str(c.tree)])),
    "CSV manifest not found": Case(lambda c: (run_args(c, root=c.root / "none.csv", source="csv"),
                                              [str(c.root / "none.csv")])),
    "CSV manifest without a label column": csv_case("nolabel.csv", "path,class\n" + GOOD_ROWS,
                                                    culprits=lambda m: [str(m), "'label'"]),
    "CSV manifest naming a missing image": csv_case("missing.csv", "path,label\n" + GOOD_ROWS
                                                    + "{tree}/benign/gone.png,benign\n",
                                                    culprits=lambda m: [str(m), "line 18", "gone.png"]),
    "CSV manifest with a bad split value": csv_case(
        "badsplit.csv", "path,label,split\n" + GOOD_ROWS.replace(",benign\n", ",benign,holdout\n")
        .replace(",malignant\n", ",malignant,train\n"), "data.split.kind=predefined",
        culprits=lambda m: [str(m), "'holdout'"]),
    "data root that is a file": Case(lambda c: (run_args(c, root=c.tree / "benign" / "0.png"),
                                                [str(c.tree / "benign" / "0.png"), "not a folder"])),
    "CSV manifest that is not UTF-8": Case(lambda c: (run_args(c, root=_latin1(c), source="csv"),
                                                      [str(_latin1(c)), "UTF-8"])),
    "more folds than patients": simple("data.split.kind=kfold", "data.split.k=40", culprits=["split.k=40", "16"]),
    "official split without Folds.csv": simple("data.split.kind=official", culprits=["split.folds_csv"]),
    "split file not found": simple("data.split.file=/nonexistent/splits.csv", culprits=["/nonexistent/splits.csv"]),
    "split leaving a class without test images": Case(lambda c: (
        run_args(c, root=c.bad_tree("two_malignant", _keep_two_malignant)[0]),
        ["no test images of class 'malignant'", "on_empty_class"])),
    # ----------------------------------------------------------------------------- teachers
    "teacher file not found": Case(lambda c: (run_args(c, "method.name=kd", f"teachers=[{{checkpoint: "
                                                       f"{c.root / 'nope.pt'}}}]", command="distill"),
                                              [str(c.root / "nope.pt")])),
    "teacher with other classes": teacher_case(_teacher("resnet8", ["a", "b", "c"]),
                                               culprit=lambda t: [str(t), "classes"]),
    "teacher file that is a raw pickle": teacher_case(_raw_pickle, culprit=lambda t: [str(t), "weights-only"]),
    "truncated teacher file": teacher_case(_truncated_teacher, culprit=lambda t: [str(t), "not a complete"]),
    "distillation without teachers": simple("method.name=kd", culprits=["teachers"], command="distill"),
    "graft host expecting another input normalisation": teacher_case(
        _teacher("vgg8", ["benign", "malignant"]), method="graft",
        culprit=lambda t: ["vgg8", "set data.mean/data.std"]),
    "soft-target cache with ATF (teachers adapt)": teacher_case(
        _teacher("resnet8", ["benign", "malignant"]), "teacher_cache.enabled=true", method="atf",
        culprit=lambda t: ["teacher_cache.enabled"]),
    "graft host index out of range": teacher_case(
        _teacher("resnet8", ["benign", "malignant"]), "method.host=3", "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]", method="graft", culprit=lambda t: ["method.host = 3"]),
    "DML without peers": simple("method.name=dml", culprits=["peers"], command="distill"),
    # ---------------------------------------------------------------------------- run folder
    "existing run without --overwrite": Case(lambda c: (run_args(c, f"output.name={DONE}"),
                                                        [str(c.out / DONE), "already exists"]), own_name=True),
    "--resume of a run that never started": Case(lambda c: (run_args(c, "output.name=never", "--resume"),
                                                            [str(c.out / "never"), "last.pt"]), own_name=True),
    "output folder below a file": Case(_blocked_output),
}


def test_at_least_30_kinds():
    assert len(CASES) >= 30


@pytest.mark.parametrize("mode", ["new", "overwrite"])
@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_leaves_no_trace(kind: str, mode: str, ctx: Ctx, capsys):
    case = CASES[kind]
    if case.own_name and mode == "overwrite":
        pytest.skip("the case names its run itself")
    (ctx.root / "trees" / "void").mkdir(parents=True, exist_ok=True)
    argv, culprits = case.build(ctx)
    if not case.own_name:
        argv += ["output.name=fresh"] if mode == "new" else [f"output.name={DONE}", "--overwrite"]
    before = snapshot(ctx.out)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("graftkd ") and ": error: " in lines[0], err
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    assert snapshot(ctx.out) == before  # no run folder made, the finished run byte-identical
    assert not (ctx.out / f".{DONE}.replaced").exists()


# ------------------------------------------------------------------------- --overwrite itself
def test_overwrite_replaces_the_run_only_once_the_new_one_has_a_checkpoint(ctx: Ctx, capsys, monkeypatch):
    """The old folder is set aside (not deleted) while the new run starts, deleted at its first
    checkpoint; a crash before that checkpoint puts the old run back on the next start."""
    import graftkd.experiment as experiment

    src = ctx.out / DONE
    out = ctx.root / "overwrite"
    shutil.copytree(src, out / "r")
    old_model = (out / "r" / "model.pt").read_bytes()
    seen: list[tuple[bool, bool]] = []
    real_commit = experiment.RunStart.commit

    def commit(self):
        seen.append((experiment.aside_path(out / "r").is_dir(), (out / "r" / "checkpoints" / "last.pt").is_file()))
        real_commit(self)
    monkeypatch.setattr(experiment.RunStart, "commit", commit)
    args = run_args(ctx, "output.name=r", f"output.dir={out}", "trainer.epochs=1", "--overwrite")
    assert main(args) == 0
    assert seen[0] == (True, True)  # at the first checkpoint the old run was still there, set aside
    assert not experiment.aside_path(out / "r").exists()
    assert (out / "r" / "model.pt").read_bytes() != old_model and (out / "r" / "metrics.json").is_file()
    # a replacement killed before its first checkpoint: the next start restores the old run
    shutil.copytree(src, experiment.aside_path(out / "k"))
    (out / "k").mkdir()
    mark_folder(out / "k", "run")  # the first thing a start writes
    (out / "k" / "config.yaml").write_text("half-made\n")
    capsys.readouterr()
    assert main(run_args(ctx, "output.name=k", f"output.dir={out}", "trainer.epoch=1")) == 2
    assert main(run_args(ctx, "output.name=k", f"output.dir={out}")) == 2  # restored: "already exists"
    err = capsys.readouterr().err
    assert "restored" in err and "already exists" in err
    assert snapshot_of(out / "k") == snapshot_of(src)


def snapshot_of(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_run_that_trained_always_has_metrics_or_says_why(ctx: Ctx, capsys, monkeypatch):
    """An image that breaks after the scan (while the test split is scored): one line, exit 2, the
    checkpoints kept."""
    import graftkd.experiment as experiment

    def broken(*a, **k):
        from graftkd.errors import UserError
        raise UserError("cannot decode image /data/x.png: image file is truncated")
    monkeypatch.setattr(experiment, "score_split", broken)
    rc = main(run_args(ctx, "output.name=scored", f"output.dir={ctx.root / 'scored'}"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert "training finished" in lines[0] and "no metrics.json" in lines[0] and "/data/x.png" in lines[0]
    assert (ctx.root / "scored" / "scored" / "checkpoints" / "last.pt").is_file()


# -------------------------------------------------------------------------------- --nproc 2
def graftkd(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graftkd", *argv], env=env(), cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_nproc_user_error_before_the_ranks(ctx: Ctx):
    before = snapshot(ctx.out)
    p = graftkd(*run_args(ctx, "--nproc", "2", "trainer.epoch=1", f"output.name={DONE}", "--overwrite"),
                cwd=ctx.root)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "trainer.epoch" in p.stderr, p.stderr
    assert snapshot(ctx.out) == before


@pytest.mark.slow
def test_nproc_user_error_inside_the_ranks(ctx: Ctx):
    """SLOW (~20 s on 2 busy cores): a graft host that expects another input normalisation is found
    when the method is built in both torchrun ranks: one line once, exit 2, the finished run
    untouched, no folder left."""
    t = _teacher("vgg8", ["benign", "malignant"])(ctx)
    before = snapshot(ctx.out)
    p = graftkd(*run_args(ctx, "method.name=graft", f"teachers=[{{checkpoint: {t}}}]", "--nproc", "2",
                          f"output.name={DONE}", "--overwrite", command="distill"), cwd=ctx.root)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("graftkd distill: error: ") and "data.mean/data.std" in lines[0]
    assert "[rank" not in lines[0]
    assert snapshot(ctx.out) == before and not (ctx.out / f".{DONE}.replaced").exists()


def test_sigterm_while_starting_puts_the_old_run_back(tmp_path):
    """torchrun stops the other ranks with SIGTERM when one fails: rank 0 still rolls back."""
    import os
    import signal
    import time

    from graftkd.experiment import RunStart, aside_path

    run = tmp_path / "r"
    run.mkdir()
    (run / "model.pt").write_bytes(b"old weights")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ex:
        with RunStart(run, resume=False, active=True):
            assert aside_path(run).is_dir() and [p.name for p in run.iterdir()] == [MARK]
            (run / "config.yaml").write_text("new run\n")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert ex.value.code == 143 and signal.getsignal(signal.SIGTERM) == handler
    assert sorted(p.name for p in run.iterdir()) == ["model.pt"] and (run / "model.pt").read_bytes() == b"old weights"
    assert not aside_path(run).exists()
