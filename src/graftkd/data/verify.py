"""The scan's full decode of every image, in worker processes (``pixels.py --serve``), remembered by
content hash. Imports no torch: light enough for tests and tools to run in a fresh process."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from graftkd.data import pixels
from graftkd.data.pixels import DEFAULT_MAX_PIXELS
from graftkd.errors import UserError

VERIFY_VERSION = 2  # 2: keyed by content hash and pixel budget


class _Worker:
    """A ``pixels.py --serve`` process: decodes files for the scan; if a native decoder crashes it,
    the file it was decoding is marked bad and the next file gets a fresh worker."""

    CMD = [sys.executable, "-I", "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
           pixels.__file__]

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def verify(self, path: str, max_pixels: int) -> tuple[int, int] | str:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(self.CMD, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps([path, max_pixels]) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = self.proc.wait()
            self._close_pipes()
            self.proc = None
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            return f"the image decoder crashed on this file ({how}); the file is damaged or hostile"
        result = json.loads(line)
        return result if isinstance(result, str) else (int(result[0]), int(result[1]))

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):  # type: ignore[union-attr]
            try:
                pipe.close()  # type: ignore[union-attr]
            except OSError:
                pass

    def close(self) -> None:
        if self.proc is not None:
            self._close_pipes()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def content_hash(path: str) -> str | None:
    """blake2b of a file's bytes (None if it cannot be read): what the scan memo is keyed by."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _workers(n: int | None) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, n or min(8, cpus))


def verify_images(paths: Sequence[str], memo: Path | None = None, workers: int | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS,
                  digests_out: dict[str, str] | None = None) -> dict[str, tuple[int, int] | str]:
    """Fully decode every file in worker processes: ``{path: (width, height) or reason}``.

    A decoder that crashes (a native fault on a damaged file) marks that file bad, it does not end
    graftkd. ``memo`` (a JSON file) remembers each result by the file's content hash (blake2b) and
    the pixel budget, so a rescan only decodes new or changed files, and a file changed in place
    (same size and mtime) is decoded again. The memo is a cache: failing to read or write it only
    costs time.
    """
    known: dict[str, Any] = {}
    if memo is not None and memo.is_file():
        try:
            data = json.loads(memo.read_text())
            known = data["files"] if data.get("version") == VERIFY_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):
            known = {}
    out: dict[str, tuple[int, int] | str] = {}
    n = _workers(workers)
    with ThreadPoolExecutor(max_workers=n) as pool:
        digests = list(pool.map(content_hash, paths))
    if digests_out is not None:  # the content keys, for caches of decoded pixels (build_data's mmap cache)
        digests_out.update({p: d for p, d in zip(paths, digests) if d is not None})
    todo: list[tuple[str, str]] = []
    for p, digest in zip(paths, digests):
        if digest is None:
            out[p] = "cannot read the file (missing or no permission)"
            continue
        entry = known.get(f"{digest}:{max_pixels}")
        if entry is not None:
            out[p] = tuple(entry) if isinstance(entry, list) else entry  # type: ignore[assignment]
        else:
            todo.append((p, digest))
    if todo:
        queue = list(reversed(todo))
        lock = threading.Lock()

        def drain() -> None:
            worker = _Worker()
            try:
                while True:
                    with lock:
                        if not queue:
                            return
                        p, digest = queue.pop()
                    result = worker.verify(p, max_pixels)
                    with lock:
                        out[p] = result
                        known[f"{digest}:{max_pixels}"] = list(result) if isinstance(result, tuple) else result
            finally:
                worker.close()

        with ThreadPoolExecutor(max_workers=min(n, len(todo))) as pool:
            for f in [pool.submit(drain) for _ in range(min(n, len(todo)))]:
                f.result()
        if memo is not None:
            from graftkd.files import atomic_write_json  # imports torch: only when there is a memo to write

            try:
                atomic_write_json(memo, {"version": VERIFY_VERSION, "files": known})
            except UserError:
                pass
    return {p: out[p] for p in paths}
