"""Batched, device-aware feature extraction: Zarr patch stores -> per-slide HDF5 bags.

Pipeline on one device (:func:`extract_cohort` without a scheduler)
    * Each slide's store is cut into *blocks* of whole Zarr chunks (about one batch each), so a read
      never decodes a chunk twice and there is no per-patch overhead.
    * One reader streams the blocks of *all* slides in order, ahead of the compute: a ``DataLoader``
      with worker processes (stores opened lazily per worker, pinned memory, prefetch) on a GPU, a
      background thread on the CPU. The next slide is therefore read while the current one is embedded.
    * On the device: uint8 -> float, resize to the encoder's input size (bilinear, antialiased),
      normalise; on CUDA also channels_last and autocast (bfloat16 where supported, else float16);
      always ``torch.inference_mode``. A batch that runs out of memory is retried with half the batch
      size, down to one patch.
    * Finished slides are checked (no NaN/inf) and written by a writer thread, atomically
      (:func:`wsi_mil.stores.write_bag`), to ``OUT/features/<tiling>/<encoder>/<slide_id>.h5``.

Resume
    A bag whose attributes match (same encoder key, same patch store signature, same precision, same
    patch count) is skipped; leftovers of interrupted writes are deleted; anything else is redone.

Scale-out (``--scheduler tcp://HOST:PORT`` / ``compute.scheduler``)
    One Dask task per slide through :func:`wsi_mil.compute.dask_client`. When the cluster's workers
    advertise a ``GPU`` resource (``dask worker ... --resources "GPU=1"``, one worker per GPU, each with
    its own ``CUDA_VISIBLE_DEVICES``) every task asks for ``resources={"GPU": 1}``, so a GPU embeds one
    slide at a time; otherwise tasks are plain. Each worker builds the encoder once and keeps it. The
    output directory must be on a file system shared by the client and the workers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from wsi_mil.config import Config, FeaturesConfig
from wsi_mil.devices import resolve_device
from wsi_mil.encoders import Encoder, build_encoder, encoder_key
from wsi_mil.errors import SlideError, WsiMilError
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.stores import (
    FORMAT_VERSION,
    PARTIAL_TAG,
    PatchStore,
    atomic_output,
    clean_partials,
    open_patch_store,
    read_bag,
    read_bag_attrs,
    write_bag,
    write_text_atomic,
)

log = logging.getLogger(__name__)

Status = Literal["done", "skipped", "failed"]
_STORE_ONLY_ATTRS = ("format", "format_version", "complete", "wsi_mil_version")
STATUS_FILE = "extract_status.csv"


# --------------------------------------------------------------------------------------------- report
@dataclass
class SlideResult:
    """Outcome of one slide."""

    slide_id: str
    status: Status
    error: str = ""
    n_patches: int = 0
    bag: Path | None = None
    seconds: float = 0.0


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
        return self._with("done")

    @property
    def skipped(self) -> list[SlideResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[SlideResult]:
        return self._with("failed")

    @property
    def patches_embedded(self) -> int:
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
                 f"{len(self.skipped)} skipped, {len(self.failed)} failed; {self.patches_embedded} patches "
                 f"in {self.seconds:.1f} s ({rate:.1f} patches/s); bags in {self.features_dir}"]
        lines += [f"  failed {r.slide_id}: {r.error}" for r in self.failed]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- device
def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# ------------------------------------------------------------------------------------------- embedder
class Embedder:
    """Runs an encoder on uint8 patches [n, P, P, 3] on one device.

    Resizing and normalisation happen on the device; CUDA adds channels_last and autocast. A batch
    that runs out of memory is retried with half the batch size (kept for later batches), down to 1.
    """

    def __init__(self, encoder: Encoder, device: str | torch.device = "auto", *, batch_size: int = 64,
                 amp: bool = True) -> None:
        self.encoder = encoder
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        cuda = self.device.type == "cuda"
        self.channels_last = cuda
        self.amp_dtype: torch.dtype | None = None
        if cuda and amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.model = encoder.model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        mean = torch.tensor(encoder.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(encoder.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)

    @property
    def amp_name(self) -> str:
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype is not None else "none"

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on any device -> normalised float NCHW at the encoder's input size on ``self.device``."""
        x = patches.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        size = self.encoder.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x * self._scale + self._shift
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    @torch.inference_mode()
    def _forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(patches)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            y = self.model(x)
        if y.ndim != 2 or y.shape[1] != self.encoder.dim:
            raise SlideError(f"encoder {self.encoder.name} returned shape {tuple(y.shape)}, expected "
                             f"[n, {self.encoder.dim}]; choose a model that pools to a vector.")
        return y.float()

    def __call__(self, patches: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Features [n, D] float32, left on the device."""
        if isinstance(patches, np.ndarray):
            patches = torch.from_numpy(np.ascontiguousarray(patches))
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != torch.uint8:
            raise ValueError(f"patches must be uint8 [N, P, P, 3], got {patches.dtype} {tuple(patches.shape)}")
        parts: list[torch.Tensor] = []
        start = 0
        while start < patches.shape[0]:
            size = self.batch_size
            try:
                parts.append(self._forward(patches[start:start + size]))
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                _empty_cache(self.device)
                if size == 1:
                    raise SlideError(f"out of memory on {self.device} even for a single patch with encoder "
                                     f"{self.encoder.name}; use a smaller encoder or --device cpu.") from None
                self.batch_size = max(1, size // 2)
                log.warning("out of memory on %s with batch %d; retrying with batch %d", self.device, size,
                            self.batch_size)
                continue
            start += size
        if not parts:
            return torch.empty(0, self.encoder.dim, device=self.device)
        return torch.cat(parts)


def embed_patches(encoder: Encoder, patches: np.ndarray | torch.Tensor, device: str | torch.device = "auto",
                  *, batch_size: int = 64, amp: bool = True) -> np.ndarray:
    """Embed uint8 patches [N, P, P, 3] with exactly the transform the extractor uses: float32 [N, D]."""
    return Embedder(encoder, device, batch_size=batch_size, amp=amp)(patches).cpu().numpy()


# --------------------------------------------------------------------------------------------- reader
class PatchBlocks(Dataset):
    """One item = one block of consecutive patches of one slide: ``(slide_index, start, uint8 tensor, error)``.

    Stores are opened lazily in whichever process reads (never pickled open); a read error is returned
    as a message so that one corrupt chunk fails its slide, not the whole stream.
    """

    def __init__(self, stores: list[Path], blocks: list[tuple[int, int, int]]) -> None:
        self.stores = [str(s) for s in stores]
        self.blocks = blocks
        self._arrays: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def _array(self, slide: int) -> Any:
        if slide not in self._arrays:
            import zarr

            self._arrays = {slide: zarr.open_group(self.stores[slide], mode="r")["patches"]}  # one open at a time
        return self._arrays[slide]

    def __getitem__(self, index: int) -> tuple[int, int, torch.Tensor, str]:
        slide, start, stop = self.blocks[index]
        try:
            data = np.ascontiguousarray(self._array(slide)[start:stop])
            return slide, start, torch.from_numpy(data), ""
        except Exception as exc:
            return slide, start, torch.empty(0, dtype=torch.uint8), f"{exc.__class__.__name__}: {exc}"


def _blocks(n_patches: int, chunk: int, batch_size: int) -> list[tuple[int, int]]:
    """Chunk-aligned ranges covering ``n_patches``, each about ``batch_size`` patches (at least one chunk)."""
    step = chunk * max(1, round(batch_size / chunk))
    return [(s, min(s + step, n_patches)) for s in range(0, n_patches, step)]


_END = object()


def _thread_reader(dataset: PatchBlocks, depth: int, pin: bool) -> Iterator[tuple[int, int, torch.Tensor, str]]:
    """Read ``dataset`` in order in a background thread, ``depth`` items ahead."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for index in range(len(dataset)):
                if stop.is_set():
                    return
                slide, start, data, error = dataset[index]
                if pin and data.numel():
                    data = data.pin_memory()
                put((slide, start, data, error))
        finally:
            put(_END)

    thread = threading.Thread(target=work, name="wsi-mil-patch-reader", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _END:
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def _reader(dataset: PatchBlocks, device: torch.device, cfg: FeaturesConfig, processes: bool) -> Iterator[Any]:
    if processes and device.type != "cpu" and cfg.num_workers > 0 and len(dataset) > 1:
        loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", prefetch_factor=cfg.prefetch)
        return iter(loader)
    return _thread_reader(dataset, cfg.prefetch, pin=device.type == "cuda")


# ------------------------------------------------------------------------------------------ planning
@dataclass
class _Job:
    """One slide to embed."""

    slide_id: str
    store: Path
    bag: Path
    n_patches: int
    chunk: int
    attrs: dict[str, Any]
    parts: list[torch.Tensor] = field(default_factory=list)
    remaining: int = 0
    error: str = ""
    started: float = field(default_factory=time.perf_counter)


def store_signature(store: PatchStore) -> str:
    """A short hash of a patch store's attributes and shape: a re-tiled store gets a new signature."""
    attrs = {k: v for k, v in store.attrs.items() if k != "complete"}
    text = json.dumps(attrs, sort_keys=True, default=str) + str(tuple(store.patches.shape))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _clam_patch_size(attrs: dict[str, Any], patch_size: int) -> int:
    """CLAM's ``patch_size``: the patch side in pixels at ``patch_level``."""
    if attrs.get("read_size"):
        return int(attrs["read_size"])
    if attrs.get("patch_size_level0") and attrs.get("downsample"):
        return int(round(float(attrs["patch_size_level0"]) / float(attrs["downsample"])))
    return int(patch_size)


def _bag_attrs(store: PatchStore, slide_id: str, tiling: str, cfg: FeaturesConfig) -> dict[str, Any]:
    """Bag attributes that do not depend on the built encoder: the store's tiling attributes and ours."""
    attrs = {k: v for k, v in store.attrs.items() if k not in _STORE_ONLY_ATTRS}
    attrs.update(
        slide_id=slide_id,
        tiling_key=tiling,
        patch_store=str(store.path.resolve()),
        patch_store_signature=store_signature(store),
        patch_store_format_version=store.attrs.get("format_version"),
        n_patches=len(store),
        target_patch_size=store.patch_size,
        patch_level=int(store.attrs.get("level", 0) or 0),
        patch_size=_clam_patch_size(store.attrs, store.patch_size),
        encoder_key=encoder_key(cfg),
        precision=cfg.precision,
    )
    return attrs


def bag_is_current(bag: Path, expected: dict[str, Any]) -> bool:
    """True when ``bag`` is a finished bag made from the same store with the same encoder and precision."""
    if not bag.is_file():
        return False
    try:
        attrs = read_bag_attrs(bag)
    except Exception:
        return False
    keys = ("encoder_key", "patch_store_signature", "precision", "n_patches", "slide_id", "tiling_key")
    return attrs.get("format_version") == FORMAT_VERSION and all(attrs.get(k) == expected[k] for k in keys)


def _finished_bag(bag: Path, key: str, tiling: str) -> bool:
    """A readable bag of this encoder and tiling (used when its patch store is gone)."""
    try:
        attrs = read_bag_attrs(bag) if bag.is_file() else {}
    except Exception:
        return False
    return attrs.get("encoder_key") == key and attrs.get("tiling_key") == tiling


def pt_path(bag: Path) -> Path:
    """Where the optional ``.pt`` export of a bag goes (beside it)."""
    return bag.with_suffix(".pt")


def _write_pt(bag: Path, features: np.ndarray) -> None:
    with atomic_output(pt_path(bag)) as tmp, open(tmp, "wb") as fh:
        torch.save(torch.from_numpy(np.asarray(features, dtype=np.float32)), fh)


def _discover(layout: Layout, tiling: str, slide_ids: list[str] | None) -> list[str]:
    if slide_ids is not None:
        return list(dict.fromkeys(slide_ids))
    tiles = layout.tiles_dir(tiling)
    found = sorted(p.name[: -len(".zarr")] for p in tiles.glob("*.zarr")
                   if PARTIAL_TAG not in p.name and ".old-" not in p.name) if tiles.is_dir() else []
    if not found:
        raise WsiMilError(f"no patch stores under {tiles}; run `wsi-mil tile` first with the same tiling settings "
                          f"(tiling key {tiling}).")
    return found


def _plan(layout: Layout, tiling: str, cfg: Config, slide_ids: list[str]) -> tuple[list[_Job], list[SlideResult]]:
    """Split slides into jobs to run and finished results (skipped, or failed before any compute)."""
    key = encoder_key(cfg.features)
    jobs: list[_Job] = []
    results: list[SlideResult] = []
    for slide_id in slide_ids:
        bag = layout.bag(tiling, key, slide_id)
        store_path = layout.patch_store(tiling, slide_id)
        if not store_path.exists() and _finished_bag(bag, key, tiling):
            # patch stores are often deleted to save space once embedded: the bag is still valid
            results.append(SlideResult(slide_id, "skipped", bag=bag))
            continue
        try:
            store = open_patch_store(store_path)
        except WsiMilError as exc:
            results.append(SlideResult(slide_id, "failed", str(exc)))
            continue
        if len(store) == 0:
            results.append(SlideResult(slide_id, "failed", f"patch store {store.path} holds no patches; check the "
                                       "tissue and tiling settings and rerun `wsi-mil tile`."))
            continue
        attrs = _bag_attrs(store, slide_id, tiling, cfg.features)
        if bag_is_current(bag, attrs):
            if cfg.features.export_pt and not pt_path(bag).is_file():
                _write_pt(bag, read_bag(bag).features)
            results.append(SlideResult(slide_id, "skipped", n_patches=len(store), bag=bag))
            continue
        jobs.append(_Job(slide_id, store.path, bag, len(store), int(store.patches.chunks[0]), attrs))
    return jobs, results


# ------------------------------------------------------------------------------------------- running
def _finish(job: _Job, features: torch.Tensor | None, encoder_attrs: dict[str, Any],
            cfg: FeaturesConfig) -> SlideResult:
    """Check and write one slide's bag (runs in the writer thread)."""
    seconds = time.perf_counter() - job.started
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
            _write_pt(job.bag, values)
    except Exception as exc:  # disk full, permissions, unwritable attribute: this slide fails, others go on
        return SlideResult(job.slide_id, "failed", f"cannot write {job.bag} ({exc.__class__.__name__}: {exc}); "
                           "check free disk space and permissions, then rerun.", job.n_patches, None, seconds)
    log.info("embedded %s: %d patches in %.1f s", job.slide_id, job.n_patches, seconds)
    return SlideResult(job.slide_id, "done", "", job.n_patches, job.bag, seconds)


def run_jobs(jobs: list[_Job], embedder: Embedder, cfg: FeaturesConfig, *, strict: bool = False,
             processes: bool = True, progress: bool = True) -> list[SlideResult]:
    """Embed ``jobs`` through one read-ahead stream over all their blocks; returns their results in order."""
    blocks: list[tuple[int, int, int]] = []
    for index, job in enumerate(jobs):
        spans = _blocks(job.n_patches, job.chunk, cfg.batch_size)
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
    reader = _reader(dataset, embedder.device, cfg, processes)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-mil-bag-writer") as writer:
        try:
            for index, start, patches, error in reader:
                job = jobs[index]
                if job.remaining <= 0:  # slide already failed: drain its remaining blocks
                    continue
                if error:
                    job.error = f"cannot read patches {start}.. of {job.store} ({error}); rerun `wsi-mil tile` to redo it."
                else:
                    try:
                        job.parts.append(embedder(patches))
                    except SlideError as exc:
                        job.error = str(exc)
                    except RuntimeError as exc:
                        job.error = f"encoder failed on {job.store}: {exc.__class__.__name__}: {str(exc)[:300]}"
                    bar.update(len(patches))
                job.remaining -= 1
                if job.error or job.remaining == 0:
                    features = None if job.error else torch.cat(job.parts).cpu()
                    job.parts, job.remaining = [], 0
                    pending[index] = writer.submit(_finish, job, features, encoder_attrs, cfg)
                collect(block=False)
            collect(block=True)
        finally:
            for name in ("close", "_shutdown_workers"):  # generator / DataLoader iterator
                stop = getattr(reader, name, None)
                if stop is not None:
                    stop()
            bar.close()
    return [results[i] for i in range(len(jobs))]


# --------------------------------------------------------------------------------------------- cohort
def extract_cohort(out: Path, cfg: Config, *, tiling: str | None = None, strict: bool = False,
                   slide_ids: list[str] | None = None, progress: bool = True) -> ExtractReport:
    """Embed every patch store of ``OUT/tiles/<tiling>/`` (or only ``slide_ids``) into HDF5 bags.

    ``tiling`` defaults to the key of ``cfg``'s tiling settings. Finished, matching bags are skipped;
    slides that fail (missing/incomplete store, unreadable chunk, NaN/inf features, out of memory at
    batch 1) are recorded with their error while the others carry on, unless ``strict``, where the first
    failure raises. With ``cfg.compute.scheduler`` set, slides are spread over that Dask cluster (see
    the module docstring). The per-slide status is also written to ``<features dir>/extract_status.csv``.
    """
    started = time.perf_counter()
    layout = Layout(Path(out))
    tiling = tiling or tiling_key(cfg)
    key = encoder_key(cfg.features)
    features_dir = layout.features_dir(tiling, key)
    ids = _discover(layout, tiling, slide_ids)
    removed = clean_partials(features_dir)
    if removed:
        log.info("removed %d leftovers of interrupted writes in %s", removed, features_dir)
    jobs, finished = _plan(layout, tiling, cfg, ids)
    if strict and any(r.status == "failed" for r in finished):
        first = next(r for r in finished if r.status == "failed")
        raise SlideError(f"slide {first.slide_id}: {first.error}")
    if cfg.compute.scheduler:  # the workers resolve their own device
        device_name = "dask:" + cfg.compute.scheduler
        if jobs:
            features_dir.mkdir(parents=True, exist_ok=True)
            finished += _run_dask(Path(out), cfg, tiling, jobs, strict)
    else:
        device = resolve_device(cfg.features.device)
        device_name = device.type
        if jobs:
            features_dir.mkdir(parents=True, exist_ok=True)
            encoder = build_encoder(cfg.features)
            embedder = Embedder(encoder, device, batch_size=cfg.features.batch_size, amp=cfg.features.amp)
            finished += run_jobs(jobs, embedder, cfg.features, strict=strict, progress=progress)
    order = {sid: i for i, sid in enumerate(ids)}
    finished.sort(key=lambda r: order[r.slide_id])
    report = ExtractReport(tiling, key, features_dir, device_name, finished, time.perf_counter() - started)
    if features_dir.is_dir():
        _write_status(features_dir / STATUS_FILE, report)
    for result in report.failed:
        log.warning("slide %s failed: %s", result.slide_id, result.error)
    return report


def _write_status(path: Path, report: ExtractReport) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["slide_id", "status", "n_patches", "seconds", "error"])
    for r in report.results:
        writer.writerow([r.slide_id, r.status, r.n_patches, f"{r.seconds:.2f}", r.error])
    write_text_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------- dask
@functools.lru_cache(maxsize=2)
def _worker_embedder(features_json: str) -> Embedder:
    """One encoder per worker process and feature settings, built on first use and kept."""
    cfg = FeaturesConfig.model_validate_json(features_json)
    return Embedder(build_encoder(cfg), cfg.device, batch_size=cfg.batch_size, amp=cfg.amp)


def extract_slide_task(out: str, cfg: Config, tiling: str, slide_id: str) -> SlideResult:
    """Dask task: embed one slide on the worker's device (the encoder is cached per worker)."""
    jobs, finished = _plan(Layout(Path(out)), tiling, cfg, [slide_id])
    if finished:
        return finished[0]
    try:
        embedder = _worker_embedder(cfg.features.model_dump_json())
    except WsiMilError as exc:
        return SlideResult(slide_id, "failed", str(exc))
    return run_jobs(jobs, embedder, cfg.features, processes=False, progress=False)[0]


def _run_dask(out: Path, cfg: Config, tiling: str, jobs: list[_Job], strict: bool) -> list[SlideResult]:
    import distributed

    from wsi_mil.compute import dask_client

    results: list[SlideResult] = []
    with dask_client(cfg.compute) as client:
        workers = client.scheduler_info().get("workers", {}).values()
        gpu = any((w.get("resources") or {}).get("GPU") for w in workers)
        resources = {"GPU": 1} if gpu else None
        log.info("extracting %d slides on Dask cluster %s%s", len(jobs), cfg.compute.scheduler,
                 " (one GPU per task)" if gpu else "")
        futures = {client.submit(extract_slide_task, str(out), cfg, tiling, job.slide_id, resources=resources,
                                 pure=False, key=f"extract-{job.slide_id}-{time.time_ns()}"): job.slide_id
                   for job in jobs}
        for future in tqdm(distributed.as_completed(futures, loop=client.loop), total=len(futures), unit="slide", desc="extract",
                           disable=None, leave=False):
            slide_id = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # a worker died or the task raised
                result = SlideResult(slide_id, "failed", f"Dask task failed ({exc.__class__.__name__}: {exc})")
            results.append(result)
            if strict and result.status == "failed":
                client.cancel(list(futures))
                raise SlideError(f"slide {result.slide_id}: {result.error}")
    return results
