"""Embedding jobs on one device: one read-ahead stream over all their blocks, a writer thread for the bags.

On the device: uint8 -> float, resize to the encoder's input size, normalise (:class:`Embedder`).
Finished slides are checked (no NaN/inf) and written by a writer thread, atomically
(:func:`wsi_mil.stores.write_bag`). A slide that fails is recorded; the others carry on.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from wsi_mil.config import FeaturesConfig
from wsi_mil.errors import SlideError, is_slide_problem, name_slide, resource_error, resource_problem
from wsi_mil.extract.embedder import Embedder
from wsi_mil.extract.planning import Job, write_pt
from wsi_mil.extract.reader import PatchBlocks, block_spans, open_reader
from wsi_mil.reports import SlideResult
from wsi_mil.stores import open_patch_store, write_bag

log = logging.getLogger(__name__)


def _finish(job: Job, features: torch.Tensor | None, encoder_attrs: dict[str, Any],
            cfg: FeaturesConfig) -> SlideResult:
    """Check and write one slide's bag (runs in the writer thread)."""
    seconds = job.seconds  # reading and embedding this slide's blocks; the write overlaps the next slide's
    if job.error or features is None:
        return SlideResult(job.slide_id, "failed", job.error, job.n_patches, None, seconds)
    values = features.numpy()
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        return SlideResult(job.slide_id, "failed", (
            f"encoder produced NaN/inf features for {int(bad.sum())} of {len(values)} patches of {job.store} "
            f"(first at patch {int(np.argmax(bad))}); check the weights, or turn mixed precision off "
            "(--set features.amp=false)."), job.n_patches, None, seconds)
    coords = np.asarray(open_patch_store(job.store).coords, dtype=np.int64)
    stored = values.astype(np.float16 if cfg.precision == "float16" else np.float32)
    if not np.isfinite(stored).all():
        return SlideResult(job.slide_id, "failed", f"features of {job.store} overflow float16 (|x| > 65504); "
                           "use --set features.precision=float32.", job.n_patches, None, seconds)
    try:
        write_bag(job.bag, stored, coords, {**job.attrs, **encoder_attrs})
        if cfg.export_pt:
            write_pt(job.bag, values)
    except Exception as exc:  # permissions, unwritable attribute: this slide fails, others go on
        if resource_problem(exc) is not None:  # a full disk fails every slide after it: stop, say so
            raise resource_error(exc, job.bag, f"finished bags are kept in {job.bag.parent}") from None
        if not isinstance(exc, (OSError, ValueError)):
            name_slide(exc, job.slide_id, f"writing the bag {job.bag}")
            raise
        return SlideResult(job.slide_id, "failed", f"cannot write {job.bag} ({exc.__class__.__name__}: {exc}); "
                           "check free disk space and permissions, then rerun.", job.n_patches, None, seconds)
    log.info("embedded %s: %d patches in %.1f s", job.slide_id, job.n_patches, seconds)
    return SlideResult(job.slide_id, "done", "", job.n_patches, job.bag, seconds)


def run_jobs(jobs: list[Job], embedder: Embedder, cfg: FeaturesConfig, *, strict: bool = False,
             processes: bool = True, progress: bool = True) -> list[SlideResult]:
    """Embed ``jobs`` through one read-ahead stream over all their blocks; returns their results in order."""
    blocks: list[tuple[int, int, int]] = []
    for index, job in enumerate(jobs):
        spans = block_spans(job.n_patches, job.chunk, cfg.batch_size)
        job.remaining = len(spans)
        blocks += [(index, start, stop) for start, stop in spans]
    dataset = PatchBlocks([j.store for j in jobs], blocks)
    encoder_attrs = {**embedder.encoder.attrs(), "device": embedder.device.type, "amp": embedder.amp_name,
                     "torch_version": str(torch.__version__)}
    pending: dict[int, Future[SlideResult]] = {}
    results: dict[int, SlideResult] = {}

    def collect(block: bool) -> None:
        for index in [i for i, f in pending.items() if block or f.done()]:
            result = pending.pop(index).result()
            results[index] = result
            if strict and result.status == "failed":
                raise SlideError(f"slide {result.slide_id}: {result.error}")

    bar = tqdm(total=sum(j.n_patches for j in jobs), unit="patch", desc="extract", disable=not progress or None,
               leave=False)
    reader = open_reader(dataset, embedder.device, cfg, processes)
    begun: set[int] = set()
    waiting_since = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-mil-bag-writer") as writer:
        try:
            for index, start, patches, error in reader:
                job = jobs[index]
                if index not in begun:  # a slide's seconds start when the stream began waiting for its first block
                    begun.add(index)
                    job.started = waiting_since
                if job.remaining <= 0:  # slide already failed: drain its remaining blocks
                    waiting_since = time.perf_counter()
                    continue
                if error:
                    job.error = f"cannot read patches {start}.. of {job.store} ({error}); rerun `wsi-mil tile` to redo it."
                else:
                    try:
                        job.parts.append(embedder(patches))
                    except Exception as exc:
                        if not is_slide_problem(exc):  # a bug or a broken encoder: every slide would fail
                            name_slide(exc, job.slide_id, f"embedding patches {start}.. of {job.store}")
                            raise
                        job.error = str(exc) if isinstance(exc, SlideError) else \
                            f"encoder failed on {job.store}: {exc.__class__.__name__}: {str(exc)[:300]}"
                    bar.update(len(patches))
                job.remaining -= 1
                if job.error or job.remaining == 0:
                    features = None if job.error else torch.cat(job.parts).cpu()
                    job.seconds = time.perf_counter() - job.started
                    job.parts, job.remaining = [], 0
                    pending[index] = writer.submit(_finish, job, features, encoder_attrs, cfg)
                collect(block=False)
                waiting_since = time.perf_counter()
            collect(block=True)
        finally:
            for name in ("close", "_shutdown_workers"):  # generator / DataLoader iterator
                stop = getattr(reader, name, None)
                if stop is not None:
                    stop()
            bar.close()
    return [results[i] for i in range(len(jobs))]
