"""One run at a time per output folder: an exclusive OS lock (``flock``) held from set-up to the end.

The lock file names the holder (pid, host, start, command); the kernel releases the lock when the process
ends, however it ends (a SIGKILLed run does not block the next one). Pure Python.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from knlight.io import resolved_from
from knlight.runfolder.format import LOCK, OUTPUT_DIR, RunFolderError

log = logging.getLogger(__name__)


def make_folder(folder: Path) -> None:
    """Creates the output folder, or says why it cannot be one.

    Raises:
        RunFolderError: When ``folder`` or one of its parents is a file, or the folder cannot be created.
    """
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        what = "is a file" if blocking == folder else f"is inside {blocking}, which is a file"
        raise RunFolderError(
            f"output folder {folder}{resolved_from(folder)} {what}, not a folder; choose another output folder "
            f"({OUTPUT_DIR}) or move that file away"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"cannot create the output folder {folder}{resolved_from(folder)}: {error.strerror}; choose another "
            f"output folder ({OUTPUT_DIR}) or fix its permissions"
        ) from None


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text("utf-8"))
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}: `{info['command']}`"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are not written yet"


class FolderLock:
    """An exclusive lock on an output folder (``<folder>/.lock``), for one run from start to end.

    Args:
        folder: The output folder (created by :meth:`acquire`).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def acquire(self) -> None:
        """Takes the lock at once (never waits) and records who holds it.

        Raises:
            RunFolderError: When another run holds it (named by pid, host, start and command), or the folder
                cannot be created.
        """
        if self.held:
            return
        make_folder(self.folder)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise RunFolderError(
                f"{self.folder} is in use by another knlight run ({_holder(self.path)}); two runs writing "
                "into one folder would mix their results. Wait until that run has finished and re-run this "
                "command (with the same settings it resumes and skips what is done), or give this run another "
                f"output folder ({OUTPUT_DIR})"
            ) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning(
                "cannot lock %s (%s): this filesystem has no file locks; make sure no other run writes there",
                self.path,
                error.strerror,
            )
            return
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]])[:500],
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        """Releases the lock (closing the file releases it); a no-op when not held."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
