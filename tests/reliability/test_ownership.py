"""Ownership, one writer, and a run folder that tells the truth (issue 21, guarantees 1, 2 and 4).

* graftkd deletes, replaces or resumes only folders carrying its mark, and ``output.name`` stays
  inside ``output.dir``: random names (hypothesis) never change anything outside a marked folder;
* a run folder has one writer: a second process gets one line naming the holder's PID;
* ``--resume`` never rewrites ``config.yaml``; every single config key changed is refused (naming
  it) or, for keys that cannot change the result, recorded in ``resumes.json``.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graftkd.methods  # noqa: F401  registers the method sections
from graftkd.cli import main
from graftkd.config import load_config, validate_config
from graftkd.errors import UserError
from graftkd.experiment import RESUME_FREE, RunStart, check_resume_config, check_run_folder, flatten
from graftkd.files import MARK, FolderLock, mark_folder

from .procs import env
from .test_bad_input import TINY, assert_one_line_error, write_png


def tree_state(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> sha256 (or 'dir')."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def build_world(root: Path) -> Path:
    """root/out holds a marked finished run ``done``, an unmarked folder of the user's ``mine`` and a
    file; root/thesis is the user's, outside output.dir."""
    import shutil

    for p in list(root.iterdir()) if root.exists() else []:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (root / "out" / "done" / "checkpoints").mkdir(parents=True)
    mark_folder(root / "out" / "done", "run")
    (root / "out" / "done" / "model.pt").write_bytes(b"finished weights")
    (root / "out" / "done" / "checkpoints" / "last.pt").write_bytes(b"checkpoint")
    (root / "out" / "mine").mkdir()
    (root / "out" / "mine" / "notes.txt").write_text("not graftkd's")
    (root / "thesis").mkdir()
    (root / "thesis" / "chapter1.tex").write_text("mine too")
    (root / "out" / "rootfile.txt").write_text("a file in output.dir")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("ownership"))


NAMES = st.one_of(
    st.sampled_from([".", "..", "./", "../thesis", "done", "mine", "mine/sub", "done/..", "x/../mine", "/abs",
                     "", " ", "a//b", "new/run", ".hidden", "done/.", "..." , "x" * 246, "x" * 245, "rootfile.txt",
                     "rootfile.txt/x"]),
    st.text(alphabet=st.sampled_from(list("ab./ \\~-_é\x00")), min_size=0, max_size=12),
    st.lists(st.sampled_from(["..", ".", "a", "done", "mine", "thesis", ""]), min_size=1, max_size=4).map("/".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAMES, overwrite=st.booleans(), succeed=st.booleans())
def test_random_output_names_never_touch_anything_outside_a_marked_folder(world: Path, name: str, overwrite: bool,
                                                                         succeed: bool) -> None:
    before = tree_state(world)
    out = world / "out"
    try:
        cfg = validate_config({"output": {"dir": str(out), "name": name}})
        run_dir = check_run_folder(cfg, resume=False, overwrite=overwrite)
    except UserError:
        assert tree_state(world) == before  # refused before anything was written
        return
    real_out, real_run = os.path.realpath(out), os.path.realpath(run_dir)
    assert os.path.commonpath([real_out, real_run]) == real_out and real_run != real_out, name
    try:
        with RunStart(run_dir, resume=False, active=True):
            (run_dir / "config.yaml").write_text("a new run\n")
            if not succeed:
                raise RuntimeError("the start fails")
    except RuntimeError:
        assert tree_state(world) == before, name  # a failed start leaves no trace
        return
    after = tree_state(world)
    rel = os.path.relpath(run_dir, world)
    inside = lambda k: k == rel or k.startswith(rel + os.sep)  # noqa: E731
    parents = {str(Path(*Path(rel).parts[:i])) for i in range(1, len(Path(rel).parts))}
    assert {k: v for k, v in after.items() if not inside(k) and k not in parents} == \
        {k: v for k, v in before.items() if not inside(k) and k not in parents}, name
    assert all(after[p] == "dir" for p in parents)
    assert (run_dir / MARK).is_file() and (run_dir / "config.yaml").read_text() == "a new run\n"
    # what was replaced carried the mark
    assert not any(inside(k) for k in before) or os.path.join(rel, MARK) in before, name
    build_world(world)


def test_unmarked_folders_are_never_replaced_or_resumed(world: Path) -> None:
    cfg = validate_config({"output": {"dir": str(world / "out"), "name": "mine"}})
    with pytest.raises(UserError, match=r"will not replace \(--overwrite\) .*mine: it is not a folder graftkd created"):
        check_run_folder(cfg, resume=False, overwrite=True)
    (world / "out" / "mine" / "checkpoints").mkdir()
    (world / "out" / "mine" / "checkpoints" / "last.pt").write_bytes(b"x")
    try:
        with pytest.raises(UserError, match=r"will not resume .*mine: it is not a folder graftkd created"):
            check_run_folder(cfg, resume=True, overwrite=False)
    finally:
        build_world(world)


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from graftkd.files import FolderLock
FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_writer_gets_one_line_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run"), str(Path(graftkd.methods.__file__)
                               .parents[2])], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as e:
            FolderLock(tmp_path / "run").acquire()
        assert str(e.value) == (f"run folder {tmp_path / 'run'} is being written by another graftkd process "
                                f"(PID {holder.pid}); wait for it to end or stop it")
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path / "run"):  # the kernel dropped the lock of the killed holder
        with pytest.raises(UserError):
            FolderLock(tmp_path / "run").acquire()  # one writer within one process too
    FolderLock(tmp_path / "run").acquire().release()


