"""GPU check: the extractor, its out-of-memory retry, MIL training and device parity, on one device, one command.

Every part runs the project's own code: patch stores written with :mod:`wsi_mil.stores` (zstd, 64
patches per chunk, as the tiler writes them), :func:`wsi_mil.extract.extract_cohort` (reader,
embedder, HDF5 writer), :func:`wsi_mil.mil.methods.build_method` and :func:`wsi_mil.mil.fit.fit` with
the trainer's presets (``configs/camelyon16_*.yaml``). Random encoder weights: nothing is downloaded.
Sizes below are the GPU ones (``GPU_SIZES``).

1. **Extract ratio.** For a CNN (``resnet50_trunc``) and a ViT-B/16 (timm ``vit_base_patch16_224``),
   fp32 and AMP, batch 256 on the same device: the encoder's forward pass alone on random input
   tensors (``forward_only`` of ``benchmarks/extract.py``) vs ``extract_cohort`` on stores of 2048
   patches of 256 px, as many stores (2 to 8) as take about 6 s of forward compute.
   ``extract_ratio_<prec>_<cnn|vit>`` = the whole call's patches/s (encoder build, reader start, HDF5
   writes included) over forward-only patches/s; ``extract_steady_ratio_*`` leaves the fixed cost out:
   the full call's extra patches over a one-store call, per extra second. Median of 2 back-to-back
   pairs. The reader uses ``--workers`` DataLoader processes (``features.num_workers``, default 2);
   ``extract_reader_patches_per_s`` is that reader alone over all stores (read, copy to the device),
   to tell an I/O limit from a compute one.
2. **Out of memory.** On CUDA: store 0 (2048 patches) as one batch of the CNN in fp32, with device
   memory filled by a ballast tensor up to ``--oom-headroom-gib`` GiB free: the extractor must hit real
   CUDA OOMs (counted by the caching allocator), halve its batch until it fits and write the same
   features as a normal run at batch 256 (TF32 off for both). On other devices: reported as skipped.
3. **MIL training.** Two epochs each (``fit``, early stopping off) of ABMIL, TransMIL, MHIM(ABMIL),
   MHIM(TransMIL) and INS on CAMELYON16-sized bags: ``--bags`` (270, as C16's training slides) bags of
   ``--min-n`` .. ``--max-n`` (3000-15000, uniform, mean 9000) 1024-d instances and 16 validation bags.
   Bags stay on the host and move to the device when used, like the trainer's bag list. MHIM's
   teacher is an untrained model of its student (a trained one costs the same). INS sees 100 000
   instances per epoch (``model.ins.max_instances_per_epoch``; a full epoch costs proportionally more).
   s/epoch is the second (warm) epoch's ``train_epoch``; peak memory is
   ``torch.cuda.max_memory_allocated`` above the memory in use before the method was built (on the
   CPU: the peak RSS above the start, sampled every 5 ms).
4. **Device parity.** The first 64 patches of store 0 embedded on the CPU in fp32
   (:func:`wsi_mil.extract.embed_patches`) vs the bags part 1 wrote on the device (fp32 and AMP): max
   abs difference. On the CPU this compares the extractor's stream (reader, batches, HDF5) with the
   direct embedding of the same patches: a path check, not a device comparison.

Without CUDA (or with ``--small``) the same code runs with small sizes (``SMALL_SIZES``): ``tiny_cnn``
and timm's ``test_vit``, 3 stores of 16 patches, 8 bags of 32-96 instances (about 30 s on 2 cores).
No new work starts once ``--budget-s`` is spent (what is left is reported as skipped). Output: one
table per part, each followed by its ``RESULT name value`` lines (``n/a`` or ``skipped`` where a
number does not apply; a part that fails prints its traceback and ``RESULT part<N>_failed 1``, and the
others still run).

    python benchmarks/gpu_check.py --device cuda          # about 5 minutes on one H200
    python benchmarks/gpu_check.py --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract import forward_only, write_stores  # noqa: E402  (benchmarks/extract.py, beside this file)

from wsi_mil.config import Config, FeaturesConfig, load_config  # noqa: E402
from wsi_mil.devices import resolve_device  # noqa: E402
from wsi_mil.encoders import build_encoder, encoder_key  # noqa: E402
from wsi_mil.extract import Embedder, embed_patches, extract_cohort  # noqa: E402
from wsi_mil.extract.cohort import ExtractReport  # noqa: E402
from wsi_mil.extract.reader import PatchBlocks, block_spans, open_reader  # noqa: E402
from wsi_mil.layout import Layout, tiling_key  # noqa: E402
from wsi_mil.mil.base import BagItem, FoldContext, FoldExtras  # noqa: E402
from wsi_mil.mil.fit import fit  # noqa: E402
from wsi_mil.mil.methods import build_method, seed_everything  # noqa: E402
from wsi_mil.mil.models import build_model  # noqa: E402
from wsi_mil.stores import open_patch_store, read_bag  # noqa: E402

IN_DIM = 1024  # resnet50_trunc features, as in the MHIM-MIL paper
METHODS = [  # (result name, preset); each preset is the trainer's CAMELYON16 configuration
    ("abmil", "camelyon16_abmil.yaml"),
    ("transmil", "camelyon16_transmil.yaml"),
    ("mhim_abmil", "camelyon16_mhim_abmil.yaml"),
    ("mhim_transmil", "camelyon16_mhim_transmil.yaml"),
    ("ins", "camelyon16_ins.yaml"),
]


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the small (CPU) run."""

    cnn: str
    vit: str
    slides: int  # patch stores
    per_slide: int  # patches per store
    batch: int  # extraction batch
    extract_seconds: float  # forward compute aimed at per extract measurement (0: all stores)
    repeats: int
    parity_patches: int
    bags: int
    val_bags: int
    min_n: int
    max_n: int
    ins_instances: int


