"""The Dask client every parallel stage uses: an embedded local cluster, or an existing one.

On a workstation the default is one in-process worker with several threads: OpenSlide and the
Zarr codecs release the GIL, so threads read in parallel without pickling patches between
processes (measured faster than separate processes on 2 cores: ``benchmarks/tiling.py``). With
``compute.scheduler`` (``--scheduler tcp://HOST:PORT``) the same code runs on a real cluster.

The local cluster serves its dashboard only with ``compute.dashboard``; without it the scheduler's
bare HTTP endpoint (health, metrics) listens on a random loopback port instead of 0.0.0.0:8787.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import dask
import distributed

from wsi_mil.config import ComputeConfig
from wsi_mil.errors import WsiMilError

log = logging.getLogger(__name__)


def _quiet_distributed() -> None:
    """Keep Dask's own INFO chatter out of our logs (importing distributed resets its level)."""
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("distributed").setLevel(logging.DEBUG if debug else logging.WARNING)


@contextlib.contextmanager
def dask_client(cfg: ComputeConfig) -> Iterator[distributed.Client]:
    """A connected :class:`distributed.Client`; a local cluster it started is shut down on exit."""
    _quiet_distributed()
    if cfg.scheduler:
        try:
            client = distributed.Client(cfg.scheduler, timeout=cfg.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise WsiMilError(
                f"cannot reach the Dask scheduler at {cfg.scheduler} ({exc.__class__.__name__}); start it "
                "(`dask scheduler`) or drop --scheduler to use a local cluster."
            ) from None
        try:
            client.wait_for_workers(1, timeout=cfg.connect_timeout)
        except (TimeoutError, OSError):
            client.close()
            raise WsiMilError(
                f"the Dask scheduler at {cfg.scheduler} has no workers after {cfg.connect_timeout:.0f} s; "
                "start some with `dask worker " + cfg.scheduler + "`."
            ) from None
        log.info("using Dask cluster %s (%d workers)", cfg.scheduler, len(client.nthreads()))
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
            # distributed binds 0.0.0.0:8787 when given None: a random loopback port serves no one
            dashboard_address=":0" if cfg.dashboard else "127.0.0.1:0",
            scheduler_kwargs={"dashboard": bool(cfg.dashboard)},
            **({"host": "127.0.0.1"} if cfg.processes else {}),
            silence_logs=logging.ERROR,
        )
    client = distributed.Client(cluster, set_as_default=False)
    if cfg.dashboard:
        log.info("Dask dashboard: %s", client.dashboard_link)
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
