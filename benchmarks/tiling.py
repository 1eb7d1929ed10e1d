"""Tiler throughput vs a plain OpenSlide read loop, per-patch decode cost, peak RSS.

    python benchmarks/tiling.py [--quick] [--repeats 3] [--cohort 8] [--size 40960] [--patches 3000]
                                [--cache DIR] [--codecs]

Synthetic slides (wsi_mil.synth) are generated once into ``--cache`` and reused. Side by side,
``--repeats`` times in alternating order, on three inputs:

(a) a cohort of ``--cohort`` small slides (8192 px Aperio SVS at 0.25 um/px: per-slide costs matter),
(b) one large ``--size`` px Aperio SVS at 0.25 um/px (``--patches`` evenly spaced tissue patches),
(c) one generic pyramidal TIFF at 0.5 um/px (patches read at level 0 without any reduction),

we time

- the tiler: `tile_cohort` as `wsi-mil tile` runs it (local Dask cluster of the default workers
  started inside the timing, tissue detection, extraction, Zarr writes, QC images), and
- a plain single-threaded loop of ``OpenSlide.read_region`` over exactly the stored coordinates,
  level and read size, that keeps nothing.

Reported: median patches/s of both and their ratio, CPU ms per patch, peak RSS of this process (the
local cluster's workers are its threads). Then, on (b)'s coordinates, the per-patch decode cost of
the two readers (``read_patch`` through OpenSlide vs the jpeg-tiles fast path, one thread) and the
fast path's patches/s with 1 and 2 threads. ``--codecs`` adds the patch-store codec table.

The machine may be shared: the load average is printed first; ratios are measured side by side.
The last line is ``RESULT tiling_speedup <ratio on (b)>``.
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
from wsi_mil.slides import ReadPlan, close_all_slides, read_patch
from wsi_mil.slides.readers.jpeg_tiles import JpegTiffReader
from wsi_mil.slides.readers.openslide_reader import OpenSlideReader
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


def cached(path: Path, **kwargs: object) -> Path:
    """A synthetic slide at ``path``, generated once (atomically) with ``write_slide(**kwargs)``."""
    if not path.is_file():
        print(f"generating {path.name} ({kwargs}) once ...", flush=True)
        t0 = time.perf_counter()
        tmp = path.with_name(f".{path.name}")
        write_slide(tmp, **kwargs)  # type: ignore[arg-type]
        tmp.rename(path)
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    t = os.times()
    return t.user + t.system


def run_tiler(slides: Path, out: Path, overrides: list[str]) -> dict:
    """`wsi-mil tile` in this process (cluster start included); stores' coordinates and plan per slide."""
    cfg = load_config(None, overrides)
    remove_path(out)
    close_all_slides()  # no reader (nor decoded tile) survives from an earlier repeat
    with PeakRSS() as rss:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        with dask_client(cfg.compute) as client:
            report = tile_cohort(slides, out, cfg, client=client)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    assert not report.failed, report.summary()
    stores = [open_patch_store(r.output) for r in report.ok]
    reads = [(Path(s.attrs["slide_path"]), s.coords, int(s.attrs["level"]), int(s.attrs["read_size"]), s.attrs)
             for s in stores]
    n = sum(len(s) for s in stores)
    nbytes = sum(f.stat().st_size for s in stores for f in (s.path / "patches").rglob("*") if f.is_file())
    return {"n": n, "seconds": elapsed, "cpu": cpu, "rss": rss.peak, "bytes_per_patch": nbytes / max(n, 1),
            "reads": reads, "readers": sorted({s.attrs["reader"] for s in stores}), "store": stores[0].path}