GPU_SIZES = Sizes("resnet50_trunc", "vit_base_patch16_224", 8, 2048, 256, 6.0, 2, 64, 270, 16, 3000, 15000, 100_000)
SMALL_SIZES = Sizes("tiny_cnn", "test_vit", 3, 16, 8, 0.0, 1, 8, 8, 4, 32, 96, 256)


class Results:
    """RESULT lines of a part, printed after its table (so that a run cut short keeps what it measured)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def add(self, name: str, value: float | str) -> None:
        text = value if isinstance(value, str) else ("nan" if math.isnan(value) else f"{value:.4g}")
        self.lines.append((name, text))

    def flush(self) -> None:
        for name, value in self.lines:
            print(f"RESULT {name} {value}")
        self.lines.clear()
        sys.stdout.flush()


class Clock:
    """The time budget: parts check it before starting new work."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self, reserve_s: float = 0.0) -> bool:
        return self.elapsed() > self.budget_s - reserve_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


# ------------------------------------------------------------------------------------------ 1 extract
def features_config(encoder: str, device: torch.device, *, amp: bool, batch: int, workers: int) -> Config:
    cfg = Config()
    cfg.features = FeaturesConfig(encoder=encoder, weights="random", batch_size=batch, device=device.type, amp=amp,
                                  num_workers=workers)
    return cfg


def clear_bags(root: Path, cfg: Config) -> None:
    """Remove the bags of ``cfg``'s encoder: neither AMP nor the batch size changes their folder, and
    ``extract_cohort`` would skip them as finished."""
    shutil.rmtree(Layout(root).features_dir(tiling_key(cfg), encoder_key(cfg.features)), ignore_errors=True)


def run_extract(root: Path, cfg: Config, slide_ids: list[str]) -> tuple[float, ExtractReport]:
    """``extract_cohort`` on ``slide_ids`` from scratch: seconds, report (an error when a slide fails)."""
    clear_bags(root, cfg)
    start = time.perf_counter()
    report = extract_cohort(root, cfg, slide_ids=slide_ids, progress=False)
    seconds = time.perf_counter() - start
    if report.failed or len(report.done) != len(slide_ids):
        raise RuntimeError(report.summary())
    return seconds, report


def measure_pair(root: Path, ids: list[str], cfg: Config, embedder: Embedder, sizes: Sizes,
                 rep: int) -> tuple[float, float, float, np.ndarray]:
    """Forward-only and extract patches/s on the stores ``ids`` (order alternating with ``rep``), and
    extract's steady patches/s (beyond a one-store call); with store 0's first parity features."""
    n_all, n_one = len(ids) * sizes.per_slide, sizes.per_slide
    t_fwd = t_all = 0.0
    for side in ("forward", "extract") if rep % 2 == 0 else ("extract", "forward"):
        if side == "forward":
            t_fwd = forward_only(embedder, n_all, sizes.batch)
        else:
            t_all = run_extract(root, cfg, ids)[0]
            bag = Layout(root).bag(tiling_key(cfg), encoder_key(cfg.features), ids[0])  # still in place
            first = read_bag(bag).features[: sizes.parity_patches].astype(np.float32)
    t_one = run_extract(root, cfg, ids[:1])[0]
    steady = (n_all - n_one) / (t_all - t_one) if t_all > t_one else float("nan")
    return n_all / t_fwd, n_all / t_all, steady, first


