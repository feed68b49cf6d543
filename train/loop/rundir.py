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
