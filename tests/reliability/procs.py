"""Run the toy trainer (``toytrain.py``) in subprocesses: one process, or two gloo ranks via torchrun."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from graftkd.files import load_checkpoint

TOYTRAIN = Path(__file__).with_name("toytrain.py")
SRC = Path(__file__).resolve().parents[2] / "src"
TIMEOUT_S = 240


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), e.get("PYTHONPATH", "")])
    return e


def run_toy(run_dir: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run toytrain.py; ``nproc > 1`` launches it with torchrun on 127.0.0.1 (free port, gloo)."""
    cmd = [sys.executable, str(TOYTRAIN), str(run_dir), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", *cmd[1:]]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "final.pt")["model"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: Path, args: list[str], nproc: int = 2) -> list[tuple[int, str]]:
    """Start ``nproc`` ranks of ``script`` with torchrun's env:// variables but without its agent
    (one interpreter less per launch); when a rank fails the others are killed, as torchrun does.
    Returns (exit code, stderr) per rank."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        e = dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=e, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    out = [(p.returncode, p.communicate()[1]) for p in procs]
    assert time.monotonic() <= deadline, f"ranks timed out: {out}"
    return out