def reader_only(root: Path, ids: list[str], cfg: Config, device: torch.device) -> float:
    """Patches/s of the extractor's reader alone (blocks as ``run_jobs`` cuts them, copied to the device)."""
    layout, tiling = Layout(root), tiling_key(cfg)
    paths = [layout.patch_store(tiling, slide_id) for slide_id in ids]
    blocks = []
    for index, path in enumerate(paths):
        store = open_patch_store(path)
        spans = block_spans(len(store), int(store.patches.chunks[0]), cfg.features.batch_size)
        blocks += [(index, start, stop) for start, stop in spans]
    start, n = time.perf_counter(), 0
    for _, _, patches, error in open_reader(PatchBlocks(paths, blocks), device, cfg.features, processes=True):
        if error:
            raise RuntimeError(error)
        patches.to(device, non_blocking=True)
        n += len(patches)
    sync(device)
    return n / (time.perf_counter() - start)


def part_extract(root: Path, ids: list[str], sizes: Sizes, device: torch.device, args: argparse.Namespace,
                 clock: Clock, results: Results) -> dict[tuple[str, str], np.ndarray]:
    """Part 1; returns the first parity patches' features of store 0 per (encoder role, precision)."""
    reader = f"{args.workers} DataLoader workers" if device.type != "cpu" and args.workers else "a reader thread"
    print(f"\n(1) extract vs forward alone, batch {sizes.batch}, {sizes.per_slide} patches of 256 px per store, "
          f"{reader}, median of {sizes.repeats}")
    print(f"{'encoder':<24}{'prec':>6}{'patches':>9}{'fwd p/s':>10}{'extract p/s':>13}{'ratio':>7}"
          f"{'steady p/s':>12}{'steady':>8}")
    parity: dict[tuple[str, str], np.ndarray] = {}
    read = reader_only(root, ids, features_config(sizes.cnn, device, amp=False, batch=sizes.batch,
                                                  workers=args.workers), device)
    print(f"{'reader alone':<30}{len(ids) * sizes.per_slide:>9}{'':>10}{read:>13.1f}   (read + copy to the device)")
    results.add("extract_reader_patches_per_s", read)
    for role, name in (("cnn", sizes.cnn), ("vit", sizes.vit)):
        for prec in ("amp", "fp32"):  # AMP first: its ratio is the goal, should the budget run out
            keys = (f"extract_ratio_{prec}_{role}", f"extract_steady_ratio_{prec}_{role}")
            if prec == "amp" and device.type != "cuda":
                print(f"{name:<24}{prec:>6}  n/a: the extractor uses autocast on CUDA only")
                for key in keys:
                    results.add(key, "n/a")
                continue
            if clock.spent(reserve_s=150):  # leave parts 2-4 about 150 s
                print(f"{name:<24}{prec:>6}  skipped: time budget spent")
                for key in keys:
                    results.add(key, "skipped")
                continue
            cfg = features_config(name, device, amp=prec == "amp", batch=sizes.batch, workers=args.workers)
            embedder = Embedder(build_encoder(cfg.features), device, batch_size=sizes.batch, amp=cfg.features.amp)
            forward_only(embedder, 2 * sizes.batch, sizes.batch)  # warm-up (cudnn autotuning, threads)
            n_stores = len(ids)
            if sizes.extract_seconds > 0:  # as many stores as take about extract_seconds of forward compute
                probe = 4 * sizes.batch
                rate = probe / forward_only(embedder, probe, sizes.batch)
                n_stores = min(len(ids), max(2, math.ceil(rate * sizes.extract_seconds / sizes.per_slide)))
            rows = [measure_pair(root, ids[:n_stores], cfg, embedder, sizes, rep) for rep in range(sizes.repeats)]
            parity[(role, prec)] = rows[0][3]
            n_all = n_stores * sizes.per_slide
            fwd, e2e, steady = (statistics.median(r[i] for r in rows) for i in range(3))
            whole = statistics.median(r[1] / r[0] for r in rows)
            steady_ratio = statistics.median(r[2] / r[0] for r in rows)
            print(f"{name:<24}{prec:>6}{n_all:>9}{fwd:>10.1f}{e2e:>13.1f}{whole:>7.3f}{steady:>12.1f}{steady_ratio:>8.3f}")
            results.add(keys[0], whole)
            results.add(keys[1], steady_ratio)
            del embedder
            free_device(device)
    return parity