def run_plain(reads: list) -> tuple[float, float]:
    """Wall and CPU seconds of a single-threaded read_region loop over every slide's coordinates."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for path, coords, level, read_size, _ in reads:
        handle = openslide.OpenSlide(str(path))
        for x, y in coords:
            handle.read_region((int(x), int(y)), level, (read_size, read_size))
        handle.close()
    return time.perf_counter() - t0, cpu_seconds() - cpu0


def compare(slides: Path, work: Path, overrides: list[str], repeats: int, label: str) -> dict:
    """Tiler and plain loop side by side, alternating which goes first; medians over ``repeats``."""
    out = work / f"out_{len(list(work.glob('out_*')))}"
    first = run_tiler(slides, out, overrides)  # also gives the coordinates (deterministic)
    tiler, plain = [first], [run_plain(first["reads"])]
    for rep in range(1, repeats):
        if rep % 2:
            plain.append(run_plain(first["reads"]))
            tiler.append(run_tiler(slides, out, overrides))
        else:
            tiler.append(run_tiler(slides, out, overrides))
            plain.append(run_plain(first["reads"]))
    n = first["n"]
    assert all(t["n"] == n for t in tiler)
    tiler_rate = statistics.median(n / t["seconds"] for t in tiler)
    plain_rate = statistics.median(n / s[0] for s in plain)
    _, _, level, read_size, attrs = first["reads"][0]
    return {"label": label, "n": n, "slides": len(first["reads"]), "tiler": tiler_rate, "plain": plain_rate,
            "ratio": tiler_rate / plain_rate, "rss": max(t["rss"] for t in tiler),
            "bytes_per_patch": tiler[-1]["bytes_per_patch"], "level": level, "read_size": read_size,
            "reader": "/".join(first["readers"]), "reads": first["reads"], "attrs": attrs, "store": first["store"],
            "tiler_cpu_ms": statistics.median(1000 * t["cpu"] / n for t in tiler),
            "plain_cpu_ms": statistics.median(1000 * s[1] / n for s in plain),
            "ratios": [s[0] / t["seconds"] for t, s in zip(tiler, plain, strict=True)]}


def _plan(attrs: dict) -> ReadPlan:
    return ReadPlan(level=int(attrs["level"]), downsample=float(attrs["downsample"]),
                    level_mpp=float(attrs["level_mpp"]), read_size=int(attrs["read_size"]),
                    patch_size=int(attrs["patch_size"]), patch_size_level0=float(attrs["patch_size_level0"]))


def _read_all(reader: object, coords: np.ndarray, plan: ReadPlan) -> tuple[float, float]:
    out = np.empty((plan.patch_size, plan.patch_size, 3), np.uint8)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for x, y in coords:
        read_patch(reader, int(x), int(y), plan, out=out)  # type: ignore[arg-type]
    return time.perf_counter() - t0, cpu_seconds() - cpu0


def decode_table(row: dict, repeats: int) -> dict:
    """Per-patch cost of read_patch (read + resample) through OpenSlide and the fast path; thread scaling."""
    path, coords, _, _, attrs = row["reads"][0]
    plan = _plan(attrs)
    slow, fast = OpenSlideReader(path), JpegTiffReader(path)
    times: dict[str, list[tuple[float, float]]] = {"openslide": [], "jpeg-tiles": [], "threads1": [], "threads2": []}
    for _ in range(repeats):
        times["openslide"].append(_read_all(slow, coords, plan))
        fast.cache.clear()
        times["jpeg-tiles"].append(_read_all(fast, coords, plan))
        for nt in (1, 2):
            fast.cache.clear()
            parts = [coords[i::nt] for i in range(nt)]
            threads = [threading.Thread(target=_read_all, args=(fast, part, plan)) for part in parts]
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            times[f"threads{nt}"].append((time.perf_counter() - t0, cpu_seconds() - cpu0))
    slow.close()
    fast.close()
    n = len(coords)
    med = {k: (statistics.median(1000 * w / n for w, _ in v), statistics.median(1000 * c / n for _, c in v))
           for k, v in times.items()}
    return {"n": n, "plan": plan, **med}


def slide_profile(path: Path, work: Path, repeats: int = 5) -> dict[str, float]:
    """Median ms of each per-slide step of `wsi-mil tile` on one small slide, one thread, nothing cached.

    The steps a slide costs whatever its patch count (open, thumbnail, tissue detection, patch grid, QC
    images, store creation) and, per patch, the read and the chunk write.
    """
    from wsi_mil.slides import choose_level, inspect_slide, open_slide, read_thumbnail
    from wsi_mil.tiling import _patch_array, grid_boxes, patch_grid, read_patches
    from wsi_mil.tissue import TissueParams, detect_tissue, save_qc_images, thumbnail_mpp

    cfg = load_config()
    params = TissueParams.from_config(cfg.tissue)
    steps: dict[str, list[float]] = {}

    def timed(name: str, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        steps.setdefault(name, []).append(1000 * (time.perf_counter() - t0))
        return value

    for rep in range(repeats):
        close_all_slides()
        info = timed("inspect (open, MPP, fingerprint)", inspect_slide, path, cfg.slides)
        reader = open_slide(path, cfg.slides)
        w, h = reader.dimensions
        thumb = timed("thumbnail", read_thumbnail, reader, info.mpp, thumbnail_mpp(w, h, info.mpp, params))
        found = timed("tissue detection", detect_tissue, thumb, info.mpp * w / thumb.shape[1], params)
        coords, _ = timed("patch grid", patch_grid, found.mask, w, h, info.mpp, cfg.tiling)
        boxes = grid_boxes(coords, cfg.tiling.patch_size * cfg.tiling.target_mpp / info.mpp, w, h, found.mask.shape)
        qc = {k: work / f"qc{rep}_{k}.{'png' if k == 'mask' else 'jpg'}" for k in ("thumb", "mask", "grid")}
        timed("QC images", save_qc_images, qc, thumb, found.mask, boxes)
        plan = choose_level(info.downsamples, info.mpp, cfg.tiling.target_mpp, cfg.tiling.patch_size)
        store = work / f"profile{rep}.zarr"
        timed("store creation", create_patch_store, store, n_patches=len(coords), patch_size=plan.patch_size,
              chunk_patches=cfg.tiling.chunk_patches, codec=cfg.tiling.codec, level=cfg.tiling.compression_level)
        patches = timed("read patches (all)", read_patches, str(path), coords, plan, cfg.slides)
        array = _patch_array.__wrapped__(str(store))  # as the workers open it (no empty-chunk scan)
        timed("write patches (all)", array.__setitem__, slice(0, len(patches)), patches)
        steps.setdefault("patches", []).append(float(len(coords)))
        remove_path(store)
    return {name: statistics.median(values) for name, values in steps.items()}


def gil_check(decoder: str) -> tuple[float, float]:
    """(ms of one large JPEG decode by ``decoder``, longest ms a Python thread waited meanwhile).

    A decoder holding the GIL stalls every other thread for the whole decode; a short longest wait
    shows it runs without the GIL (the residue is the OS scheduler on a busy machine).
    """
    import io

    from PIL import Image

    from wsi_mil.slides.readers.jpeg_tiles import decode_jpeg

    rgb = (np.random.default_rng(0).random((3000, 3000, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    done, longest = threading.Event(), [0.0]

    def spin() -> None:
        last = time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    decode_jpeg(data, "YCbCr", 1, decoder)
    took = time.perf_counter() - t0
    done.set()
    thread.join()
    return 1000 * took, 1000 * longest[0]


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


def folder(work: Path, name: str, slides: list[Path]) -> Path:
    """A folder of symlinks to ``slides`` (the tiler's input)."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    for s in slides:
        link = d / s.name
        if not link.exists():
            link.symlink_to(s)
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="Smoke test: 2-slide cohort, 16384 px large slide, 8192 px TIFF, 400 patches, 1 repeat.")
    parser.add_argument("--size", type=int, default=40960, help="Large slide side (level-0 px).")
    parser.add_argument("--cohort", type=int, default=8, help="Number of 8192 px slides in the cohort.")
    parser.add_argument("--tiff-size", type=int, default=16384, help="Generic TIFF side (level-0 px at 0.5 um/px).")
    parser.add_argument("--patches", type=int, default=3000, help="Patches compared on the large slide and the TIFF.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codecs", action="store_true", help="Also compare the patch-store codecs.")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi-mil-bench",
                        help="Where the generated slides are kept between runs.")
    args = parser.parse_args()
    if args.quick:
        args.size, args.cohort, args.tiff_size, args.patches, args.repeats = 16384, 2, 8192, 400, 1
    args.cache.mkdir(parents=True, exist_ok=True)
    cohort = [cached(args.cache / f"cohort8192_{i:02d}.svs", width=8192, height=8192, seed=100 + i, tumour="small")
              for i in range(args.cohort)]
    large = cached(args.cache / f"large_{args.size}.svs", width=args.size, height=args.size, seed=7, tumour="small")
    tiff = cached(args.cache / f"generic_{args.tiff_size}_mpp0.5.tiff", width=args.tiff_size, height=args.tiff_size,
                  seed=9, mpp=0.5, fmt="tiff", tumour="small")
    work = Path(tempfile.mkdtemp(prefix="tiling-bench-", dir=args.cache))
    cfg = load_config()
    cap = [f"tiling.max_patches_per_slide={args.patches}"]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machines: other jobs "
          f"compete for the cores); default compute: {cfg.compute.workers} worker x "
          f"{cfg.compute.threads_per_worker} threads; codec {cfg.tiling.codec}-{cfg.tiling.compression_level}")
    try:
        rows = [
            compare(folder(work, "cohort", cohort), work, [], args.repeats,
                    f"(a) {args.cohort} x 8192 px SVS 0.25 um/px"),
            compare(folder(work, "large", [large]), work, cap, args.repeats, f"(b) {args.size} px SVS 0.25 um/px"),
            compare(folder(work, "tiff", [tiff]), work, cap, args.repeats,
                    f"(c) {args.tiff_size} px TIFF 0.5 um/px"),
        ]
        print()
        print(f"{'run':34s} {'patches':>7s} {'reader':>10s} {'read':>4s} {'tiler/s':>8s} {'plain/s':>8s} "
              f"{'ratio':>6s} {'peak RSS':>9s} {'B/patch':>8s}")
        for r in rows:
            print(f"{r['label']:34s} {r['n']:7d} {r['reader']:>10s} {r['read_size']:4d} {r['tiler']:8.1f} "
                  f"{r['plain']:8.1f} {r['ratio']:6.2f} {r['rss'] / 2**20:7.0f}MB {r['bytes_per_patch']:8.0f}")
            print(f"{'':34s} ratios per repeat: {', '.join(f'{x:.2f}' for x in r['ratios'])}; CPU ms/patch "
                  f"tiler {r['tiler_cpu_ms']:.2f} (all threads) vs plain {r['plain_cpu_ms']:.2f}; on 2 free cores "
                  f"(2 x plain CPU / tiler CPU) {2 * r['plain_cpu_ms'] / r['tiler_cpu_ms']:.2f}x")
        print()
        d = decode_table(rows[1], args.repeats)
        p = d["plan"]
        print(f"decode per patch on (b), {d['n']} patches read as {p.read_size} px at level {p.level} -> "
              f"{p.patch_size} px ({p.resample_filter}), one thread, wall / CPU ms:")
        print(f"  OpenSlide read_region + reduce   {d['openslide'][0]:6.2f} / {d['openslide'][1]:6.2f}")
        print(f"  jpeg-tiles (shrink-on-load)      {d['jpeg-tiles'][0]:6.2f} / {d['jpeg-tiles'][1]:6.2f}   "
              f"-> {d['openslide'][1] / d['jpeg-tiles'][1]:.2f}x less CPU")
        print(f"  jpeg-tiles, 1 vs 2 threads: {1000 / d['threads1'][0]:.0f} vs {1000 / d['threads2'][0]:.0f} "
              f"patches/s (2-thread CPU/wall {d['threads2'][1] / d['threads2'][0]:.2f} cores)")
        prof = slide_profile(rows[0]["reads"][0][0], work, max(3, args.repeats))
        n_patches = prof.pop("patches")
        print(f"per-slide steps on one 8192 px slide of (a) ({n_patches:.0f} patches), one thread, median ms:")
        for name, ms in prof.items():
            print(f"  {name:34s} {ms:7.1f}" + (f"   ({ms / n_patches:.2f} per patch)" if "(all)" in name else ""))
        for decoder in ("simplejpeg", "pillow"):
            took, waited = gil_check(decoder)
            print(f"  GIL: a Python thread waited at most {waited:.0f} ms during a {took:.0f} ms JPEG decode by "
                  f"{decoder} ({'released' if waited < took / 3 else 'HELD'} while decoding)")
        if args.codecs:
            print()
            print(f"{'codec':14s} {'B/patch':>8s} {'write/s':>8s} {'read/s':>8s}")
            for c in codec_table(rows[1]["store"], work):
                print(f"{c['codec']:14s} {c['bytes']:8.0f} {c['write']:8.0f} {c['read']:8.0f}")
        print()
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        print(f"RESULT tiling_cohort_speedup {rows[0]['ratio']:.2f}")
        print(f"RESULT tiling_tiff_speedup {rows[2]['ratio']:.2f}")
        print(f"RESULT tiling_decode_cpu_ratio {d['openslide'][1] / d['jpeg-tiles'][1]:.2f}")
        print(f"RESULT tiling_peak_rss_mb {max(r['rss'] for r in rows) / 2**20:.0f}")
        print(f"RESULT tiling_speedup {rows[1]['ratio']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
