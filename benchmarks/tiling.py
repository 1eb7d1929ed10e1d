"""Tiler throughput vs a plain OpenSlide read loop, peak RSS, and patch-store codecs.

    python benchmarks/tiling.py [--size 40960] [--patches 3000] [--repeats 3] [--cache DIR]

1. A large synthetic slide (>= 40k x 40k, wsi_mil.synth) is generated once and cached.
2. Side by side, ``--repeats`` times in alternating order:
   - the tiler (`tile_cohort`: tissue detection + Dask-parallel extraction + Zarr write, default
     settings and workers) limited to ``--patches`` evenly spaced tissue patches, and
   - a plain single-threaded loop of ``OpenSlide.read_region`` over exactly the stored coordinates,
     level and read size, that stores nothing.
   Reported: median patches/s of both, their ratio, peak RSS of the worker process (the local
   cluster's workers are threads of this process) and Zarr bytes per patch. The same is measured with
   ``tiling.write_from=client`` and on a 4x smaller slide (RSS must not grow with slide size).
3. Codecs: the same patches written with each codec (bytes/patch, write and read patches/s).

The last line is ``RESULT tiling_speedup <ratio>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import psutil
import zarr

from wsi_mil.compute import dask_client
from wsi_mil.config import load_config
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.stores import create_patch_store, open_patch_store, remove_path
from wsi_mil.synth import write_slide
from wsi_mil.tiling import tile_cohort


class PeakRSS:
    """Samples this process's resident memory in a background thread (the workers are its threads)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def cached_slide(cache: Path, size: int) -> Path:
    path = cache / f"large_{size}.svs"
    if not path.is_file():
        print(f"generating a {size} x {size} synthetic slide in {path} (once; takes a while) ...", flush=True)
        t0 = time.perf_counter()
        write_slide(path, width=size, height=size, seed=7, tumour="small")
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def slide_dir(work: Path, slide: Path) -> Path:
    d = work / f"in_{slide.stem}"
    d.mkdir(parents=True, exist_ok=True)
    link = d / slide.name
    if not link.exists():
        link.symlink_to(slide)
    return d


def run_tiler(slides: Path, out: Path, overrides: list[str]) -> dict:
    cfg = load_config(None, overrides)
    remove_path(out)
    with PeakRSS() as rss:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        with dask_client(cfg.compute) as client:
            report = tile_cohort(slides, out, cfg, client=client)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    assert not report.failed, report.summary()
    store_path = Layout(out).patch_store(tiling_key(cfg), report.results[0].slide_id)
    store = open_patch_store(store_path)
    nbytes = sum(f.stat().st_size for f in (store_path / "patches").rglob("*") if f.is_file())
    return {"n": len(store), "seconds": elapsed, "cpu": cpu, "rss": rss.peak, "bytes_per_patch": nbytes / len(store),
            "coords": store.coords, "level": store.attrs["level"], "read_size": store.attrs["read_size"],
            "store": store_path}


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    t = os.times()
    return t.user + t.system


def run_plain(slide: Path, coords: np.ndarray, level: int, read_size: int) -> tuple[float, float]:
    """Wall and CPU seconds of a single-threaded read_region loop that stores nothing."""
    handle = openslide.OpenSlide(str(slide))
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for x, y in coords:
        handle.read_region((int(x), int(y)), level, (read_size, read_size))
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    handle.close()
    return elapsed, cpu


def compare(slide: Path, work: Path, overrides: list[str], repeats: int, label: str) -> dict:
    """Tiler and plain loop side by side, alternating which goes first; medians over ``repeats``."""
    slides = slide_dir(work, slide)
    out = work / f"out_{len(list(work.glob('out_*')))}"
    first = run_tiler(slides, out, overrides)  # also gives the coordinates (deterministic)
    coords, level, read_size = first["coords"], first["level"], first["read_size"]
    tiler, plain = [first], [run_plain(slide, coords, level, read_size)]
    for rep in range(1, repeats):
        if rep % 2:
            plain.append(run_plain(slide, coords, level, read_size))
            tiler.append(run_tiler(slides, out, overrides))
        else:
            tiler.append(run_tiler(slides, out, overrides))
            plain.append(run_plain(slide, coords, level, read_size))
    n = first["n"]
    assert all(np.array_equal(t["coords"], coords) for t in tiler)
    tiler_rate = statistics.median(n / t["seconds"] for t in tiler)
    plain_rate = statistics.median(n / s[0] for s in plain)
    tiler_cpu = statistics.median(1000 * t["cpu"] / n for t in tiler)
    plain_cpu = statistics.median(1000 * s[1] / n for s in plain)
    return {"label": label, "n": n, "tiler": tiler_rate, "plain": plain_rate, "ratio": tiler_rate / plain_rate,
            "rss": max(t["rss"] for t in tiler), "bytes_per_patch": tiler[-1]["bytes_per_patch"],
            "level": level, "read_size": read_size, "store": tiler[-1]["store"],
            "tiler_cpu_ms": tiler_cpu, "plain_cpu_ms": plain_cpu,
            "tiler_share": statistics.median(t["cpu"] / t["seconds"] for t in tiler),
            "plain_share": statistics.median(s[1] / s[0] for s in plain),
            "ratios": [s[0] / t["seconds"] for t, s in zip(tiler, plain, strict=True)]}