# ---------------------------------------------------------------------------------------------- 2 OOM
class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def captured(logger_name: str) -> Iterator[list[str]]:
    """Warnings of one logger while the block runs (also when the root logger is set above WARNING)."""
    handler = _Messages()
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def part_oom(root: Path, ids: list[str], sizes: Sizes, device: torch.device, args: argparse.Namespace,
             results: Results) -> None:
    """Part 2: a real CUDA OOM on an oversized batch, recovered by the embedder's retry path."""
    print(f"\n(2) out-of-memory retry, {sizes.cnn} fp32, {sizes.per_slide} patches in one batch")
    if device.type != "cuda":
        print(f"skipped: no CUDA device ({device.type}); on the CPU an oversized batch meets the OS's "
              "out-of-memory killer, not the retry path")
        results.add("oom_recovered", "skipped")
        results.add("oom_feature_maxdiff", "skipped")
        return
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # both runs in true fp32: a different batch may pick another kernel
    ballast = None
    try:
        normal = features_config(sizes.cnn, device, amp=False, batch=sizes.batch, workers=args.workers)
        _, report = run_extract(root, normal, ids[:1])
        reference = read_bag(report.results[0].output).features
        oversized = features_config(sizes.cnn, device, amp=False, batch=sizes.per_slide, workers=args.workers)
        clear_bags(root, oversized)
        free_device(device)
        free, total = torch.cuda.mem_get_info(device)
        headroom = int(args.oom_headroom_gib * 2**30)
        ballast = torch.empty(max(0, free - headroom), dtype=torch.uint8, device=device)
        ooms_before = torch.cuda.memory_stats(device).get("num_ooms", 0)
        with captured("wsi_mil.extract.embedder") as warnings:
            report = extract_cohort(root, oversized, slide_ids=ids[:1], progress=False)
        ooms = torch.cuda.memory_stats(device).get("num_ooms", 0) - ooms_before
    finally:
        del ballast
        free_device(device)
        torch.backends.cudnn.allow_tf32 = tf32
    result = report.results[0]
    retries = [m for m in warnings if "out of memory" in m]
    print(f"device {total / 2**30:.0f} GiB, left free {args.oom_headroom_gib:g} GiB; allocator OOMs {ooms}; "
          f"retries {len(retries)}; slide {result.status} {result.error}")
    for message in retries:
        print(f"  {message}")
    if result.status != "done":
        results.add("oom_recovered", 0)
        results.add("oom_feature_maxdiff", "nan")
        return
    features = read_bag(result.output).features
    diff = float(np.abs(features - reference).max())
    scale = float(np.abs(reference).max())
    print(f"features vs batch {sizes.batch} without ballast: max abs diff {diff:.3g} (max |feature| {scale:.3g})")
    recovered = ooms > 0 and bool(retries) and diff <= 1e-3 * max(scale, 1.0)
    results.add("oom_recovered", int(recovered))
    results.add("oom_feature_maxdiff", diff)


# --------------------------------------------------------------------------------------------- 3 MIL
class HostBags(Sequence[BagItem]):
    """Bags kept on the host and moved to the device when used, like the trainer's cached bag list."""

    def __init__(self, prefix: str, features: list[torch.Tensor], labels: list[int], device: torch.device) -> None:
        self.prefix, self.features, self.labels, self.device = prefix, features, labels, device

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return BagItem(f"{self.prefix}{index}", self.features[index].to(self.device, non_blocking=True), self.labels[index])


def make_bags(prefix: str, n_bags: int, min_n: int, max_n: int, device: torch.device, seed: int) -> HostBags:
    """N(0, 1) features [n, 1024] (generated on the device, kept on the host); odd bags hold a shifted cluster."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    features, labels = [], []
    for i in range(n_bags):
        n = int(rng.integers(min_n, max_n + 1))
        x = torch.randn(n, IN_DIM, generator=gen, device=device)
        if i % 2:
            x[: max(1, n // 50), :16] += 2.0
        features.append(x.cpu())
        labels.append(i % 2)
    return HostBags(prefix, features, labels, device)


class EpochTimer:
    """A method, its ``train_epoch`` timed (device synchronised); everything else passes through."""

    def __init__(self, method: Any, device: torch.device) -> None:
        self.method, self.device, self.seconds = method, device, []

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        sync(self.device)
        start = time.perf_counter()
        out = self.method.train_epoch(epoch, num_epochs)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)


class PeakMemory:
    """Peak memory (MB) of a block above what was in use when it began: CUDA allocations, else sampled RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            process = psutil.Process()
            self._start = process.memory_info().rss
            self._peak = self._start
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, process.memory_info().rss)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        self.mb = max(0, peak - self._start) / 2**20