def test_two_trains_on_one_run_name_leave_exactly_one_writer(tmp_path: Path) -> None:
    tree = tmp_path / "images"
    for c, name in enumerate(("benign", "malignant")):
        for i in range(8):
            write_png(tree / name / f"{i}.png", seed=10 * c + i)
    (tmp_path / "exp.yaml").write_text("name: race\n")
    argv = [sys.executable, "-m", "graftkd", "train", "-c", str(tmp_path / "exp.yaml"), *TINY, "trainer.epochs=8",
            "data.source=folder", f"data.root={tree}", f"output.dir={tmp_path / 'runs'}", "trainer.threads=1"]
    procs = [subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.pid, p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for _, rc, _ in results)
    assert codes == [0, 2], results
    (winner, _, _), = [r for r in results if r[1] == 0]
    (_, _, err), = [r for r in results if r[1] == 2]
    folder = tmp_path / "runs" / "race"
    # the loser either met the winner's lock, or (when it reached the check after the winner had finished)
    # the winner's finished run; in both cases one line, and the winner's run is left as it wrote it
    assert err.strip().splitlines() in (
        [f"graftkd train: error: run folder {folder} is being written by another graftkd "
         f"process (PID {winner}); wait for it to end or stop it"],
        [f"graftkd train: error: run folder {folder} already exists: pass --resume to continue it, "
         f"--overwrite to replace it, or set output.name=<new name>"]), err
    assert (folder / "metrics.json").is_file() and (folder / "config.yaml").is_file()


# ------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("resume")
    tree = root / "images"
    for c, name in enumerate(("benign", "malignant")):
        for i in range(8):
            write_png(tree / name / f"{i}.png", seed=10 * c + i)
    (root / "exp.yaml").write_text("name: r\n")
    args = ["-c", str(root / "exp.yaml"), *TINY, "trainer.epochs=1", "data.source=folder", f"data.root={tree}",
            f"output.dir={root / 'runs'}"]
    assert main(["train", *args]) == 0
    return root / "runs" / "r", args


