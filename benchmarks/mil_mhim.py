"""MIL cost: seconds/epoch and peak memory of MHIM-MIL against its baseline on the same bags.

Compares, side by side in one run on the same synthetic bags (1024-d features, like ResNet-50 stage 3):
ABMIL vs MHIM(ABMIL) and TransMIL vs MHIM(TransMIL), using the CAMELYON16 presets of
``configs/camelyon16_mhim_*.yaml`` for the masking ratios (epoch 0 of 200). The baseline epoch is the
trainer's plain :class:`wsi_mil.mil.methods.BagMethod`; the MHIM epoch is
:meth:`wsi_mil.mil.mhim.MHIMMethod.train_epoch` (teacher forward on all instances + student on the
kept ones + EMA). Epochs are interleaved (baseline, MHIM, baseline, ...) and the median of ``--repeats``
is reported; the RESULT ratio is the median of the paired (MHIM / preceding baseline) epoch ratios.
Peak memory: CUDA ``max_memory_allocated`` on GPU; on CPU, the peak RSS (sampled every 10 ms) above
the RSS once bags and networks are built, over two epochs in a fresh subprocess per model.

    python benchmarks/mil_mhim.py [--device cpu|cuda] [--bags 16] [--min-n 500] [--max-n 3000]

Goals: MHIM(AB) <= 1.15x ABMIL; MHIM(Trans) <= 1.0x TransMIL.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IN_DIM = 1024
PAIRS = [("abmil", "camelyon16_mhim_abmil.yaml"), ("transmil", "camelyon16_mhim_transmil.yaml")]


def make_bags(n_bags: int, min_n: int, max_n: int, device: torch.device, seed: int = 0) -> list:
    """Synthetic bags: N(0,1) features; odd bags carry a small cluster of shifted instances."""
    from wsi_mil.mil.base import BagItem

    gen = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n_bags):
        n = int(torch.randint(min_n, max_n + 1, (1,), generator=gen))
        x = torch.randn(n, IN_DIM, generator=gen)
        label = i % 2
        if label:
            x[: max(1, n // 50), :16] += 2.0
        bags.append(BagItem(slide_id=f"b{i}", features=x.to(device), label=label))
    return bags


def _cfg(preset: str):
    from wsi_mil.config import load_config

    return load_config(ROOT / "configs" / preset)


def make_method(kind: str, student: str, preset: str, bags: list, device: torch.device):
    """A ready-to-train method: ``base`` = plain BagMethod, ``mhim`` = MHIMMethod (set up)."""
    from wsi_mil.mil.base import FoldContext
    from wsi_mil.mil.methods import BagMethod
    from wsi_mil.mil.mhim import MHIMMethod
    from wsi_mil.mil.models import build_model

    cfg = _cfg(preset)
    torch.manual_seed(0)
    ctx = FoldContext(0, 0, bags, [], 2, IN_DIM, device)
    if kind == "base":
        method = BagMethod(build_model(student, IN_DIM, 2, cfg.model), cfg, ctx, student)
    else:
        ctx.extras.train_baseline = lambda name: build_model(name, IN_DIM, 2, cfg.model).to(device)
        method = MHIMMethod(cfg, ctx)
    method.setup(ctx)
    return method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_in_subprocess(args: tuple) -> float:
    """CPU peak memory (MB): RSS sampled every 10 ms over two epochs, minus the RSS once set up.

    (``ru_maxrss`` is useless here: a spawned child inherits the parent's high-water mark.)
    """
    import threading

    kind, student, preset, n_bags, min_n, max_n, threads = args
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    bags = make_bags(n_bags, min_n, max_n, device)
    method = make_method(kind, student, preset, bags, device)
    before = _rss_mb()  # bags and networks are built; the rest is training memory
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    method.train_epoch(0, 200)
    method.train_epoch(1, 200)
    stop.set()
    sampler.join()
    return max(0.0, max(peak[0], _rss_mb()) - before)


def cpu_peak_memory(args: argparse.Namespace) -> dict[str, float]:
    """Peak training memory per method on CPU, one fresh subprocess each."""
    ctx = mp.get_context("spawn")
    out = {}
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for student, preset in PAIRS:
            for kind in ("base", "mhim"):
                job = (kind, student, preset, args.bags, args.min_n, args.max_n, args.threads)
                out[f"{kind}:{student}"] = pool.apply(_peak_rss_in_subprocess, (job,))
    return out


def time_epochs(args: argparse.Namespace, device: torch.device) -> dict[str, tuple[list[float], list[float]]]:
    """Interleaved epochs (base, MHIM, base, MHIM, ...) of every method on the same bags."""
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    bags = make_bags(args.bags, args.min_n, args.max_n, device)
    methods = {
        f"{kind}:{student}": make_method(kind, student, preset, bags, device)
        for student, preset in PAIRS
        for kind in ("base", "mhim")
    }
    for method in methods.values():
        method.train_epoch(0, 200)  # warm-up (allocator, kernels, caches)
    results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in methods}
    for rep in range(args.repeats):
        for key, method in methods.items():
            base_mem = 0
            if device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base_mem = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            method.train_epoch(1 + rep, 200)
            _sync(device)
            results[key][0].append(time.perf_counter() - start)
            if device.type == "cuda":
                results[key][1].append((torch.cuda.max_memory_allocated(device) - base_mem) / 2**20)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bags", type=int, default=None, help="Bags per epoch (cpu 12, cuda 100).")
    parser.add_argument("--min-n", type=int, default=None, help="Smallest bag (cpu 500, cuda 2000).")
    parser.add_argument("--max-n", type=int, default=None, help="Largest bag (cpu 3000, cuda 12000).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (cpu only; 1 avoids OpenMP spin-waits on a shared CPU).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw timings here.")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.bags = args.bags or (100 if gpu else 12)
    args.min_n = args.min_n or (2000 if gpu else 500)
    args.max_n = args.max_n or (12000 if gpu else 3000)
    device = torch.device(args.device)
    results = time_epochs(args, device)
    if not gpu:
        for key, mem in cpu_peak_memory(args).items():
            results[key][1].append(mem)
    hw = torch.cuda.get_device_name(0) if gpu else f"{platform.processor() or platform.machine()} ({args.threads} threads)"
    print(f"MIL cost, {args.bags} bags of {args.min_n}-{args.max_n} x {IN_DIM}-d, median of {args.repeats}, {hw}")
    print(f"{'model':<16}{'s/epoch':>10}{'peak MB':>10}{'time x':>8}{'mem x':>8}")
    ratios = {}
    for student, _ in PAIRS:
        base_t, base_m = (statistics.median(v) for v in results[f"base:{student}"])
        mhim_t, mhim_m = (statistics.median(v) for v in results[f"mhim:{student}"])
        # ratio = median over repetitions of (MHIM epoch / the baseline epoch run just before it)
        paired = [m / b for b, m in zip(results[f"base:{student}"][0], results[f"mhim:{student}"][0], strict=True)]
        ratios[student] = statistics.median(paired)
        label = {"abmil": "ABMIL", "transmil": "TransMIL"}[student]
        print(f"{label:<16}{base_t:>10.3f}{base_m:>10.1f}{1.0:>8.2f}{1.0:>8.2f}")
        print(f"{'MHIM(' + label + ')':<16}{mhim_t:>10.3f}{mhim_m:>10.1f}{mhim_t / base_t:>8.2f}"
              f"{mhim_m / max(base_m, 1e-9):>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"RESULT mhim_ab_cost_ratio {ratios['abmil']:.3f}")
    print(f"RESULT mhim_trans_cost_ratio {ratios['transmil']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
