"""Cross-validated training on a Dask cluster: wall time of 8 small trainings on 1 vs 2 CPU workers.

Starts a real ``mlflow server`` and two real clusters on 127.0.0.1 (``dask scheduler`` + ``dask
worker`` processes, one thread each): one with 1 worker, one with 2. Each repeat trains the same
cohort of synthetic HDF5 bags (written with :func:`wsi_mil.stores.write_bag`) as ABMIL with 2 seeds
x 4 folds = 8 fold trainings through :func:`wsi_mil.mil.distributed.train_on_cluster` - the path of
``wsi-mil train --scheduler`` - once on each cluster, back to back, each into a new MLflow experiment
(so that nothing is reused). The wall time includes starting the parent run, the tasks, each
worker's MLflow logging and the parent's summary and MLflow Model.

The speedup is the median over repeats of (1-worker time / 2-worker time); at most 2 on two idle
cores, less where other work shares the machine (the client and the MLflow server run beside the
workers).

    python benchmarks/cluster_training.py [--repeats 3] [--slides 32] [--epochs 6]

Last line: ``RESULT cluster_training_speedup <ratio>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers.servers import dask_processes, mlflow_server  # noqa: E402

from wsi_mil.config import Config  # noqa: E402
from wsi_mil.mil.distributed import train_on_cluster  # noqa: E402
from wsi_mil.stores import write_bag  # noqa: E402


def write_bags(root: Path, n_slides: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """Bags of Gaussian noise; positive ones hold a few instances shifted along a random direction."""
    rng = np.random.default_rng(seed)
    bags = root / "bags"
    bags.mkdir(parents=True)
    direction = np.zeros(dim, dtype=np.float32)
    direction[rng.choice(dim, 8, replace=False)] = 1.0
    rows = []
    for i in range(n_slides):
        n = int(rng.integers(100, 300))
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        if i % 2:
            feats[rng.choice(n, 6, replace=False)] += 2.0 * direction
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
        write_bag(bags / f"s{i:03d}.h5", feats, coords, {"encoder": "synthetic", "patch_size": 256, "patch_level": 0})
        rows.append({"slide_id": f"s{i:03d}", "label": "tumor" if i % 2 else "normal"})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return bags, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slides", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"{args.slides} slides, {args.dim}-d, abmil, 2 seeds x 4 folds, {args.epochs} epochs, 1 thread per worker")
    with tempfile.TemporaryDirectory(prefix="wsi-mil-bench-cluster-") as tmp:
        root = Path(tmp)
        bags, labels = write_bags(root, args.slides, args.dim)
        base = Config().with_overrides({
            "training.features_dir": str(bags), "training.labels_csv": str(labels), "training.folds": 4,
            "training.seeds": [0, 1], "training.epochs": args.epochs, "training.min_epochs": args.epochs,
            "training.threads": 1, "training.bootstrap": 100, "model.name": "abmil", "training.progress": False,
        })
        with mlflow_server(root / "mlflow") as url, dask_processes([None]) as one, dask_processes([None, None]) as two:
            rows = []
            for repeat in range(args.repeats):
                times = {}
                for n, cluster in ((1, one), (2, two)):
                    cfg = base.with_overrides({"compute.scheduler": cluster.address, "tracking.uri": url,
                                               "tracking.experiment": f"bench-{repeat}-{n}"})
                    start = time.perf_counter()
                    result = train_on_cluster(root / "out", cfg)
                    times[n] = time.perf_counter() - start
                    assert len(result.folds) == 8
                rows.append((times[1], times[2], times[1] / times[2]))
                print(f"repeat {repeat}: 1 worker {times[1]:.1f} s, 2 workers {times[2]:.1f} s, "
                      f"speedup {times[1] / times[2]:.2f}", flush=True)
    print(f"median: 1 worker {statistics.median(r[0] for r in rows):.1f} s, "
          f"2 workers {statistics.median(r[1] for r in rows):.1f} s; load average {os.getloadavg()[0]:.2f} at end")
    print(f"RESULT cluster_training_speedup {statistics.median(r[2] for r in rows):.2f}")


if __name__ == "__main__":
    main()