def _other(value: object) -> list[object]:
    """Values of the same kind as ``value`` to try in its place."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2 + 3]
    if isinstance(value, float):
        return [value * 2 + 0.5, value / 2, 0.5]
    if isinstance(value, list):
        return [[*value[:-1], _other(value[-1])[0]]] if value else []
    if value is None:
        return [1, 0.5, True, "x"]
    return [f"{value}x", "none", "memory", "mmap", "skip", "warn", "keep", "cpu", "fp32", "bf16", "adam", "constant",
            "kfold", "subtype", "none", "cifar", "val_loss", "40", "all"]


def test_resuming_with_any_single_key_changed_is_refused_or_recorded(finished) -> None:
    run_dir, args = finished
    cfg = load_config(args[1], args[2:])
    tree = cfg.model_dump(mode="json")
    tried = refused = recorded = 0
    for key, value in flatten(tree).items():
        for new in _other(value):
            changed = {**flatten(tree), key: new}
            raw: dict = {}
            for k, v in changed.items():
                node = raw
                for part in k.split(".")[:-1]:
                    node = node.setdefault(part, {})
                node[k.split(".")[-1]] = v
            try:
                other = validate_config(raw)
            except UserError:
                continue
            if flatten(other.model_dump(mode="json")) == flatten(tree):
                continue
            tried += 1
            diff = [k for k, v in flatten(other.model_dump(mode="json")).items() if flatten(tree).get(k, ...) != v]
            try:
                allowed = check_resume_config(other, run_dir)
            except UserError as e:
                refused += 1
                assert any(k in str(e) for k in diff if k not in RESUME_FREE), (key, str(e))
                assert "\n" not in str(e)
            else:
                recorded += 1
                assert set(allowed) == set(diff) and set(diff) <= set(RESUME_FREE), (key, diff)
            break
    assert tried >= 60 and refused >= 50 and recorded >= 4, (tried, refused, recorded)


def test_resume_with_a_changed_lr_is_refused_and_config_yaml_is_never_rewritten(finished, capsys) -> None:
    run_dir, args = finished
    config = (run_dir / "config.yaml").read_bytes()
    before = tree_state(run_dir)
    rc = main(["train", *args, "optimizer.lr=0.1", "--resume"])
    assert_one_line_error(rc, capsys.readouterr().err, "optimizer.lr (0.05 -> 0.1)", str(run_dir / "config.yaml"))
    assert tree_state(run_dir) == before
    # a free key is allowed, recorded, and config.yaml stays as written by the run's start
    assert main(["train", *args, "trainer.threads=1", "--resume"]) == 0
    assert (run_dir / "config.yaml").read_bytes() == config
    import json
    history = json.loads((run_dir / "resumes.json").read_text())
    assert history[-1]["changed"] == {"trainer.threads": {"saved": None, "now": 1}}
    # an edited config.yaml is the saved config: resuming with the original is refused too
    (run_dir / "config.yaml").write_bytes(config.replace(b"lr: 0.05", b"lr: 0.1"))
    try:
        rc = main(["train", *args, "--resume"])
        assert_one_line_error(rc, capsys.readouterr().err, "optimizer.lr (0.1 -> 0.05)")
    finally:
        (run_dir / "config.yaml").write_bytes(config)


# ---------------------------------------------------------------------------------- compare
PARENT = """
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from graftkd.study import STUDY_PID_ENV, end_with_parent
os.environ[STUDY_PID_ENV] = str(os.getpid())
# a direct child (ends by its parent-death signal) and a grandchild under a middle process that stays
# alive, as a forkserver does (ends by watching the study process)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=end_with_parent)
grand = "import sys, time; sys.path.insert(0, sys.argv[1]); from graftkd.study import end_with_study; " \
        "end_with_study(0.05); print('ready', flush=True); time.sleep(60)"
middle = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], "
          "stdout=subprocess.PIPE, text=True); p.stdout.readline(); print(p.pid, flush=True); time.sleep(60)")
