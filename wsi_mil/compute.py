"""The Dask client every parallel stage uses: an embedded local cluster, or an existing one.

On a workstation the default is one in-process worker with several threads: OpenSlide and the
Zarr codecs release the GIL, so threads read in parallel without pickling patches between
processes (measured faster than separate processes on 2 cores: ``benchmarks/tiling.py``). With
``compute.scheduler`` (``--scheduler tcp://HOST:PORT``) the same code runs on a real cluster.

Every socket of the local cluster (scheduler, workers, nannies, their HTTP endpoints) listens on
``compute.host`` (127.0.0.1 unless the user asks otherwise); the scheduler serves its dashboard only
with ``compute.dashboard``, else a bare HTTP endpoint (health, metrics) like each worker's; all on
random ports, so that commands running side by side never collide. Left to themselves, distributed's
dashboard and in-process workers listen on every interface.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import dask
import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from wsi_mil.config import ComputeConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.redaction import redact

log = logging.getLogger(__name__)


def _quiet_distributed() -> None:
    """Keep Dask's own INFO chatter out of our logs (importing distributed resets its level)."""
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("distributed").setLevel(logging.DEBUG if debug else logging.WARNING)


def _not_a_task_failure(record: logging.LogRecord) -> bool:
    """Logging filter: False for a worker's "Compute Failed" record (the client reports every task failure)."""
    return not record.getMessage().startswith("Compute Failed")


class _ClientReportsTaskFailures(WorkerPlugin):
    """On a local cluster's workers: no "Compute Failed" log beside the client's own one-line report.

    A task's exception reaches the client, which turns it into a slide failure, a one-line resource
    error or a traceback of a bug; the worker's copy (task repr and traceback) would only repeat it.
    """

    def setup(self, worker: distributed.Worker) -> None:
        logging.getLogger("distributed.worker").addFilter(_not_a_task_failure)


def _address(host: str, port: int) -> str:
    """``host:port`` as distributed parses it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def dask_client(cfg: ComputeConfig) -> Iterator[distributed.Client]:
    """A connected :class:`distributed.Client`; a local cluster it started is shut down on exit.

    The local cluster listens on ``cfg.host`` only (see the module docstring).

    Raises
    ------
    WsiMilError
        When the scheduler of ``cfg.scheduler`` cannot be reached or has no workers.
    """
    _quiet_distributed()
    if cfg.scheduler:
        shown = redact(cfg.scheduler)
        try:
            client = distributed.Client(cfg.scheduler, timeout=cfg.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise WsiMilError(
                f"cannot reach the Dask scheduler at {shown} ({exc.__class__.__name__}); start it "
                "(`dask scheduler`) or drop --scheduler to use a local cluster."
            ) from None
        try:
            client.wait_for_workers(1, timeout=cfg.connect_timeout)
        except (TimeoutError, OSError):
            client.close()
            raise WsiMilError(
                f"the Dask scheduler at {shown} has no workers after {cfg.connect_timeout:.0f} s; "
                f"start some with `dask worker {shown}`."
            ) from None
        log.info("using Dask cluster %s (%d workers)", shown, len(client.nthreads()))
        try:
            yield client
        finally:
            client.close()
        return

    with dask.config.set({"distributed.worker.daemon": False, "distributed.admin.log-length": 0}):
        cluster = distributed.LocalCluster(
            n_workers=cfg.workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=cfg.processes,
            memory_limit=cfg.memory_limit,
            # every HTTP server gets an explicit host: distributed binds ":8787" and the in-process
            # workers' endpoints to all interfaces otherwise
            dashboard_address=_address(cfg.host, 0),
            scheduler_kwargs={"dashboard": bool(cfg.dashboard)},
            worker_dashboard_address=_address(cfg.host, 0),
            **({"host": cfg.host} if cfg.processes else {}),  # in-process workers talk over no socket
            silence_logs=logging.ERROR,
        )
    client = distributed.Client(cluster, set_as_default=False)
    client.register_plugin(_ClientReportsTaskFailures(), name="wsi-mil-task-failures")
    if cfg.dashboard:  # client.dashboard_link names the machine's address, not the one listened on
        log.info("Dask dashboard: http://%s/status", _address(cfg.host, cluster.scheduler.http_server.port))
    log.debug("local Dask cluster: %d worker(s) x %d thread(s), processes=%s",
              cfg.workers, cfg.threads_per_worker, cfg.processes)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def total_threads(client: distributed.Client) -> int:
    """Threads over all workers of the cluster (at least 1)."""
    return max(1, sum(int(n) for n in client.nthreads().values()))
