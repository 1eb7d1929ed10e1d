"""Embedding throughput: `wsi-mil extract` end to end vs the encoder's forward pass alone.

Writes ``--slides`` patch stores holding ``--patches`` 256 px patches in all (random texture, zstd, 64
patches per chunk, as the tiler writes them) to a temporary output directory, then alternates, on the
same device and with the same threads:

* forward only: the encoder (``resnet50_trunc``, random weights) on a random float tensor of the batch
  shape ``[B, 3, 224, 224]``, already on the device, under ``torch.inference_mode`` (and autocast /
  channels_last on CUDA, like the extractor), for the same number of patches;
* end to end: :func:`wsi_mil.extract.extract_cohort` on the stores (reading + decoding Zarr chunks,
  resize 256 -> 224 + normalisation on the device, forward, NaN check, HDF5 writes), timed as a whole,
  including building the encoder, planning and writing the bags.

Median of ``--repeats`` back-to-back pairs; the median per-pair ratio (goal >= 0.9: I/O hidden behind compute) is the last line:

    python benchmarks/extract.py [--device auto|cpu|cuda] [--patches 768] [--batch-size 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_mil import stores
from wsi_mil.config import Config, FeaturesConfig
from wsi_mil.devices import resolve_device
from wsi_mil.encoders import build_encoder
from wsi_mil.extract import Embedder, extract_cohort
from wsi_mil.layout import Layout, tiling_key


def texture_patches(rng: np.random.Generator, n: int, patch: int = 256) -> np.ndarray:
    """``n`` patches [n, P, P, 3] uint8 of smooth random texture (compresses like tissue, not like noise)."""
    coarse = rng.integers(90, 230, (n, patch // 8, patch // 8, 3), dtype=np.uint8)
    block = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    return np.clip(block.astype(np.int16) + rng.integers(-12, 12, block.shape), 0, 255).astype(np.uint8)


def write_stores(out: Path, cfg: Config, n_total: int, n_slides: int, patch: int = 256, seed: int = 0) -> list[str]:
    """Patch stores of texture patches, split over ``n_slides`` stores; returns their slide ids.

    Patches are drawn at random from a pool of (at most) 256 distinct ones, so that writing a large
    cohort costs the Zarr compression only; each chunk still holds different patches.
    """
    rng = np.random.default_rng(seed)
    pool = texture_patches(rng, min(n_total, 256), patch)
    layout, tiling = Layout(out), tiling_key(cfg)
    layout.tiles_dir(tiling).mkdir(parents=True, exist_ok=True)
    sizes = [n_total // n_slides + (1 if i < n_total % n_slides else 0) for i in range(n_slides)]
    slab = cfg.tiling.chunk_patches * 16  # several chunks per write: Zarr compresses them concurrently
    ids = []
    for i, n in enumerate(sizes):
        slide_id = f"slide{i}"
        final = layout.patch_store(tiling, slide_id)
        tmp = stores.partial_path(final)
        group = stores.create_patch_store(tmp, n_patches=n, patch_size=patch, chunk_patches=cfg.tiling.chunk_patches,
                                          codec=cfg.tiling.codec, level=cfg.tiling.compression_level,
                                          attrs={"slide_id": slide_id, "target_mpp": 0.5, "mpp_level0": 0.25})
        for start in range(0, n, slab):
            stop = min(n, start + slab)
            group["patches"][start:stop] = pool[rng.integers(0, len(pool), stop - start)]
        group["coords"][:] = np.stack([np.arange(n) * 512, np.full(n, i)], axis=1)
        stores.mark_complete(tmp)
        stores.commit(tmp, final)
        ids.append(slide_id)
    return ids


def forward_only(embedder: Embedder, n: int, batch: int) -> float:
    """Seconds for the encoder alone on ``n`` random inputs of the batch shape, on the device."""
    size = embedder.encoder.input_size
    x = torch.randn(batch, 3, size, size, device=embedder.device)
    if embedder.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = embedder.amp_dtype
    sync = torch.cuda.synchronize if embedder.device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(embedder.device.type, dtype=amp or torch.float32,
                                                 enabled=amp is not None):
        embedder.model(x)  # warm-up
        sync()
        start = time.perf_counter()
        done = 0
        while done < n:
            embedder.model(x[: min(batch, n - done)]).float()
            done += min(batch, n - done)
        sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--patches", type=int, default=768, help="Patches in all stores together.")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (GPU only; CPU uses a thread).")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    cfg = Config()
    cfg.features = FeaturesConfig(encoder="resnet50_trunc", weights="random", batch_size=args.batch_size,
                                  device=device.type, num_workers=args.workers)
    root = Path(tempfile.mkdtemp(prefix="wsi-mil-bench-extract-"))
    try:
        write_stores(root, cfg, args.patches, args.slides)
        embedder = Embedder(build_encoder(cfg.features), device, batch_size=args.batch_size, amp=cfg.features.amp)
        forward_only(embedder, args.batch_size, args.batch_size)  # warm up threads / cudnn
        rows = []
        def end_to_end() -> float:
            shutil.rmtree(root / "features", ignore_errors=True)
            start = time.perf_counter()
            report = extract_cohort(root, cfg, progress=False)
            if len(report.done) != args.slides:
                raise SystemExit(report.summary())
            return time.perf_counter() - start

        for rep in range(args.repeats):  # alternate which side goes first, so a load trend cancels out
            if rep % 2 == 0:
                t_fwd = forward_only(embedder, args.patches, args.batch_size)
                t_e2e = end_to_end()
            else:
                t_e2e = end_to_end()
                t_fwd = forward_only(embedder, args.patches, args.batch_size)
            rows.append((rep + 1, args.patches / t_fwd, args.patches / t_e2e))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device.type} ({name}), {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    print(f"resnet50_trunc (random weights), batch {args.batch_size}, {args.patches} patches of 256 px in "
          f"{args.slides} stores -> 224 px, amp {embedder.amp_name}")
    print(f"{'run':>6} {'forward only p/s':>17} {'extract p/s':>12} {'ratio':>7}")
    for rep, fwd, e2e in rows:
        print(f"{rep:>6} {fwd:>17.1f} {e2e:>12.1f} {e2e / fwd:>7.3f}")
    fwd_med = statistics.median(r[1] for r in rows)
    e2e_med = statistics.median(r[2] for r in rows)
    ratio = statistics.median(r[2] / r[1] for r in rows)  # pairs measured back to back
    print(f"{'median':>6} {fwd_med:>17.1f} {e2e_med:>12.1f} {ratio:>7.3f}")
    print(f"RESULT extract_ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
