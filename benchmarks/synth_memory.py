"""Peak memory and time of writing one large synthetic slide (bounded-memory streaming check).

Each size runs in a fresh child process so its peak RSS (``ru_maxrss``) is its own; the table
compares the sizes side by side and the last line is ``RESULT synth_peak_rss_mb <MB>`` of the
largest size.

    .venv/bin/python benchmarks/synth_memory.py                      # one 100000 x 100000 slide
    .venv/bin/python benchmarks/synth_memory.py --size 16384 --also 4096 8192
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(size: int, out_dir: Path, fmt: str, seed: int) -> None:
    from wsi_mil.synth import write_slide

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = out_dir / f"bench_{size}.{fmt}"
    t0, c0 = time.perf_counter(), time.process_time()
    write_slide(path, width=size, height=size, seed=seed, tumour="small", fmt=fmt)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    file_mb = path.stat().st_size / 2**20
    path.unlink()
    print(json.dumps({"size": size, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_mb,
                      "import_rss_mb": base_mb, "file_mb": file_mb}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000, help="Side of the slide the RESULT line reports.")
    ap.add_argument("--also", type=int, nargs="*", default=[], help="Smaller sizes to run first, for comparison.")
    ap.add_argument("--format", choices=["svs", "tiff"], default="svs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="Scratch directory (default: a temporary one).")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.out, args.format, args.seed)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for size in [*sorted(args.also), args.size]:
            cmd = [sys.executable, __file__, "--child", str(size), "--out", tmp, "--format", args.format,
                   "--seed", str(args.seed)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  done {size}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"{'size px':>9} {'Mpx':>8} {'wall s':>8} {'cpu s':>8} {'Mpx/cpu-s':>10} {'file MB':>9} "
          f"{'import MB':>10} {'peak RSS MB':>12}")
    for r in rows:
        mpx = r["size"] ** 2 / 1e6
        print(f"{r['size']:>9} {mpx:>8.0f} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {mpx / r['cpu_s']:>10.2f} "
              f"{r['file_mb']:>9.1f} {r['import_rss_mb']:>10.0f} {r['peak_rss_mb']:>12.0f}")
    print(f"RESULT synth_peak_rss_mb {rows[-1]['peak_rss_mb']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
