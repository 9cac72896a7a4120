"""One writer per output folder: an advisory lock file holding the writer's PID.

``metascale meta-train --out DIR`` holds ``DIR/.metascale.lock`` while it writes there, so a
second run on the same folder stops with one line instead of deleting the first one's
temporary checkpoint and interleaving ``metrics.jsonl``:

* POSIX: ``fcntl.flock`` on the lock file (released by the kernel when the process dies, so a
  lock left by a killed run is taken over at once); the file holds the holder's PID for the
  message;
* elsewhere: the file is created exclusively; one whose PID is no longer running is stale and
  taken over.

The lock is advisory: it keeps metascale processes apart, not other programs.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import MetascaleError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

NAME = ".metascale.lock"


class FolderLocked(MetascaleError):
    """Another metascale process is writing to the folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return "another process"
    return f"PID {text}" if text.isdigit() else "another process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold ``folder``'s lock while the body runs (the folder must exist). Raises
    :class:`FolderLocked` when another live process holds it; ``OSError`` when the folder is not
    writable."""
    path = Path(folder) / NAME
    if fcntl is not None:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FolderLocked(f"{folder}: {_holder(path)} is writing to this folder (lock file {path}); wait for "
                                   f"it to finish or use another folder") from None
            try:  # the holder we waited for may have removed the file between our open and flock
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            try:
                yield path
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # still ours: a waiting process opens the path anew
        finally:
            os.close(fd)
        return
    for _ in range(2):  # no flock: exclusive creation, a dead holder's file is stale
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            text = _holder(path)
            if text.startswith("PID ") and not _alive(int(text[4:])):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            raise FolderLocked(f"{folder}: {text} is writing to this folder (lock file {path}); wait for it to finish "
                               "or use another folder") from None
    else:
        raise FolderLocked(f"{folder}: could not take the lock file {path}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
