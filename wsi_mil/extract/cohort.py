"""The embedding stage over an output directory: every patch store of one tiling -> HDF5 bags."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from wsi_mil.config import Config
from wsi_mil.devices import resolve_device
from wsi_mil.encoders import build_encoder, encoder_key
from wsi_mil.errors import SlideError
from wsi_mil.extract.cluster import run_on_cluster
from wsi_mil.extract.device import run_jobs
from wsi_mil.extract.embedder import Embedder
from wsi_mil.extract.planning import Job, discover_slides, plan_slides
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.locks import Claims, claim_path, owner_alive, wait_pause
from wsi_mil.reports import SlideResult, Status
from wsi_mil.stores import clean_partials, merge_csv_rows

log = logging.getLogger(__name__)


@dataclass
class ExtractReport:
    """Outcome of :func:`extract_cohort`: one :class:`SlideResult` per slide, in slide order."""

    tiling: str
    encoder_key: str
    features_dir: Path
    device: str
    results: list[SlideResult] = field(default_factory=list)
    seconds: float = 0.0

    def _with(self, status: Status) -> list[SlideResult]:
        return [r for r in self.results if r.status == status]

    @property
    def done(self) -> list[SlideResult]:
        """Slides embedded by this run."""
        return self._with("done")

    @property
    def reused(self) -> list[SlideResult]:
        """Slides whose bags were finished before and kept."""
        return self._with("reused")

    @property
    def failed(self) -> list[SlideResult]:
        """Slides that failed, with their errors."""
        return self._with("failed")

    @property
    def patches_embedded(self) -> int:
        """Patches embedded by this run."""
        return sum(r.n_patches for r in self.done)

    def status_of(self, slide_id: str) -> SlideResult:
        """The result of one slide (KeyError if it was not part of the run)."""
        for result in self.results:
            if result.slide_id == slide_id:
                return result
        raise KeyError(slide_id)

    def summary(self) -> str:
        """A short human-readable summary, one extra line per failed slide."""
        rate = self.patches_embedded / self.seconds if self.seconds > 0 else 0.0
        lines = [f"extract {self.tiling}/{self.encoder_key} on {self.device}: {len(self.done)} done, "
                 f"{len(self.reused)} reused, {len(self.failed)} failed; {self.patches_embedded} patches "
                 f"in {self.seconds:.1f} s ({rate:.1f} patches/s); bags in {self.features_dir}"]
        lines += [f"  failed {r.slide_id}: {r.error}" for r in self.failed]
        return "\n".join(lines)



def extract_cohort(out: Path, cfg: Config, *, tiling: str | None = None, strict: bool = False,
                   slide_ids: list[str] | None = None, progress: bool = True) -> ExtractReport:
    """Embed every patch store of ``OUT/tiles/<tiling>/`` (or only ``slide_ids``) into HDF5 bags.

    Finished, matching bags are reused; slides that fail (missing/incomplete store, unreadable chunk,
    NaN/inf features, out of memory at batch 1) are recorded with their error while the others carry
    on. With ``cfg.compute.scheduler`` set, slides are spread over that Dask cluster (see
    :mod:`wsi_mil.extract`).

    Parameters
    ----------
    out : Path
        Output directory of `wsi-mil tile`.
    cfg : Config
        Settings: ``features`` (encoder, weights, batch size, device, precision), ``compute``.
    tiling : str, optional
        Tiling key of the stores (default: the key of ``cfg``'s tiling settings).
    strict : bool
        Stop at the first failed slide.
    slide_ids : list of str, optional
        Only these slides (default: every finished store of the tiling).
    progress : bool
        Show a progress bar.

    Returns
    -------
    ExtractReport
        One :class:`~wsi_mil.reports.SlideResult` per slide, in slide order (``output``: the bag,
        features float32/float16 [N, D] and level-0 coords int64 [N, 2]); also written to
        ``<features dir>/extract_status.csv``.

    Raises
    ------
    WsiMilError
        When no patch store of the tiling exists, or the encoder cannot be built.
    SlideError
        With ``strict``, at the first slide that fails.
    """
    started = time.perf_counter()
    layout = Layout(Path(out))
    tiling = tiling or tiling_key(cfg)
    key = encoder_key(cfg.features)
    features_dir = layout.features_dir(tiling, key)
    ids = discover_slides(layout, tiling, slide_ids)
    timeout = cfg.compute.claim_timeout_s
    with Claims(layout.locks_dir, timeout) as held:
        removed = clean_partials(features_dir, keep=lambda output: owner_alive(claim_path(output), timeout))
        held.sweep(features_dir)
        if removed:
            log.info("removed %d leftovers of interrupted writes in %s", removed, features_dir)
        jobs, finished = plan_slides(layout, tiling, cfg, ids)
        if strict and any(r.status == "failed" for r in finished):
            first = next(r for r in finished if r.status == "failed")
            raise SlideError(f"slide {first.slide_id}: {first.error}")
        embed = _Embedding(Path(out), cfg, tiling, strict, progress)
        if jobs:  # the encoder loads before any claim or bag creates the bag folder: a failed load leaves none
            embed.prepare()
        waiting: list[str] = []
        waited = 0.0
        while jobs or waiting:
            mine = []
            for job in jobs:  # bags another live process is writing are left to it, and waited for
                holder = held.claim(job.bag)
                if holder is None:
                    mine.append(job)
                else:
                    log.info("slide %s: %s is embedding it; waiting for it at the end", job.slide_id, holder)
                    waiting.append(job.slide_id)
            if mine:  # planned again now that they are ours: another process may have just finished some
                mine, done = plan_slides(layout, tiling, cfg, [j.slide_id for j in mine])
                finished += done
                features_dir.mkdir(parents=True, exist_ok=True)
                finished += embed(mine) if mine else []
                for result in done:
                    held.release(layout.bag(tiling, key, result.slide_id))
                for job in mine:
                    held.release(job.bag)
            jobs = []
            if waiting:  # finished by the other process (reused), or its owner is gone (embedded here)
                if waited:
                    time.sleep(wait_pause(waited))
                waited += wait_pause(waited)
                again, done = plan_slides(layout, tiling, cfg, waiting)
                finished += done
                jobs = [j for j in again if not owner_alive(claim_path(j.bag), timeout)]
                taken = {j.slide_id for j in jobs}
                waiting = [j.slide_id for j in again if j.slide_id not in taken]
    device_name = embed.device_name
    order = {sid: i for i, sid in enumerate(ids)}
    finished.sort(key=lambda r: order[r.slide_id])
    report = ExtractReport(tiling, key, features_dir, device_name, finished, time.perf_counter() - started)
    if features_dir.is_dir():
        _write_status(layout.extract_status(tiling, key), report, layout.locks_dir)
    for result in report.failed:
        log.warning("slide %s failed: %s", result.slide_id, result.error)
    return report


class _Embedding:
    """Embeds jobs on the Dask cluster of ``compute.scheduler`` or on this machine's device (encoder built once)."""

    def __init__(self, out: Path, cfg: Config, tiling: str, strict: bool, progress: bool) -> None:
        self.out, self.cfg, self.tiling, self.strict, self.progress = out, cfg, tiling, strict, progress
        self.embedder: Embedder | None = None
        self.device_name = "dask:" + cfg.compute.scheduler if cfg.compute.scheduler else \
            resolve_device(cfg.features.device).type

    def prepare(self) -> None:
        """Build the local encoder once (raises WsiMilError when it cannot load); nothing to do on a cluster."""
        if self.embedder is None and not self.cfg.compute.scheduler:
            features = self.cfg.features
            self.embedder = Embedder(build_encoder(features), resolve_device(features.device),
                                     batch_size=features.batch_size, amp=features.amp)

    def __call__(self, jobs: list[Job]) -> list[SlideResult]:
        if self.cfg.compute.scheduler:  # the workers resolve their own device
            return run_on_cluster(self.out, self.cfg, self.tiling, jobs, self.strict)
        self.prepare()
        assert self.embedder is not None
        return run_jobs(jobs, self.embedder, self.cfg.features, strict=self.strict, progress=self.progress)


def _write_status(path: Path, report: ExtractReport, lock_dir: Path) -> None:
    """Merge this call's rows into the status CSV (rows of slides other calls embedded stay)."""
    rows = [{"slide_id": r.slide_id, "status": r.status, "n_patches": r.n_patches, "seconds": f"{r.seconds:.2f}",
             "error": r.error} for r in report.results]
    merge_csv_rows(path, ["slide_id", "status", "n_patches", "seconds", "error"], rows, lock_dir=lock_dir)
