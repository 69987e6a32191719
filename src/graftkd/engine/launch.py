"""``--nproc N``: re-run the same command under torchrun (one process per device, or per CPU slot)."""
from __future__ import annotations

import os
import subprocess
import sys


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


def relaunch_with_torchrun(nproc: int, argv: list[str] | None = None) -> int:
    argv = strip_nproc(list(sys.argv[1:] if argv is None else argv))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "graftkd", *argv]
    return subprocess.call(cmd, env=env)
