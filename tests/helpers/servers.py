"""Real servers on 127.0.0.1 for end-to-end tests: a Dask scheduler with workers, an MLflow server; the
listening sockets of a process tree."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(pid: int | None = None) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of process ``pid`` (default: this one) and its descendants."""
    found: set[tuple[str, int]] = set()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
    return found


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


class DaskProcesses:
    """A running `dask scheduler` and its `dask worker` processes (each one thread, optional resources)."""

    def __init__(self, address: str, log, env: dict[str, str]) -> None:
        self.address, self._log, self._env = address, log, env
        self.workers: list[subprocess.Popen] = []

    def add_worker(self, resources: str | None = None) -> subprocess.Popen:
        """Start one more `dask worker` (``resources`` e.g. ``"GPU=1"``); returns its process."""
        extra = ["--resources", resources] if resources else []
        proc = subprocess.Popen([str(BIN / "dask"), "worker", self.address, "--nworkers", "1", "--nthreads", "1",
                                 "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "2GiB", *extra],
                                stdout=self._log, stderr=self._log, env=self._env)
        self.workers.append(proc)
        return proc

    def wait_for_workers(self, n: int) -> None:
        """Block until the scheduler knows ``n`` workers."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(n, timeout=60)

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL a worker's nanny and the worker process under it, as a crashed machine would vanish."""
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(proc.pid)
            for p in [*tree.children(recursive=True), tree]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def dask_processes(resources: list[str | None], log_dir: Path | None = None) -> Iterator[DaskProcesses]:
    """`dask scheduler` + one `dask worker` per entry of ``resources`` (None: no resources); all stopped on exit."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = open(os.devnull, "w") if log_dir is None else open(Path(log_dir) / "dask.log", "w")  # noqa: SIM115
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], stdout=log, stderr=log, env=env)
    cluster = DaskProcesses(address, log, env)
    try:
        _wait(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, "dask scheduler")
        for res in resources:
            cluster.add_worker(res)
        cluster.wait_for_workers(len(resources))
        yield cluster
    finally:
        _stop([p for p in cluster.workers if p.poll() is None])
        _stop([scheduler])
        log.close()


@contextlib.contextmanager
def dask_cluster(n_workers: int = 2, log_dir: Path | None = None) -> Iterator[str]:
    """`dask scheduler` + ``n_workers`` `dask worker` processes (1 thread each); yields the address."""
    with dask_processes([None] * n_workers, log_dir) as cluster:
        yield cluster.address


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` over a fresh SQLite store with proxied artifacts; yields its http URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "mlflow-server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=log, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, "mlflow server", 120)
        yield url
    finally:
        _stop([proc])
        log.close()


def rest(url: str, endpoint: str, payload: dict | None = None, *, raw: bool = False):
    """Call the MLflow REST API (GET without payload, POST with); JSON answer, or bytes with ``raw``."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}{endpoint}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        body = answer.read()
    return body if raw else json.loads(body)