m = subprocess.Popen([sys.executable, "-c", middle, grand, sys.argv[1]], stdout=subprocess.PIPE, text=True)
print(child.pid, m.stdout.readline().strip(), m.pid, flush=True)
time.sleep(60)
"""


def _ends_within(pid: int, seconds: float) -> bool:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True  # ended, not yet reaped by a parent that does not wait
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


def test_the_runs_compare_starts_end_when_compare_ends(tmp_path: Path) -> None:
    """compare's run processes get SIGTERM when compare dies, even by SIGKILL (no orphans to race a
    rerun): a direct child by its parent-death signal, a worker forked by a forkserver (which
    outlives compare for a while) by watching the compare process."""
    import signal

    src = str(Path(graftkd.methods.__file__).parents[2])
    parent = subprocess.Popen([sys.executable, "-c", PARENT, src], stdout=subprocess.PIPE, text=True, env=env())
    child, grandchild, middle = map(int, parent.stdout.readline().split())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    try:
        assert _ends_within(child, 20), "the child outlived compare"
        assert _ends_within(grandchild, 20), "the forked run outlived compare"
        assert not _ends_within(middle, 0.1)  # the middle process was still there: the watcher ended the run
    finally:
        for pid in (child, grandchild, middle):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_second_compare_on_one_study_folder_gets_one_line(tmp_path: Path) -> None:
    from graftkd.study import compare

    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\nout: {tmp_path / 'study'}\nsteps: 1\nmethods: {{sup: {{}}}}\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "study"), str(Path(graftkd.methods.__file__)
                               .parents[2])], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"is being written by another graftkd process \(PID {holder.pid}\)"):
            compare(study)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "study").exists()
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "thesis.tex").write_text("the user's")
    with pytest.raises(UserError, match="will not write a study into .*study: it is not a folder graftkd created"):
        compare(study)


def test_runs_made_before_marks_count_only_with_both_graftkd_signatures(tmp_path: Path) -> None:
    from graftkd.files import folder_kind, save_checkpoint

    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "config.yaml").write_text("# launched with 1 process(es) (backend none): global batch 4\nname: old\n")
    assert folder_kind(old) is None  # the header alone is not enough
    save_checkpoint(old / "checkpoints" / "last.pt", {"kind": "train_state"})
    assert folder_kind(old) == "run"
    (old / "config.yaml").write_text("name: a config of the user's\n")
    assert folder_kind(old) is None  # a graftkd checkpoint alone is not enough


def test_a_key_added_to_graftkd_since_the_run_started_is_recorded_at_its_default(finished, capsys) -> None:
    """A run saved before ``data.max_pixels`` existed resumes when the key has its default (recorded),
    and is refused when the key is set to something else."""
    import json

    run_dir, args = finished
    config = (run_dir / "config.yaml").read_bytes()
    older = b"".join(line for line in config.splitlines(keepends=True) if b"max_pixels" not in line)
    assert older != config
    (run_dir / "config.yaml").write_bytes(older)
    try:
        rc = main(["train", *args, "data.max_pixels=1000000", "--resume"])
        assert_one_line_error(rc, capsys.readouterr().err, "data.max_pixels ((not a key then) -> 1000000)")
        assert main(["train", *args, "--resume"]) == 0
        assert (run_dir / "config.yaml").read_bytes() == older
        changed = json.loads((run_dir / "resumes.json").read_text())[-1]["changed"]
        assert changed == {"data.max_pixels": {"saved": "(not a key then)", "now": 89_478_485}}
    finally:
        (run_dir / "config.yaml").write_bytes(config)


def test_evaluate_and_export_wait_for_no_one_but_never_write_a_folder_a_run_holds(finished, capsys) -> None:
    run_dir, _ = finished
    before = tree_state(run_dir)
    with FolderLock(run_dir):  # a run writing its folder
        for argv in (["evaluate", str(run_dir)], ["export", str(run_dir), "--format", "safetensors"]):
            rc = main(argv)
            assert_one_line_error(rc, capsys.readouterr().err, f"run folder {run_dir} is being written by another "
                                                               f"graftkd process (PID {os.getpid()})")
    assert tree_state(run_dir) == before
