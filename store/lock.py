"""One dump at a time per cache folder: an exclusive lock file that names its holder.

zarr does no locking, and two dumps writing the same shards would interleave their chunks. The lock is a file
created with O_CREAT | O_EXCL (atomic on local and network file systems alike), or on an object store an
object written by a conditional PUT (``store.location.create_new``), holding the holder's host, pid and start
time. A lock is stale when its holder is on this host and that pid no longer runs (a killed
dump): it is then taken over, so a crash never needs a hand to clean up. A lock of another host cannot be
checked from here; the refusal names it and says how to clear it.

Students never take it: they read a complete store read-only, and any number may read at once.
"""
from __future__ import annotations

import json
import os
import socket
import time

from store.location import age_seconds, create_new, location
from store.manifest import ArtifactError

LOCK_NAME = "dump.lock"
TORN_GRACE_SECONDS = 10


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DumpLock:
    """``with DumpLock(folder):`` holds ``folder/dump.lock`` for the block; raises ArtifactError if held."""

    def __init__(self, folder):
        self.path = location(folder) / LOCK_NAME
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def acquire(self) -> "DumpLock":
        for _ in range(2):  # a second try after removing a stale lock
            if not create_new(self.path, json.dumps(self.mine).encode()):
                holder = self.holder()
                if holder is None and self._young():
                    raise ArtifactError(f"{self.path.parent}: another dump is taking the lock {self.path} right "
                                        f"now; a second dump into it is refused. Wait for it, or run again.") from None
                if holder is not None and not self._stale(holder):
                    raise ArtifactError(
                        f"{self.path.parent} is being dumped by pid {holder['pid']} on {holder['host']} (since "
                        f"{holder['started']}); a second dump into it is refused. Wait for it to finish, or, if "
                        f"that process is gone (on another machine), delete {self.path} and run again.") from None
                self.path.unlink(missing_ok=True)  # stale, or left empty by a holder killed while writing it
                continue
            self.held = True
            return self
        raise ArtifactError(f"could not take the dump lock {self.path}: it keeps reappearing; another dump "
                            f"is starting at the same moment. Run again.")

    def holder(self) -> dict | None:
        """The lock's holder as written, or None when the file is empty or torn."""
        try:
            holder = json.loads(self.path.read_text())
            return holder if {"host", "pid", "started"} <= set(holder) else None
        except (OSError, ValueError):
            return None

    def _young(self) -> bool:
        """An empty lock file seconds old is one being written; an old one was left by a killed writer."""
        try:
            return age_seconds(self.path) < TORN_GRACE_SECONDS
        except OSError:
            return False

    def _stale(self, holder: dict) -> bool:
        return holder["host"] == self.mine["host"] and not _alive(int(holder["pid"]))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "DumpLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