def codec_table(store_path: Path, work: Path, n: int = 512) -> list[dict]:
    patches = np.asarray(open_patch_store(store_path).patches[:n])
    rows = []
    for codec, level in [("zstd", 3), ("zstd", 1), ("lz4", 3), ("blosc-zstd", 3), ("none", 0)]:
        path = work / f"codec_{codec}_{level}.zarr"
        remove_path(path)
        group = create_patch_store(path, n_patches=len(patches), patch_size=patches.shape[1], chunk_patches=64,
                                   codec=codec, level=level)
        array = group["patches"]
        t0 = time.perf_counter()
        for start in range(0, len(patches), 64):
            array[start : start + 64] = patches[start : start + 64]
        write = time.perf_counter() - t0
        reader = zarr.open_array(str(path), path="patches", mode="r")
        t0 = time.perf_counter()
        for start in range(0, len(patches), 64):
            np.asarray(reader[start : start + 64])
        read = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in (path / "patches").rglob("*") if f.is_file())
        rows.append({"codec": f"{codec}-{level}", "bytes": nbytes / len(patches), "write": len(patches) / write,
                     "read": len(patches) / read})
        remove_path(path)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40960, help="Large slide side (level-0 px, >= 40000).")
    parser.add_argument("--patches", type=int, default=3000, help="Patches compared (evenly spaced tissue patches).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi-mil-bench",
                        help="Where the generated slides are kept between runs.")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    large = cached_slide(args.cache, args.size)
    small = cached_slide(args.cache, args.size // 4)
    work = Path(tempfile.mkdtemp(prefix="tiling-bench-", dir=args.cache))
    base = [f"tiling.max_patches_per_slide={args.patches}"]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; default compute: "
          f"{load_config().compute.workers} worker x {load_config().compute.threads_per_worker} threads; "
          f"codec {load_config().tiling.codec}")
    try:
        rows = [
            compare(large, work, base, args.repeats, f"{args.size}px, write_from=workers"),
            compare(large, work, base + ["tiling.write_from=client"], args.repeats, f"{args.size}px, write_from=client"),
            compare(small, work, base, 1, f"{args.size // 4}px, write_from=workers"),
        ]
        print()
        print(f"{'run':38s} {'patches':>7s} {'level':>5s} {'read':>5s} {'tiler/s':>8s} {'plain/s':>8s} "
              f"{'ratio':>6s} {'peak RSS':>9s} {'B/patch':>8s}")
        for r in rows:
            print(f"{r['label']:38s} {r['n']:7d} {r['level']:5d} {r['read_size']:5d} {r['tiler']:8.1f} "
                  f"{r['plain']:8.1f} {r['ratio']:6.2f} {r['rss'] / 2**20:7.0f}MB {r['bytes_per_patch']:8.0f}")
            print(f"{'':38s} ratios per repeat: {', '.join(f'{x:.2f}' for x in r['ratios'])}; CPU ms/patch "
                  f"tiler {r['tiler_cpu_ms']:.1f} (all threads) vs plain {r['plain_cpu_ms']:.1f}; cores used "
                  f"tiler {r['tiler_share']:.2f} vs plain {r['plain_share']:.2f}")
        print()
        print(f"{'codec':14s} {'B/patch':>8s} {'write/s':>8s} {'read/s':>8s}")
        for c in codec_table(rows[0]["store"], work):
            print(f"{c['codec']:14s} {c['bytes']:8.0f} {c['write']:8.0f} {c['read']:8.0f}")
        print()
        ideal = 2 * rows[0]["plain_cpu_ms"] / rows[0]["tiler_cpu_ms"]
        print(f"CPU-bound estimate on 2 free cores (2 x plain CPU/patch / tiler CPU/patch): {ideal:.2f}")
        print(f"RESULT tiling_peak_rss_mb {rows[0]['rss'] / 2**20:.0f}")
        print(f"RESULT tiling_bytes_per_patch {rows[0]['bytes_per_patch']:.0f}")
        print(f"RESULT tiling_speedup {rows[0]['ratio']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
