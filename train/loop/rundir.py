"""The run directory: checked before any work, and owned by one ``mtf train`` at a time.

Two runs writing checkpoints into the same directory would interleave them and resume from each other's
state. The main process takes an exclusive ``fcntl.flock`` on ``<output_dir>/.mtf-train.lock`` for the
whole run; a second run on the directory refuses at start with the holder's pid and host. The kernel
drops the lock when the process exits for any reason (kill -9 included), so a crash never leaves a
stale lock behind. (On network file systems flock is as reliable as the file system's lock support.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

from train.errors import ConfigError

LOCK_FILE = ".mtf-train.lock"


def check_run_dir(path: Path) -> None:
    """Create the run directory and prove it is writable, before any data or model is loaded.

    Raises:
        ConfigError: it is a regular file, or it cannot be created or written to.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"`run.output_dir` = {str(path)!r} is a file, not a directory. Choose another `run.output_dir`.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mtf-write-test-{os.getpid()}"
        probe.write_text("ok\n", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"`run.output_dir` = {str(path)!r} cannot be written to ({err.strerror or err}). "
                          "Fix its permissions or choose another `run.output_dir`.") from None


class RunLock:
    """An exclusive, crash-safe lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        """Raises: ConfigError: another live process holds the directory."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"run directory {self.path.parent} is in use by another `mtf train` ({holder}). "
                              "Wait for it to finish or stop it, or choose another `run.output_dir`.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------------------------------
# run.json: what a run is doing, for `mtf report` and for people
# --------------------------------------------------------------------------------------------------

RECORD_FILE = "run.json"
RECORD_FORMAT = 1


def lock_is_held(run_dir: Path) -> bool:
    """True while a live ``mtf train`` holds the run directory's lock (probing takes no lock for long)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


class RunRecord:
    """``<output_dir>/run.json``: status, times, the batch plan and the planned mixture of a run.

    Written at start (``status: running``) and at the end: ``completed``, the stop reason (``preempted``,
    ``interrupted``, ``max_time``) or ``failed`` with the error. A run killed with -9 stays ``running``;
    :func:`lock_is_held` tells the two apart. Only the main process writes; every write is atomic.
    """

    def __init__(self, output_dir: Path, enabled: bool, **fields: object):
        self.path = Path(output_dir) / RECORD_FILE
        self.enabled = enabled
        self.start = time.time()
        self.data: dict = {"format": RECORD_FORMAT, "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                           "started_at": _iso(self.start), **fields}
        self.write()

    def write(self, **fields: object) -> None:
        if not self.enabled:
            return
        import json

        self.data.update(fields, updated_at=_iso(time.time()), elapsed_seconds=round(time.time() - self.start, 3))
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def __enter__(self) -> "RunRecord":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None and self.data.get("status") == "running":
            self.write(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))
