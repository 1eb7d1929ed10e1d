"""Tile a slide directory into Zarr patch stores, in parallel on a Dask cluster.

For every slide: the inventory entry (vendor, size, levels, MPP) is read on the client; a complete
store with the same settings and slide fingerprint is skipped; otherwise a worker segments tissue on
a thumbnail and lays the patch grid, the client creates the store under a temporary name, and one
task per Zarr chunk of coordinates reads its patches (each worker keeps its own slide handles) and
writes them straight into that chunk (or returns them to the client, ``tiling.write_from``). The
store is marked complete and renamed into place once every chunk is written. Failures are per slide:
they are recorded in ``OUT/slides.csv`` and the cohort carries on (``strict`` stops at the first).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from distributed import KilledWorker, as_completed
from tqdm.auto import tqdm

from wsi_mil import __version__
from wsi_mil.compute import dask_client, total_threads
from wsi_mil.config import Config, SlidesConfig, TilingConfig, TissueConfig
from wsi_mil.errors import (
    SlideError,
    WsiMilError,
    is_slide_problem,
    name_slide,
    resource_error,
    resource_problem,
)
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.locks import Claims, claim_path, owner_alive, wait_pause
from wsi_mil.reports import SlideResult
from wsi_mil.slides import (
    FolderEntry,
    ReadPlan,
    SlideInfo,
    choose_level,
    forget_slide,
    inspect_slide,
    mpp_overrides,
    no_slides_message,
    open_slide,
    read_patch,
    read_thumbnail,
    scan_folder,
)
from wsi_mil.stores import (
    clean_partials,
    commit,
    create_patch_store,
    is_complete_store,
    mark_complete,
    merge_csv_rows,
    open_patch_store,
    partial_path,
    remove_path,
    write_clam_coords,
)
from wsi_mil.tissue import TissueParams, detect_tissue, save_qc_images, thumbnail_mpp

if TYPE_CHECKING:
    import distributed

log = logging.getLogger(__name__)

CSV_COLUMNS = [
    "slide_id", "path", "status", "reason", "reader", "vendor", "width", "height", "levels", "mpp", "mpp_source",
    "mpp_note", "level", "downsample", "read_size", "n_patches", "store",
]
STATUSES = ("done", "reused", "skipped", "failed")
MAX_SLIDE_SIDE_MM = 130.0  # longer than any glass slide (5 x 4 inch whole-mount slides included)


# ------------------------------------------------------------------------------------------- results
@dataclass
class TiledSlide(SlideResult):
    """A folder entry's tiling outcome (``output``: its patch store) and its inventory data: a row of slides.csv.

    ``status``: ``done`` (tiled now), ``reused`` (a complete store with the same settings exists),
    ``skipped`` (not a slide: ``reason`` says why) or ``failed`` (``reason`` is the error).
    """

    path: str = ""
    kind: str = ""  # group of a skipped/failed entry for the summary (e.g. "unknown extension")
    info: SlideInfo | None = None
    plan: ReadPlan | None = None

    @property
    def error(self) -> str:
        """The failure message ("" unless failed)."""
        return self.reason if self.status == "failed" else ""

    def row(self) -> dict[str, Any]:
        """The slide's row of ``slides.csv``."""
        info, plan = self.info, self.plan
        return {
            "slide_id": self.slide_id,
            "path": self.path,
            "status": self.status,
            "reason": self.reason,
            "reader": info.reader if info else "",
            "vendor": info.vendor if info else "",
            "width": info.width if info else "",
            "height": info.height if info else "",
            "levels": info.levels if info else "",
            "mpp": f"{info.mpp:.6g}" if info and info.mpp is not None else "",
            "mpp_source": info.mpp_source if info else "",
            "mpp_note": info.mpp_note if info else "",
            "level": plan.level if plan else "",
            "downsample": f"{plan.downsample:.6g}" if plan else "",
            "read_size": plan.read_size if plan else "",
            "n_patches": self.n_patches,
            "store": str(self.output) if self.output else "",
        }