def two_epochs(preset: str, train: HostBags, val: HostBags, sizes: Sizes, device: torch.device,
               label: str) -> tuple[list[float], float]:
    """Build the preset's method and ``fit`` it for two epochs: seconds of each epoch, peak memory (MB)."""
    cfg = load_config(ROOT / "configs" / preset, {
        "training.epochs": 2, "training.min_epochs": 2, "training.progress": False,
        "model.ins.max_instances_per_epoch": sizes.ins_instances,
    })
    seed_everything(0)
    extras = FoldExtras(config=cfg, train_baseline=lambda student: build_model(
        student, IN_DIM, 2, cfg.model).to(device).eval())
    ctx = FoldContext(0, 0, train, val, 2, IN_DIM, device, extras=extras)
    try:
        with PeakMemory(device) as peak:
            method = build_method(cfg, ctx)
            method.setup(ctx)
            timer = EpochTimer(method, device)
            outcome = fit(timer, ctx, cfg.training, progress=False, desc=label)  # type: ignore[arg-type]
    finally:
        free_device(device)
    if outcome.epochs_run != 2:
        raise RuntimeError(f"fit ran {outcome.epochs_run} epochs, not 2")
    return timer.seconds, peak.mb


def part_mil(sizes: Sizes, device: torch.device, clock: Clock, results: Results) -> None:
    """Part 3: two epochs of each method through ``build_method`` and ``fit``."""
    start = time.perf_counter()
    train = make_bags("train", sizes.bags, sizes.min_n, sizes.max_n, device, seed=0)
    val = make_bags("val", sizes.val_bags, sizes.min_n, sizes.max_n, device, seed=1)
    n_inst = sum(len(f) for f in train.features)
    memory = "peak MB (CUDA allocated)" if device.type == "cuda" else "peak RSS MB (sampled)"
    print(f"\n(3) MIL, {len(train)} training bags of {sizes.min_n}-{sizes.max_n} x {IN_DIM}-d "
          f"({n_inst} instances, mean {n_inst / len(train):.0f}), {len(val)} validation bags, "
          f"2 epochs; INS {sizes.ins_instances} instances/epoch; bags made in {time.perf_counter() - start:.1f} s")
    print(f"{'method':<16}{'epoch 1 s':>10}{'epoch 2 s':>10}{memory:>26}")
    seconds: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for name, preset in METHODS:
        seconds[name] = peaks[name] = float("nan")
        if clock.spent(reserve_s=20):
            print(f"{name:<16}  skipped: time budget spent")
            continue
        try:
            epochs, peaks[name] = two_epochs(preset, train, val, sizes, device, name)
        except Exception as exc:  # one method failing must not hide the others
            traceback.print_exc()
            print(f"{name:<16}  FAILED: {exc.__class__.__name__}: {str(exc)[:300]}")
            results.add(f"mil_{name}_failed", 1)
            continue
        seconds[name] = epochs[-1]
        print(f"{name:<16}{epochs[0]:>10.3f}{epochs[1]:>10.3f}{peaks[name]:>26.1f}")
    for name, _ in METHODS:
        results.add(f"mil_s_per_epoch_{name}", seconds[name])
        results.add(f"mil_peak_mb_{name}", peaks[name])
    for student in ("abmil", "transmil"):
        results.add(f"mhim_{student}_time_ratio", ratio(seconds[f"mhim_{student}"], seconds[student]))
        if device.type == "cuda":
            results.add(f"mhim_{student}_memory_ratio", ratio(peaks[f"mhim_{student}"], peaks[student]))
        else:  # the RSS of tiny bags is allocator noise, not the method's memory
            results.add(f"mhim_{student}_memory_ratio", "n/a")


