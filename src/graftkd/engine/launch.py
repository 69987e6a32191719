"""``--nproc N``: re-run the same command under torchrun (one process per device, or per CPU slot).

A user error in the ranks is reported like in a single process: every rank writes its message to
a file in ``$GRAFTKD_ERROR_DIR`` instead of printing it, all ranks exit 2, and the launcher prints
one line (rank 0's message, else the lowest rank's) and exits 2. torchrun's own logging and its
traceback of the failed workers are silenced (``python -m graftkd.engine.launch`` wraps it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ERROR_DIR_ENV = "GRAFTKD_ERROR_DIR"


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def report_rank_error(message: str) -> bool:
    """Under the launcher, leave ``message`` for it to print once (True); else False (print it yourself)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    rank = int(os.environ.get("RANK", "0"))
    try:
        (Path(folder) / f"rank{rank:05d}.txt").write_text(message)
    except OSError:
        return False
    return True


def first_rank_error(folder: Path) -> str | None:
    """The message of rank 0, else of the lowest rank that left one."""
    files = sorted(Path(folder).glob("rank*.txt"))
    return files[0].read_text() if files else None


def relaunch_with_torchrun(nproc: int, argv: list[str] | None = None) -> int:
    """Run ``graftkd argv`` (without ``--nproc``) in ``nproc`` ranks. Returns the exit code; a user
    error in the ranks is printed as one line (see the module docstring) and gives 2."""
    argv = strip_nproc(list(sys.argv[1:] if argv is None else argv))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory(prefix="graftkd-errors-") as folder:
        env[ERROR_DIR_ENV] = folder
        cmd = [sys.executable, "-m", "graftkd.engine.launch", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", "-m", "graftkd", *argv]
        rc = subprocess.call(cmd, env=env)
        message = first_rank_error(Path(folder))
    if message is not None:
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"graftkd {command}: error: {message}", file=sys.stderr)
        return 2
    return rc


def _torchrun_quietly(args: list[str]) -> int:
    """torchrun without its log lines and its traceback of failed workers: the exit code of the
    first failed rank (or 0)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c and c > 0), 1)
    return 0


if __name__ == "__main__":  # python -m graftkd.engine.launch <torchrun arguments>
    sys.exit(_torchrun_quietly(sys.argv[1:]))