@dataclass
class TilingReport:
    """Per-entry results of :func:`tile_cohort` (also written to ``OUT/slides.csv``)."""

    tiling_key: str
    tiles_dir: Path
    results: list[TiledSlide] = field(default_factory=list)

    def with_status(self, status: str) -> list[TiledSlide]:
        """The entries with one status."""
        return [r for r in self.results if r.status == status]

    @property
    def failed(self) -> list[TiledSlide]:
        return self.with_status("failed")

    @property
    def ok(self) -> list[TiledSlide]:
        """Slides with a complete store (tiled now or reused)."""
        return [r for r in self.results if r.status in ("done", "reused")]

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.ok)

    def summary(self) -> str:
        """Counts per status (skipped ones by kind) and one line per failure."""
        counts = {s: len(self.with_status(s)) for s in STATUSES}
        kinds: dict[str, int] = {}
        for r in self.with_status("skipped"):
            kinds[r.kind or "other"] = kinds.get(r.kind or "other", 0) + 1
        why = f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})" if kinds else ""
        lines = [
            f"{len(self.results)} entr{'y' if len(self.results) == 1 else 'ies'} -> {self.tiles_dir}: "
            f"{counts['done']} tiled, {counts['reused']} already done, {counts['skipped']} skipped{why}, "
            f"{counts['failed']} failed; {self.n_patches} patches."
        ]
        lines += [f"  FAILED {r.slide_id}: {r.reason}" for r in self.failed]
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in self.results:
            writer.writerow(r.row())
        return buf.getvalue()


# ------------------------------------------------------------------------------------- settings/attrs
def patch_settings(cfg: Config) -> dict[str, Any]:
    """Every setting that changes which patches are stored or their pixels."""
    t: TilingConfig = cfg.tiling
    return {
        "target_mpp": t.target_mpp,
        "patch_size": t.patch_size,
        "overlap": t.overlap,
        "tissue_threshold": t.tissue_threshold,
        "max_patches_per_slide": t.max_patches_per_slide,
        "tissue": cfg.tissue.resolved(),
    }


