"""Embedding on a Dask cluster: one task per slide, one encoder per worker, one GPU per task where offered.

When the cluster's workers advertise a ``GPU`` resource (``dask worker ... --resources "GPU=1"``, one
worker per GPU, each with its own ``CUDA_VISIBLE_DEVICES``) every task asks for ``resources={"GPU": 1}``,
so a GPU embeds one slide at a time; otherwise tasks are plain. The output directory must be on a file
system shared by the client and the workers.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import distributed
from tqdm.auto import tqdm

from wsi_mil.compute import dask_client
from wsi_mil.config import Config, FeaturesConfig
from wsi_mil.encoders import build_encoder
from wsi_mil.errors import SlideError, WsiMilError, name_slide
from wsi_mil.extract.device import run_jobs
from wsi_mil.extract.embedder import Embedder
from wsi_mil.extract.planning import Job, plan_slides
from wsi_mil.layout import Layout
from wsi_mil.reports import SlideResult

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _worker_embedder(features_json: str) -> Embedder:
    """One encoder per worker process and feature settings, built on first use and kept."""
    cfg = FeaturesConfig.model_validate_json(features_json)
    return Embedder(build_encoder(cfg), cfg.device, batch_size=cfg.batch_size, amp=cfg.amp)


def extract_slide_task(out: str, cfg: Config, tiling: str, slide_id: str) -> SlideResult:
    """Dask task: embed one slide on the worker's device (the encoder is cached per worker)."""
    jobs, finished = plan_slides(Layout(Path(out)), tiling, cfg, [slide_id])
    if finished:
        return finished[0]
    try:
        embedder = _worker_embedder(cfg.features.model_dump_json())
    except WsiMilError as exc:
        return SlideResult(slide_id, "failed", str(exc))
    return run_jobs(jobs, embedder, cfg.features, processes=False, progress=False)[0]


def run_on_cluster(out: Path, cfg: Config, tiling: str, jobs: list[Job], strict: bool) -> list[SlideResult]:
    """Embed ``jobs`` on the Dask cluster of ``cfg.compute``, one task per slide; results as they finish."""
    results: list[SlideResult] = []
    task_cfg = cfg.with_overrides({"tracking.uri": None})  # workers need no MLflow credentials
    with dask_client(cfg.compute) as client:
        workers = client.scheduler_info().get("workers", {}).values()
        gpu = any((w.get("resources") or {}).get("GPU") for w in workers)
        resources = {"GPU": 1} if gpu else None
        log.info("extracting %d slides on Dask cluster %s%s", len(jobs), cfg.compute.scheduler,
                 " (one GPU per task)" if gpu else "")
        futures = {client.submit(extract_slide_task, str(out), task_cfg, tiling, job.slide_id, resources=resources,
                                 pure=False, key=f"extract-{job.slide_id}-{time.time_ns()}"): job.slide_id
                   for job in jobs}
        for future in tqdm(distributed.as_completed(futures, loop=client.loop), total=len(futures), unit="slide", desc="extract",
                           disable=None, leave=False):
            slide_id = futures[future]
            try:
                result = future.result()
            except distributed.KilledWorker as exc:  # a worker died on this slide (crash, out of memory)
                result = SlideResult(slide_id, "failed", f"Dask task failed ({exc.__class__.__name__}: {exc})")
            except Exception as exc:  # the task raised: its own errors are results, this is a bug or a full disk
                client.cancel(list(futures))
                if isinstance(exc, WsiMilError):
                    raise
                name_slide(exc, slide_id, "embedding it on the Dask cluster")
                raise
            results.append(result)
            if strict and result.status == "failed":
                client.cancel(list(futures))
                raise SlideError(f"slide {result.slide_id}: {result.error}")
    return results