# ------------------------------------------------------------------------------------------ 4 parity
def part_parity(root: Path, ids: list[str], sizes: Sizes, device: torch.device,
                parity: dict[tuple[str, str], np.ndarray], results: Results) -> None:
    """Part 4: the device's bags (part 1) vs the same patches embedded on the CPU in fp32."""
    what = ("device bag vs CPU fp32" if device.type != "cpu"
            else "extractor's bag vs direct embedding, both CPU: a path check, not a device comparison")
    print(f"\n(4) features, first {sizes.parity_patches} patches of {ids[0]}: {what}")
    print(f"{'encoder':<24}{'prec':>6}{'max abs diff':>14}{'max |feature|':>15}{'relative':>10}")
    cfg = Config()
    patches = np.asarray(open_patch_store(Layout(root).patch_store(tiling_key(cfg), ids[0])).patches[: sizes.parity_patches])
    for role, name in (("cnn", sizes.cnn), ("vit", sizes.vit)):
        reference = None
        for prec in ("fp32", "amp"):
            key = f"features_vs_cpu_maxdiff_{prec}_{role}"
            if (role, prec) not in parity:
                reason = "n/a: no autocast on the CPU" if prec == "amp" and device.type != "cuda" else "skipped: no bag"
                print(f"{name:<24}{prec:>6}  {reason}")
                results.add(key, reason.split(":")[0])
                continue
            if reference is None:
                encoder = build_encoder(features_config(name, torch.device("cpu"), amp=False, batch=sizes.batch,
                                                        workers=0).features)
                reference = embed_patches(encoder, patches, "cpu", batch_size=sizes.batch, amp=False)
            diff = float(np.abs(parity[(role, prec)] - reference).max())
            scale = float(np.abs(reference).max())
            print(f"{name:<24}{prec:>6}{diff:>14.3g}{scale:>15.3g}{ratio(diff, scale):>10.2g}")
            results.add(key, diff)


# ---------------------------------------------------------------------------------------------- main
def guarded(part: str, results: Results, run: Callable[[], Any]) -> Any:
    """Run one part; a failure is printed and recorded, and the other parts still run."""
    start = time.perf_counter()
    try:
        return run()
    except Exception as exc:
        traceback.print_exc()
        print(f"part {part} FAILED: {exc.__class__.__name__}: {str(exc)[:500]}")
        results.add(f"part{part}_failed", 1)
        return None
    finally:
        print(f"part {part}: {time.perf_counter() - start:.1f} s")
        results.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda or cpu.")
    parser.add_argument("--small", action="store_true", help="Small sizes (always on without CUDA).")
    parser.add_argument("--budget-s", type=float, default=420.0, help="Start no new work after this many seconds.")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default).")
    parser.add_argument("--workers", type=int, default=FeaturesConfig().num_workers,
                        help="DataLoader reader workers of the extractor on a GPU (features.num_workers).")
    parser.add_argument("--repeats", type=int, default=None, help="Extract measurement pairs (GPU 2, small 1).")
    parser.add_argument("--bags", type=int, default=None, help="Training bags (GPU 270, small 8).")
    parser.add_argument("--min-n", type=int, default=None, help="Smallest bag (GPU 3000, small 32).")
    parser.add_argument("--max-n", type=int, default=None, help="Largest bag (GPU 15000, small 96).")
    parser.add_argument("--oom-headroom-gib", type=float, default=3.0,
                        help="Device memory left free by the ballast in part 2.")
    parser.add_argument("--tmp", type=Path, default=None, help="Where the patch stores and bags go (deleted after).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    device = resolve_device(args.device)
    small = args.small or device.type != "cuda"
    sizes = SMALL_SIZES if small else GPU_SIZES
    overrides = {"repeats": args.repeats, "bags": args.bags, "min_n": args.min_n, "max_n": args.max_n}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").is_dir() else float("nan")
    print(f"GPU check on {device.type} ({name}), {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), /dev/shm {shm:.1f} GiB (DataLoader workers pass patches "
          f"through it), sizes: {'small' if small else 'GPU'} {sizes}")
    results = Results()
    root = Path(tempfile.mkdtemp(prefix="wsi-mil-gpu-check-", dir=args.tmp))
    try:
        start = time.perf_counter()
        ids = write_stores(root, Config(), sizes.slides * sizes.per_slide, sizes.slides)
        print(f"{len(ids)} patch stores of {sizes.per_slide} patches written in {time.perf_counter() - start:.1f} s")
        parity = guarded("1", results, lambda: part_extract(root, ids, sizes, device, args, clock, results)) or {}
        guarded("2", results, lambda: part_oom(root, ids, sizes, device, args, results))
        guarded("3", results, lambda: part_mil(sizes, device, clock, results))
        guarded("4", results, lambda: part_parity(root, ids, sizes, device, parity, results))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    results.add("gpu_check_seconds", clock.elapsed())
    results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