def store_attrs(info: SlideInfo, plan: ReadPlan, cfg: Config, key: str) -> dict[str, Any]:
    """Attributes of a slide's patch store (all settings, exact MPPs, level, slide fingerprint)."""
    t = cfg.tiling
    settings = patch_settings(cfg)
    signature_src = {"settings": settings, "fingerprint": info.fingerprint, "mpp_level0": info.mpp,
                     "level": plan.level, "read_size": plan.read_size, "resample_filter": plan.resample_filter,
                     "reader": info.reader}
    signature = hashlib.sha256(json.dumps(signature_src, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "slide_id": info.slide_id,
        "slide_path": info.path,
        "slide_fingerprint": info.fingerprint,
        "reader": info.reader,
        "reader_note": info.reader_note,
        "tile_decoder": info.tile_decoder,
        "vendor": info.vendor,
        "width": info.width,
        "height": info.height,
        "mpp_level0": info.mpp,
        "mpp_source": info.mpp_source,
        "mpp_note": info.mpp_note,
        "target_mpp": t.target_mpp,
        "patch_size": t.patch_size,
        "patch_size_level0": plan.patch_size_level0,
        "step_level0": (t.patch_size - t.overlap) * t.target_mpp / info.mpp,
        "level": plan.level,
        "patch_level": plan.level,
        "downsample": plan.downsample,
        "level_mpp": plan.level_mpp,
        "read_size": plan.read_size,
        "resampled": plan.resample,
        "resample_filter": plan.resample_filter,
        "overlap": t.overlap,
        "tissue_threshold": t.tissue_threshold,
        "max_patches_per_slide": t.max_patches_per_slide,
        "tissue": settings["tissue"],
        "chunk_patches": t.chunk_patches,
        "codec": t.codec,
        "compression_level": t.compression_level,
        "tiling_key": key,
        "signature": signature,
        "wsi_mil_version": __version__,
    }


def _stored_signature(path: Path) -> str | None:
    if not is_complete_store(path):
        return None
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("signature")
    except Exception:
        return None


# ------------------------------------------------------------------------------------------ the grid
def grid_shape(width: int, height: int, mpp0: float, tiling: TilingConfig) -> tuple[int, int]:
    """Patch columns and rows of the full grid over a ``width`` x ``height`` level-0 slide (before tissue)."""
    size0 = tiling.patch_size * tiling.target_mpp / mpp0
    step0 = (tiling.patch_size - tiling.overlap) * tiling.target_mpp / mpp0
    nx = int(np.floor((width - size0) / step0)) + 1 if width >= size0 else 0
    ny = int(np.floor((height - size0) / step0)) + 1 if height >= size0 else 0
    return nx, ny


def check_plan(info: SlideInfo, tiling: TilingConfig) -> None:
    """Refuse, before any pixel is read, a slide that cannot give a sensible patch grid.

    Raises
    ------
    SlideError
        The MPP error when the slide has no usable MPP; else one sentence with the numbers when it
        is smaller than one patch, larger than any glass slide at its MPP (``MAX_SLIDE_SIDE_MM``), or
        its grid has more than ``tiling.max_grid_patches`` positions.
    """
    if info.mpp is None:
        raise SlideError(info.mpp_error)
    size_um = tiling.patch_size * tiling.target_mpp
    w_um, h_um = info.width * info.mpp, info.height * info.mpp
    at = f"{info.width} x {info.height} px at {info.mpp:.4g} um/px ({info.mpp_source})"
    if w_um < size_um or h_um < size_um:
        raise SlideError(
            f"slide {info.slide_id} ({at} = {w_um:.0f} x {h_um:.0f} um) is smaller than one {tiling.patch_size} px "
            f"patch at {tiling.target_mpp:g} um/px ({size_um:g} um): nothing to tile; for small images use a smaller "
            "tiling.patch_size or tiling.target_mpp."
        )
    if max(w_um, h_um) > MAX_SLIDE_SIDE_MM * 1000:
        raise SlideError(
            f"slide {info.slide_id} ({at}) would measure {w_um / 1000:.0f} x {h_um / 1000:.0f} mm, larger than any "
            f"glass slide ({MAX_SLIDE_SIDE_MM:g} mm): its MPP is wrong; give the right one in slides.mpp_override_csv."
        )
    nx, ny = grid_shape(info.width, info.height, info.mpp, tiling)
    if nx * ny > tiling.max_grid_patches:
        raise SlideError(
            f"slide {info.slide_id} ({at}) would need a grid of {nx} x {ny} = {nx * ny:,} patches of "
            f"{tiling.patch_size} px at {tiling.target_mpp:g} um/px, more than tiling.max_grid_patches="
            f"{tiling.max_grid_patches:,}; check its MPP (slides.mpp_override_csv) or raise the cap."
        )


def patch_grid(mask: np.ndarray, width: int, height: int, mpp0: float, tiling: TilingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left coordinates (int64 [N, 2], row-major) of patches whose tissue fraction passes.

    Returns the coordinates and their tissue fractions (measured on the thumbnail mask).
    """
    size0 = tiling.patch_size * tiling.target_mpp / mpp0
    step0 = (tiling.patch_size - tiling.overlap) * tiling.target_mpp / mpp0
    nx, ny = grid_shape(width, height, mpp0, tiling)
    if nx <= 0 or ny <= 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    xs = np.round(np.arange(nx) * step0).astype(np.int64)
    ys = np.round(np.arange(ny) * step0).astype(np.int64)
    th, tw = mask.shape
    sx, sy = width / tw, height / th
    integral = np.zeros((th + 1, tw + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    c0 = np.clip(np.round(xs / sx).astype(np.int64), 0, tw - 1)
    c1 = np.clip(np.maximum(c0 + 1, np.round((xs + size0) / sx).astype(np.int64)), 1, tw)
    r0 = np.clip(np.round(ys / sy).astype(np.int64), 0, th - 1)
    r1 = np.clip(np.maximum(r0 + 1, np.round((ys + size0) / sy).astype(np.int64)), 1, th)
    R0, C0 = np.meshgrid(r0, c0, indexing="ij")
    R1, C1 = np.meshgrid(r1, c1, indexing="ij")
    area = (R1 - R0) * (C1 - C0)
    inside = integral[R1, C1] - integral[R0, C1] - integral[R1, C0] + integral[R0, C0]
    fraction = (inside / np.maximum(area, 1)).ravel()
    Y, X = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([X.ravel(), Y.ravel()], axis=1)
    keep = fraction >= tiling.tissue_threshold if tiling.tissue_threshold > 0 else fraction > 0
    coords, fraction = coords[keep], fraction[keep]
    if tiling.max_patches_per_slide is not None and len(coords) > tiling.max_patches_per_slide:
        idx = np.unique(np.round(np.linspace(0, len(coords) - 1, tiling.max_patches_per_slide)).astype(np.int64))
        coords, fraction = coords[idx], fraction[idx]
    return np.ascontiguousarray(coords, dtype=np.int64), fraction


def grid_boxes(coords: np.ndarray, size0: float, width: int, height: int, thumb_shape: tuple[int, int]) -> np.ndarray:
    """Patch boxes [N, 4] (x0, y0, x1, y1) in thumbnail pixels, for the QC grid image."""
    th, tw = thumb_shape
    sx, sy = width / tw, height / th
    c = coords.astype(np.float64)
    return np.stack([c[:, 0] / sx, c[:, 1] / sy, (c[:, 0] + size0) / sx, (c[:, 1] + size0) / sy], axis=1)


# ------------------------------------------------------------------------------------ worker tasks
def _slide_failure(path: str, exc: BaseException, what: str) -> BaseException:
    """A :class:`SlideError` for a slide problem, else ``exc`` itself with the slide named in its notes.

    Slide problems: :func:`~wsi_mil.errors.is_slide_problem`; anything else (a bug, a full disk) is to be raised.
    """
    if isinstance(exc, SlideError):
        return exc
    if not is_slide_problem(exc):
        return name_slide(exc, path, what)
    forget_slide(path)  # an OpenSlide handle stays unusable after a read error
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError) or type(exc).__module__.startswith("openslide"):
        return SlideError(f"slide {path}: {what} failed ({text}); the file may be corrupt or truncated.")
    return SlideError(f"slide {path}: {what} failed ({type(exc).__name__}: {text}).")


def find_tissue_task(
    path: str, mpp0: float, tissue: TissueConfig, tiling: TilingConfig, with_thumbnail: bool,
    slides: SlidesConfig | None = None, qc_paths: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Worker task: thumbnail, tissue mask and patch grid of one slide (and why they are empty, if so).

    With ``qc_paths`` (:meth:`wsi_mil.layout.Layout.qc_images`) the worker also writes the QC images,
    so PNG encoding runs beside the other slides' extraction instead of on the client.
    """
    try:
        reader = open_slide(path, slides)
        params = TissueParams.from_config(tissue)
        width, height = reader.dimensions
        thumb = read_thumbnail(reader, mpp0, thumbnail_mpp(width, height, mpp0, params))
        um_per_px = mpp0 * width / thumb.shape[1]
        found = detect_tissue(thumb, um_per_px, params)
        coords, _ = patch_grid(found.mask, width, height, mpp0, tiling)
    except Exception as exc:
        raise _slide_failure(path, exc, "tissue detection") from None
    if qc_paths is not None:
        boxes = grid_boxes(coords, tiling.patch_size * tiling.target_mpp / mpp0, width, height, found.mask.shape)
        save_qc_images(qc_paths, thumb, found.mask, boxes)
    return {"coords": coords, "mask": found.mask, "thumbnail": thumb if with_thumbnail else None,
            "tissue_area_um2": found.area_um2, "empty_reason": found.empty_reason(params)}


def read_patches(path: str, coords: np.ndarray, plan: ReadPlan, slides: SlidesConfig | None = None) -> np.ndarray:
    """Patches [n, P, P, 3] uint8 at level-0 ``coords`` [n, 2] of the slide at ``path`` (cached reader)."""
    reader = open_slide(path, slides)
    out = np.empty((len(coords), plan.patch_size, plan.patch_size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(coords):
        read_patch(reader, int(x), int(y), plan, out=out[i])
    return out


def extract_chunk_task(
    path: str, coords: np.ndarray, plan: ReadPlan, store: str | None, start: int, slides: SlidesConfig | None = None,
) -> np.ndarray | int:
    """Worker task: read one chunk of patches; write it into ``store`` (returns the count) or return it."""
    try:
        patches = read_patches(path, coords, plan, slides)
    except Exception as exc:
        raise _slide_failure(path, exc, f"reading patches {start}-{start + len(coords) - 1}") from None
    if store is None:
        return patches
    _patch_array(store)[start : start + len(patches)] = patches
    return len(patches)


@lru_cache(maxsize=8)
def _patch_array(store: str) -> zarr.Array:
    """The ``patches`` array of a store being written, opened once per worker process.

    Patch chunks are never empty, so zarr's per-chunk "all equal to the fill value?" scan (as costly
    as the zstd compression itself) is switched off with ``write_empty_chunks``.
    """
    return zarr.open_array(store, path="patches", mode="r+").with_config({"write_empty_chunks": True})


# ---------------------------------------------------------------------------------------- the cohort
@dataclass
class _Job:
    """A slide in flight on the cluster."""

    index: int
    result: TiledSlide
    attrs: dict[str, Any]
    final: Path
    partial: Path | None = None
    coords: np.ndarray | None = None
    remaining: int = 0
    futures: list[Any] = field(default_factory=list)


class _CohortRun:
    """One `tile_cohort` call: the inventory, the cluster work and the report (slides.csv)."""

    def __init__(self, cfg: Config, out: Path, client: distributed.Client, strict: bool) -> None:
        self.cfg = cfg
        self.layout = Layout(out)
        self.key = tiling_key(cfg)
        self.tiles_dir = self.layout.tiles_dir(self.key)
        self.client = client
        self.strict = strict
        self.report = TilingReport(tiling_key=self.key, tiles_dir=self.tiles_dir)
        self.claims: Claims | None = None
        self.deferred: list[_Job] = []  # slides another live process is tiling

    # -- bookkeeping
    def write_csv(self) -> None:
        """Merge this call's rows into ``slides.csv`` (other commands' rows of existing slides stay)."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        merge_csv_rows(self.layout.slides_csv, CSV_COLUMNS, [r.row() for r in self.report.results],
                       key=("slide_id", "path"),
                       lock_dir=self.layout.locks_dir, keep=lambda row: bool(row.get("path")) and Path(row["path"]).exists())

    def fail(self, job: _Job | None, result: TiledSlide, exc: BaseException) -> None:
        result.status = "failed"
        result.reason = str(exc) if isinstance(exc, WsiMilError) else f"{type(exc).__name__}: {exc}"
        result.output = None
        result.n_patches = 0
        log.warning("slide %s failed: %s", result.slide_id, result.reason)
        if job is not None:
            for fut in job.futures:
                fut.cancel()
            if job.partial is not None:
                remove_path(job.partial)
        if self.strict:
            self.write_csv()
            raise SlideError(f"{result.reason} (stopped by --strict)")

    def clam_coords_path(self, slide_id: str) -> Path:
        return self.layout.clam_coords(self.key, slide_id)

    def write_clam_coords(self, coords: np.ndarray, attrs: dict[str, Any]) -> None:
        """CLAM's coordinate file of a slide (``tiling.export_clam_h5``) from its patch store attributes."""
        write_clam_coords(
            self.clam_coords_path(attrs["slide_id"]), coords, patch_size=int(attrs["read_size"]),
            patch_level=int(attrs["level"]),
            attrs={"target_patch_size": attrs["patch_size"], "mpp_level0": attrs["mpp_level0"],
                   "target_mpp": attrs["target_mpp"], "patch_size_level0": attrs["patch_size_level0"],
                   "name": attrs["slide_id"]},
        )

    # -- stages
    def inventory(self, entries: Iterable[FolderEntry]) -> list[_Job]:
        """A row for every folder entry; open and check each slide; jobs for those not tiled yet."""
        jobs: list[_Job] = []
        for index, entry in enumerate(entries):
            result = TiledSlide(slide_id=entry.slide_id, path=str(entry.path.resolve()), kind=entry.kind)
            self.report.results.append(result)
            if entry.status == "skipped":
                result.status, result.reason = "skipped", entry.reason
                continue
            if entry.status == "failed":
                self.fail(None, result, SlideError(entry.reason))
                continue
            try:
                info = inspect_slide(entry.path, self.cfg.slides)
                result.info = info
                check_plan(info, self.cfg.tiling)
                result.plan = choose_level(info.downsamples, info.mpp, self.cfg.tiling.target_mpp,
                                           self.cfg.tiling.patch_size)
            except Exception as exc:
                failure = _slide_failure(str(entry.path), exc, "opening")
                if not isinstance(failure, SlideError):
                    raise  # failure is exc, the slide named
                self.fail(None, result, failure)
                continue
            final = self.layout.patch_store(self.key, info.slide_id)
            attrs = store_attrs(info, result.plan, self.cfg, self.key)
            if _stored_signature(final) == attrs["signature"]:
                result.status = "reused"
                result.output = final.resolve()
                result.n_patches = int(zarr.open_group(str(final), mode="r").attrs.get("n_patches", 0))
                if self.cfg.tiling.export_clam_h5 and not self.clam_coords_path(info.slide_id).is_file():
                    # turned on after this slide was tiled: fill in its file from the finished store
                    try:
                        store = open_patch_store(final)
                        self.write_clam_coords(store.coords, store.attrs)
                    except Exception as exc:  # an extra file: the slide's store stays done, others go on
                        log.warning("slide %s: CLAM coordinate file %s not written (%s); rerun to retry.",
                                    info.slide_id, self.clam_coords_path(info.slide_id), exc)
                continue
            jobs.append(_Job(index=index, result=result, attrs=attrs, final=final))
        return jobs

    def start_extraction(self, job: _Job, found: dict[str, Any]) -> list[Any]:
        info, plan, t = job.result.info, job.result.plan, self.cfg.tiling
        assert info is not None and plan is not None
        coords: np.ndarray = found["coords"]
        if self.cfg.tiling.qc_images and found.get("thumbnail") is not None:
            boxes = grid_boxes(coords, plan.patch_size_level0, info.width, info.height, found["mask"].shape)
            save_qc_images(self.layout.qc_images(info.slide_id), found["thumbnail"], found["mask"], boxes)
        if len(coords) == 0:
            why = found["empty_reason"] or (
                f"tissue covers {found['tissue_area_um2'] / 1e6:.3g} mm^2 but no {t.patch_size} px patch at "
                f"{t.target_mpp:g} um/px reaches tiling.tissue_threshold={t.tissue_threshold:g}; lower that key "
                "for small or sparse tissue"
            )
            raise SlideError(f"slide {info.path}: no patch to tile: {why} (see qc/{info.slide_id}_mask.png).")
        job.coords = coords
        job.attrs["n_patches"] = len(coords)
        job.attrs["thumbnail_shape"] = list(found["mask"].shape)
        job.final.parent.mkdir(parents=True, exist_ok=True)
        job.partial = partial_path(job.final)
        group = create_patch_store(job.partial, n_patches=len(coords), patch_size=t.patch_size,
                                   chunk_patches=t.chunk_patches, codec=t.codec, level=t.compression_level,
                                   attrs=job.attrs)
        group["coords"][:] = coords
        store = str(job.partial) if t.write_from == "workers" else None
        step = t.chunk_patches
        futures = []
        for start in range(0, len(coords), step):
            fut = self.client.submit(extract_chunk_task, info.path, coords[start : start + step], plan, store, start,
                                     self.cfg.slides, pure=False, priority=1_000_000 - job.index)
            futures.append(fut)
        job.futures = futures
        job.remaining = len(futures)
        return futures

    def finish(self, job: _Job) -> None:
        assert job.partial is not None and job.coords is not None
        mark_complete(job.partial)
        commit(job.partial, job.final)
        job.partial = None
        if self.cfg.tiling.export_clam_h5:
            self.write_clam_coords(job.coords, job.attrs)
        job.result.status = "done"
        job.result.output = job.final.resolve()
        job.result.n_patches = len(job.coords)
        log.info("slide %s: %d patches", job.result.slide_id, len(job.coords))

    def run(self, jobs: list[_Job]) -> None:
        """Tile ``jobs`` on the cluster: a few slides open at a time, chunks written as they arrive.

        Each slide is claimed first (:mod:`wsi_mil.locks`); slides another live process claims are
        left to it and waited for at the end (reused when it finishes them, taken over if it dies).
        """
        self.tiles_dir.mkdir(parents=True, exist_ok=True)
        timeout = self.cfg.compute.claim_timeout_s
        with Claims(self.layout.locks_dir, timeout) as self.claims:
            removed = clean_partials(self.tiles_dir, keep=lambda output: owner_alive(claim_path(output), timeout))
            self.claims.sweep(self.tiles_dir)
            if removed:
                log.info("removed %d partial store(s) of an interrupted run", removed)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        self.queue = list(jobs)
        # two slides per thread: the next slides' tissue detection overlaps this one's extraction, and a
        # thread never waits for the client's round trip (store creation) of a small slide
        self.max_open = max(2, 2 * total_threads(self.client))
        self.open_jobs: dict[int, _Job] = {}
        self.kinds: dict[str, tuple[str, _Job, int]] = {}  # future key -> (tissue | chunk, job, first patch)
        self.completed = as_completed(loop=self.client.loop)
        self.slide_bar = tqdm(total=len(self.report.results), desc="slides", unit="slide", disable=None)
        self.slide_bar.update(len(self.report.results) - len(jobs))
        self.patch_bar = tqdm(total=0, desc="patches", unit="patch", disable=None)
        try:
            while True:
                self.top_up()
                for fut in self.completed:
                    self.collect(fut)
                if not self.deferred:
                    break
                self.wait_for_owners()
        finally:
            for job in list(self.open_jobs.values()):  # interrupted: drop what is unfinished
                for f in job.futures:
                    f.cancel()
                if job.partial is not None:
                    remove_path(job.partial)
            self.slide_bar.close()
            self.patch_bar.close()

    def take(self, job: _Job) -> bool:
        """Claim a slide; False when another live process has it (deferred) or has just finished it (reused)."""
        assert self.claims is not None
        holder = self.claims.claim(job.final)
        if holder is not None:
            log.info("slide %s: %s is tiling it; waiting for it at the end", job.result.slide_id, holder)
            self.deferred.append(job)
            return False
        if _stored_signature(job.final) == job.attrs["signature"]:  # another process finished it meanwhile
            self.claims.release(job.final)
            self.reuse(job)
            return False
        return True

    def reuse(self, job: _Job) -> None:
        """Record a slide whose complete store another process wrote."""
        job.result.status = "reused"
        job.result.output = job.final.resolve()
        job.result.n_patches = int(zarr.open_group(str(job.final), mode="r").attrs.get("n_patches", 0))
        self.slide_bar.update(1)
        self.write_csv()

    def wait_for_owners(self) -> None:
        """Wait until a deferred slide is finished by its owner (reused) or its owner is gone (queued again)."""
        waited = 0.0
        timeout = self.cfg.compute.claim_timeout_s
        while self.deferred:
            for job in list(self.deferred):
                if _stored_signature(job.final) == job.attrs["signature"]:
                    self.deferred.remove(job)
                    self.reuse(job)
                elif not owner_alive(claim_path(job.final), timeout):
                    self.deferred.remove(job)
                    self.queue.append(job)
            if self.queue:
                return
            pause = wait_pause(waited)
            time.sleep(pause)
            waited += pause

    def top_up(self) -> None:
        """Start tissue detection of queued slides until ``max_open`` slides are in flight."""
        while self.queue and len(self.open_jobs) < self.max_open:
            job = self.queue.pop(0)
            if not self.take(job):
                continue
            self.open_jobs[job.index] = job
            assert job.result.info is not None
            # workers that share OUT's file system write the QC images themselves (off the client)
            t = self.cfg.tiling
            on_workers = t.qc_images and t.write_from == "workers"
            qc = self.layout.qc_images(job.result.info.slide_id) if on_workers else None
            fut = self.client.submit(find_tissue_task, job.result.info.path, job.result.info.mpp,
                                     self.cfg.tissue, t, t.qc_images and not on_workers, self.cfg.slides, qc,
                                     pure=False, priority=-job.index)
            self.kinds[fut.key] = ("tissue", job, 0)
            self.completed.add(fut)

    def close(self, job: _Job) -> None:
        """A slide is finished (done or failed): record it and let the next one in."""
        self.open_jobs.pop(job.index, None)
        if self.claims is not None:
            self.claims.release(job.final)
        self.slide_bar.update(1)
        self.write_csv()
        self.top_up()

    def collect(self, fut: Any) -> None:
        """Handle one finished task: a tissue grid starts the chunk tasks, a chunk is counted (or written)."""
        kind, job, start = self.kinds.pop(fut.key, ("", None, 0))
        if job is None or job.index not in self.open_jobs:
            return
        try:
            if fut.status == "error":
                raise fut.exception()
            if fut.status == "cancelled":
                return
            value = fut.result()
            if kind == "tissue":
                futures = self.start_extraction(job, value)
                self.patch_bar.total += len(job.coords)
                self.patch_bar.refresh()
                step = self.cfg.tiling.chunk_patches
                for i, f in enumerate(futures):
                    self.kinds[f.key] = ("chunk", job, i * step)
                self.completed.update(futures)
            else:
                if not isinstance(value, int):  # write_from == "client"
                    array = _patch_array.__wrapped__(str(job.partial))
                    array[start : start + len(value)] = value
                    value = len(value)
                self.patch_bar.update(value)
                job.remaining -= 1
                if job.remaining == 0:
                    self.finish(job)
                    self.close(job)
        except Exception as exc:
            if isinstance(exc, KilledWorker):  # e.g. a decoder crashed on this slide's pixels
                failure: BaseException = SlideError(f"slide {job.result.path}: a Dask worker died while tiling it "
                                                    f"({exc}); the file may be corrupt.")
            else:
                failure = _slide_failure(job.result.path, exc, "tiling")
            if not isinstance(failure, SlideError):
                with contextlib.suppress(OSError):  # the table as far as it got (the disk may be full)
                    self.write_csv()
                if resource_problem(failure) is not None:
                    raise resource_error(failure, job.partial or job.final,
                                         f"finished stores are kept in {self.tiles_dir} and slides.csv lists them") from None
                raise  # failure is exc, the slide named
            self.fail(job, job.result, failure)
            self.close(job)
        finally:
            fut.release()


def tile_cohort(
    slides_dir: Path,
    out: Path,
    cfg: Config,
    *,
    strict: bool = False,
    client: distributed.Client | None = None,
) -> TilingReport:
    """Tile every slide of ``slides_dir`` into ``OUT/tiles/<tiling_key>/<slide_id>.zarr``.

    Complete stores with the same settings and slide fingerprint are kept; partial ones are redone.

    Parameters
    ----------
    slides_dir : Path
        Directory of whole-slide images (``slides.extensions``, ``slides.recursive``).
    out : Path
        Output directory (see :mod:`wsi_mil.layout`).
    cfg : Config
        Settings: ``slides``, ``tissue``, ``tiling`` (patches of ``tiling.patch_size`` px at
        ``tiling.target_mpp`` um/px), ``compute``.
    strict : bool
        Stop at the first failed slide.
    client : distributed.Client, optional
        A Dask client to reuse; otherwise one is started from ``cfg.compute`` for this call.

    Returns
    -------
    TilingReport
        One :class:`TiledSlide` per folder entry (done, reused, skipped or failed with the reason), also
        written to ``OUT/slides.csv``; patch coordinates are level-0 px.

    Raises
    ------
    WsiMilError
        When ``slides_dir`` holds no slide (naming ``slides.recursive`` when sub-folders hold some).
    SlideError
        With ``strict``, at the first slide that fails.
    """
    mpp_overrides(cfg.slides)  # a bad override file is the user's error for the whole run, before any slide
    inventory = scan_folder(Path(slides_dir), cfg.slides)
    run = _CohortRun(cfg, Path(out), client, strict)  # type: ignore[arg-type]
    jobs = run.inventory(inventory.entries)
    run.write_csv()
    if all(e.status == "skipped" for e in inventory.entries):
        raise WsiMilError(no_slides_message(inventory, cfg.slides))
    if jobs:
        if client is not None:
            run.run(jobs)
        else:
            with dask_client(cfg.compute) as own:
                run.client = own
                run.run(jobs)
    run.write_csv()
    log.info("%s", run.report.summary())
    return run.report
