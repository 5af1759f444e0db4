"""A live run's hold on the directories it writes, so that a second run into them is refused.

Two jobs training into one output directory (a job resubmitted while the first still runs, a copied
job script, ranks left running by a killed launcher) interleave their checkpoints, logs and metrics
and both "succeed". The writing process (a job's rank 0) takes an exclusive ``fcntl.flock`` on a lock
file in each directory before it writes anything there and holds it for the whole run, as data_prep's
build lock does (``data_prep/core.py``). The file says who holds it ("pid N on HOST") and stays in
place: removing a lock file is racy, and the lock itself goes with the process however it ends (exit,
crash, SIGKILL), so a stale file left by a finished or killed run never blocks the next one.

On NFS, flock works across machines only where the client maps it to NFS byte-range locks (Linux
does since 2.6.12, with a working lock manager); some setups (``local_lock=flock``/``all`` mounts)
keep it on one machine, and then only runs on the same host are told apart. Who holds a lock file,
read-only: ``data_prep.format.lock_holder``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)


class LockHeld(Exception):
    """Another live process holds the lock on ``path``; ``holder`` is what it wrote ("pid N on HOST")."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class RunLock:
    """Exclusive locks named ``name`` in one or more directories, held until ``release`` (or until the
    process ends). Call ``acquire`` on one process of the job only (rank 0)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._fds: list[int] = []

    def path(self, directory: str | os.PathLike) -> Path:
        return Path(directory) / self.name

    def acquire(self, directory: str | os.PathLike) -> Path:
        """Lock ``directory`` (made if missing); raises ``LockHeld`` if a live process holds it, OSError
        if the lock file cannot be made. A file system without locks is warned about, not refused."""
        import fcntl

        path = self.path(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec (O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that has not written its name yet"
            os.close(fd)
            raise LockHeld(path, holder) from None
        except OSError as exc:  # ENOLCK / EOPNOTSUPP: e.g. NFS without a lock manager
            os.close(fd)
            log.warning("cannot lock %s (%s): a second run started into %s while this one runs is not detected",
                        path, exc.strerror or errno.errorcode.get(exc.errno, exc.errno), path.parent)
            return path
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fds.append(fd)
        return path

    def release(self) -> None:
        """Unlock (LOCK_UN: a forked child, e.g. a DataLoader worker, shares the lock) and close; the
        files stay."""
        import fcntl

        while self._fds:
            fd = self._fds.pop()
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
