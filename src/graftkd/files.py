"""Atomic file writes and safe checkpoint loading.

A write goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the target: a crash or a full disk mid-way leaves the previous file intact.
"""
from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from graftkd.errors import UserError

CHECKPOINT_FORMAT = "graftkd-checkpoint-v1"


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (mkstemp's temporaries are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def default_file_mode() -> int:
    """The permission bits every output file gets (0666 minus the umask, as ``open()`` gives)."""
    return _FILE_MODE


def _atomic(path: Path, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _FILE_MODE)
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"writing {path} failed ({e.strerror or e}); the previous file is unchanged") from None
        raise
    return path


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries of atomic writes a killed process left in ``folder``; returns them."""
    stale = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data), "wb")


def atomic_write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda f: f.write(text), "w")


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_log(path: Path) -> list[dict[str, Any]]:
    """Rows of a run's ``log.csv`` with numbers parsed and empty cells dropped ([] if absent)."""
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="") as f:
        return [{k: _parse_number(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def _parse_number(v: str) -> Any:
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Atomically save a checkpoint dict (tensors, numbers, strings, lists, dicts only)."""
    import io

    state = {"format": CHECKPOINT_FORMAT, **state}

    def write(f: Any) -> None:  # serialised first: a full disk is then an OSError naming the file, not a zip error
        buf = io.BytesIO()
        torch.save(state, buf)
        f.write(buf.getbuffer())

    return _atomic(path, write, "wb")


def _load_failure(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words and without PyTorch's
    advice to reload with ``weights_only=False`` (never do that with a file you did not write)."""
    text = str(e)
    if "Weights only load failed" in text:
        m = re.search(r"WeightsUnpickler error:\s*(Unsupported global: GLOBAL \S+|[^\n]+)", text)
        detail = m.group(1).strip() if m else "unsupported content"
        return f"not a weights-only PyTorch file ({detail}); graftkd never unpickles anything else"
    first = text.strip().splitlines()[0] if text.strip() else e.__class__.__name__
    if "weights_only" in first or len(first) < 12:  # e.g. KeyError('101') on a text file
        first = f"{e.__class__.__name__}: {first}"[:80] if "weights_only" not in first else e.__class__.__name__
    return f"not a complete PyTorch checkpoint ({first.split('. ')[0][:160]})"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a graftkd checkpoint with ``weights_only=True``; clear errors for missing/foreign/truncated files.

    PyTorch's warnings while unpickling a foreign file (e.g. an unexpected pickle protocol) are
    silenced: the error that follows says what is wrong, in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with arbitrary objects, not a torch file
        raise UserError(f"cannot load checkpoint {path}: {_load_failure(e)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a graftkd checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return state


# ------------------------------------------------------------------------------ ownership marks
#: the file graftkd writes first into every run or study folder it creates; graftkd deletes,
#: replaces or resumes only folders that carry it
MARK = ".graftkd"


def mark_folder(folder: Path, kind: str) -> Path:
    """Mark ``folder`` (a run or a study) as made by graftkd."""
    return atomic_write_json(Path(folder) / MARK, {"kind": kind, "pid": os.getpid()})


def folder_kind(folder: Path) -> str | None:
    """``"run"`` or ``"study"`` for a folder graftkd marked, else None. A run folder made before
    marks existed counts as marked when it has graftkd's two signatures: a ``config.yaml`` headed by
    graftkd's launch line and a ``checkpoints/last.pt`` in graftkd's checkpoint format."""
    folder = Path(folder)
    try:
        return str(json.loads((folder / MARK).read_text()).get("kind"))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with (folder / "config.yaml").open(encoding="utf-8") as f:
            headed = f.readline().startswith("# launched with ")
        if headed and load_checkpoint(folder / "checkpoints" / "last.pt").get("format") == CHECKPOINT_FORMAT:
            return "run"
    except (OSError, UnicodeDecodeError, UserError):
        pass
    return None


def require_mark(folder: Path, kind: str, action: str) -> None:
    """A one-line error unless ``folder`` carries graftkd's mark of ``kind``."""
    found = folder_kind(folder)
    if found != kind:
        what = "no graftkd mark" if found is None else f"marked as a graftkd {found}, not a {kind}"
        raise UserError(f"will not {action} {folder}: it is not a folder graftkd created ({what}: {MARK} missing)"
                        if found is None else f"will not {action} {folder}: it is {what}")


def name_max(folder: Path) -> int:
    """The longest file name the filesystem of ``folder`` (or its closest existing parent) holds."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


# ----------------------------------------------------------------------------------- one writer
LOCK_ENV = "GRAFTKD_HELD_LOCKS"


def _lock_dir() -> Path:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    d = base / f"graftkd-locks-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: keyed by its absolute path, outside it (a failed start leaves no trace)."""
    import hashlib

    key = os.path.realpath(os.path.abspath(folder))
    return _lock_dir() / f"{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}.lock"


class FolderLock:
    """An exclusive ``fcntl.flock`` on a run or study folder, held while one process writes it.

    A second process gets a one-line error naming the holder's PID. The kernel drops the lock when
    the holder exits, however it ends. A process started by the holder (``--nproc`` ranks, a study's
    run) inherits it through the ``GRAFTKD_HELD_LOCKS`` environment variable instead of waiting.
    """

    def __init__(self, folder: Path, what: str = "run folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = lock_path(self.folder)
        self.fd: int | None = None

    def inherited(self) -> bool:
        held = os.environ.get(LOCK_ENV, "")
        return str(self.path) in held.split(os.pathsep) if held else False

    def acquire(self) -> "FolderLock":
        import fcntl

        if self.fd is not None or self.inherited():
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(50):  # the holder writes its PID right after locking
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                if holder:
                    break
                import time

                time.sleep(0.02)
            os.close(fd)
            raise UserError(f"{self.what} {self.folder} is being written by another graftkd process "
                            f"(PID {holder or 'unknown'}); wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def child_env(self) -> dict[str, str]:
        """The environment for a process this holder starts to write the same folder."""
        held = [p for p in os.environ.get(LOCK_ENV, "").split(os.pathsep) if p]
        return {**os.environ, LOCK_ENV: os.pathsep.join(held + [str(self.path)])}

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
