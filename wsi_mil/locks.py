"""Ownership of per-slide outputs when several wsi-mil commands share one output folder.

Before a command writes a slide's output (a patch store, a bag) it *claims* it: it creates the claim
file ``.claims/<output name>.claim`` beside the output with ``O_CREAT | O_EXCL`` (atomic, also on
NFS v3+; the hidden folder keeps the output folder's listing to outputs), holding the owner's
host name, process id, process start time and a random token. While it works, a background thread
touches its claim files (the heartbeat); when it is done it deletes them.

Another command that finds a claim skips that output while the owner is *alive* and takes it over
once the owner is provably gone:

- on this host: the process id no longer exists, or belongs to a process started at another time
  (the id was reused);
- on another host: the claim's heartbeat is older than ``compute.claim_timeout_s``.

A takeover is serialised by a short inter-process lock (a file in ``OUT/.locks/``, left in place:
deleting a lock file others may wait on would let two of them in) and replaces the
claim atomically, so two commands never both take the same output. The same rule decides whether a
leftover ``.partial-*`` output may be deleted: only when no live owner claims it
(:func:`owner_alive`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from filelock import FileLock

log = logging.getLogger(__name__)

CLAIM_SUFFIX = ".claim"
CLAIMS_DIR = ".claims"
DEFAULT_TIMEOUT_S = 3600.0  # a claim of another host whose heartbeat is older than this is dead
UNREADABLE_GRACE_S = 30.0  # an empty or half-written claim file younger than this is being written now


def claim_path(output: Path) -> Path:
    """The claim file of an output path (``OUT/tiles/<key>/S1.zarr`` -> ``OUT/tiles/<key>/.claims/S1.zarr.claim``)."""
    output = Path(output)
    return output.parent / CLAIMS_DIR / (output.name + CLAIM_SUFFIX)


def _process_start(pid: int) -> float | None:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: gone
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return None


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: host, process id and start time (seconds since the epoch), a unique token."""

    host: str
    pid: int
    started: float
    token: str

    @classmethod
    def me(cls) -> Owner:
        """The calling process, with a fresh token."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _process_start(pid) or 0.0, uuid.uuid4().hex)

    def describe(self) -> str:
        """``process 123 on host-a``."""
        return f"process {self.pid} on {self.host}"


def read_owner(path: Path) -> Owner | None:
    """The owner recorded in claim file ``path``; None when it is missing, empty or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        return Owner(str(data["host"]), int(data["pid"]), float(data["started"]), str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def owner_alive(path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether claim file ``path`` is held by a live process (see the module docstring for the rule).

    A missing claim has no live owner; an unreadable one counts as alive for
    :data:`UNREADABLE_GRACE_S` after it was last written (its owner may be writing it right now).
    """
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    owner = read_owner(path)
    if owner is None:
        return age < UNREADABLE_GRACE_S
    alive = process_alive(owner)
    return alive if alive is not None else age < timeout_s


def process_alive(owner: Owner) -> bool | None:
    """Whether ``owner``'s process runs: None when it ran on another host (this host cannot tell)."""
    if owner.host != socket.gethostname():
        return None
    started = _process_start(owner.pid)
    return started is not None and abs(started - owner.started) < 1.0


def _write_claim(fd: int, owner: Owner) -> None:
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(asdict(owner)))
        fh.flush()
        os.fsync(fh.fileno())


class Claims:
    """The claims of one command: take, renew (heartbeat) and release them.

    Use as a context manager: the heartbeat thread runs inside it and every claim still held is
    released on exit.
    """

    def __init__(self, lock_dir: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.lock_dir = Path(lock_dir)
        self.timeout_s = float(timeout_s)
        self.owner = Owner.me()
        self.held: set[Path] = set()
        self.dirs: set[Path] = set()  # claims folders used
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Claims:
        self._thread = threading.Thread(target=self._beat, name="wsi-mil-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        dirs = {p.parent for p in self.held} | self.dirs
        for path in list(self.held):
            self.release(path)
        for folder in dirs:  # an empty claims folder goes (another process may still use it: then it stays)
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _beat(self) -> None:
        interval = max(1.0, min(60.0, self.timeout_s / 4))
        while not self._stop.wait(interval):
            with self._lock:
                held = list(self.held)
            for path in held:
                with contextlib.suppress(OSError):
                    os.utime(path)

    def claim(self, output: Path) -> str | None:
        """Claim ``output``; None when done, else who holds it (``"process 12 on host-a"``).

        A claim of a dead owner is taken over (logged). Claiming an output this process already
        holds succeeds.
        """
        path = claim_path(output)
        if path in self.held:
            return None
        self.dirs.add(path.parent)
        for attempt in range(5):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                return self._take_over(path)
            except FileNotFoundError:  # another process removed the empty claims folder just now
                if attempt == 4:
                    raise
        _write_claim(fd, self.owner)
        with self._lock:
            self.held.add(path)
        return None

    def _take_over(self, path: Path) -> str | None:
        if owner_alive(path, self.timeout_s):  # the common case, without touching the takeover lock
            owner = read_owner(path)
            return owner.describe() if owner is not None else "a process writing its claim"
        with file_lock(path, self.lock_dir, timeout_s=60):
            if owner_alive(path, self.timeout_s):
                owner = read_owner(path)
                return owner.describe() if owner is not None else "a process writing its claim"
            dead = read_owner(path)
            tmp = path.with_name(f"{path.name}.{self.owner.token}")
            _write_claim(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), self.owner)
            os.replace(tmp, path)
        with self._lock:
            self.held.add(path)
        log.info("took over %s from %s, which is gone", path.name.removesuffix(CLAIM_SUFFIX),
                 dead.describe() if dead is not None else "an owner that left no record")
        return None

    def sweep(self, directory: Path) -> int:
        """Delete the claims of gone owners beside the outputs in ``directory``; returns how many.

        A claim is left when its owner was killed between finishing an output and releasing it.
        """
        folder = Path(directory) / CLAIMS_DIR
        if not folder.is_dir():
            return 0
        self.dirs.add(folder)
        removed = 0
        for path in sorted(folder.glob(f"*{CLAIM_SUFFIX}")):
            if path in self.held or owner_alive(path, self.timeout_s):
                continue
            with file_lock(path, self.lock_dir, timeout_s=60):
                if not owner_alive(path, self.timeout_s):  # still gone: nobody took it over meanwhile
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
        return removed

    def release(self, output_or_claim: Path) -> None:
        """Give up a claim (the claim file is deleted only while it still names this process)."""
        path = Path(output_or_claim)
        if path.parent.name != CLAIMS_DIR:
            path = claim_path(path)
        with self._lock:
            self.held.discard(path)
        owner = read_owner(path)
        if owner is not None and owner.token == self.owner.token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def holds(self, output: Path) -> bool:
        """Whether this process holds the claim of ``output``."""
        return claim_path(output) in self.held


def wait_pause(waited_s: float) -> float:
    """Seconds to sleep before looking again at outputs other processes own (grows to 2 s)."""
    return min(2.0, 0.2 + waited_s / 10)


def lock_file(lock_dir: Path, path: Path) -> Path:
    """The lock file in ``lock_dir`` that guards ``path`` (its name plus a hash of its full path)."""
    path = Path(path).resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return Path(lock_dir) / f"{path.name}-{digest}.lock"


@contextlib.contextmanager
def file_lock(path: Path, lock_dir: Path, timeout_s: float = 300.0) -> Iterator[None]:
    """Hold the inter-process lock of the shared file ``path`` (a lock file in ``lock_dir``, left in place).

    Raises
    ------
    filelock.Timeout
        When another process held it for longer than ``timeout_s`` seconds.
    """
    lock = lock_file(lock_dir, path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=timeout_s):
        yield
