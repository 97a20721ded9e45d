"""A run's output location, guarded: one run at a time, writable before any work, no debris of
a killed run, and write failures (disk full, read-only) reported in one line on every rank.

    out/.halos.lock             sft / align / ppo: held (fcntl.flock) by rank 0 for the whole run
    dir/.name.halos.lock        ref-logps, whose output is the file dir/name

The kernel releases a flock when its holder exits, however it exits; the file names the holder
(PID, host, start time) for the error of a second run, and is emptied on a clean release, so a
non-empty file found unlocked is the lock of a run that was killed (reported, then taken over).
Only rank 0 takes the lock, after the process group exists, and every rank then raises the same
error: the ranks of one run never wait for each other's lock.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from halos.config import ConfigError

LOCK_NAME = ".halos.lock"
_HELD: dict[Path, OutputLock] = {}  # locks this process holds (a retry in-process reuses one)


class OutputError(ConfigError):
    """The output cannot be locked or written; the message says what to do."""


class OutputLock:
    """An exclusive lock on one run's output, released on `release()` or at exit."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)  # empty: the next run sees a clean release
        except OSError:
            pass
        os.close(self.fd)  # closing the only descriptor drops the flock
        self.fd = -1
        _HELD.pop(self.path, None)


def lock_file(out: Path, is_file: bool = False) -> Path:
    return out.parent / f".{out.name}{LOCK_NAME}" if is_file else out / LOCK_NAME


def acquire(path: Path, what: str) -> OutputLock:
    """Take the lock at `path` for the output `what`, or raise naming the run that holds it."""
    if path in _HELD:
        return _HELD[path]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise unwritable(what, path.parent, err) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder, locked = _holder(fd), err.errno in (errno.EAGAIN, errno.EACCES)
        # Without flock on this filesystem (some NFS mounts) the PID in the file decides.
        if locked or _still_running(holder):
            os.close(fd)
            hint = "" if locked else f" (if it is gone, delete {path})"
            raise OutputError(f"{what} is in use by another run ({holder or 'another process'})"
                              f"{hint}; wait for it to end or stop it, or choose another "
                              f"--out") from err
    _take_over(fd, path, what)
    lock = _HELD[path] = OutputLock(path, fd)
    atexit.register(lock.release)
    return lock


def _holder(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors="replace").strip()


def _still_running(holder: str) -> bool:
    """Whether the process a lock file names may still run: a live PID on this host, or any
    process on another host (which cannot be checked from here)."""
    match = re.match(r"PID (\d+) on (\S+),", holder)
    if match is None:
        return False
    if match[2] != socket.gethostname():
        return True
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return int(match[1]) != os.getpid()


def _take_over(fd: int, path: Path, what: str) -> None:
    """Write this process into the lock file (reporting a killed previous holder)."""
    previous = _holder(fd)
    if previous:
        print(f"[halos] {what}: the lock of a run that did not end cleanly ({previous}) is "
              f"stale (that process is gone); taking it over", flush=True)
    stamp = f"PID {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (stamp + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        raise unwritable(what, path.parent, err) from err


def unwritable(what: str, folder: Path, err: OSError) -> OutputError:
    return OutputError(f"{what}: cannot write to {folder} ({err.strerror or err}); free space "
                       f"or fix its permissions, or choose another --out")


def remove_stale_temporaries(folder: Path, *patterns: str) -> list[Path]:
    """Remove what matches `patterns` in `folder`: the temporary siblings that halos.files'
    atomic writes leave when killed (`.NAME.XXXX.tmp`) and checkpoints killed mid-write
    (`step_N.partial`). The caller holds the lock: no other run is writing them."""
    stale = sorted({p for pattern in patterns for p in folder.glob(pattern)}) if folder.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        print(f"[halos] removed {path}, left by a run killed while writing it", flush=True)
    return stale


def write_failure(action: Callable[[], object], folder: Path) -> str | None:
    """Run `action`, which writes under `folder`; return why it could not write (None on
    success). Errors that are not write failures propagate.

    A full or read-only disk surfaces as OSError from Python, as RuntimeError from torch.save's
    zip writer ("PytorchStreamWriter failed writing file", "unexpected pos") and as
    SafetensorError from safetensors; the latter two do not say why, the free space does."""
    try:
        action()
    except OSError as err:
        return err.strerror or str(err)
    except Exception as err:
        text = str(err).strip()
        if type(err).__name__ != "SafetensorError" and not any(
                mark in text for mark in ("inline_container", "PytorchStreamWriter")):
            raise
        if free_mb(folder) < 1:
            return os.strerror(errno.ENOSPC)
        return text.splitlines()[-1] if text else type(err).__name__
    return None


def first_error(error: str | None) -> str | None:
    """This rank's error, or the first rank's that has one: the same answer on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    return error


def raise_on_any_rank(error: str | None) -> None:
    """Raise the first rank's error on every rank, so that no rank is left waiting in a
    collective for one that failed."""
    error = first_error(error)
    if error:
        raise OutputError(error)


def free_bytes(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def free_mb(folder: Path) -> int:
    return free_bytes(folder) >> 20
