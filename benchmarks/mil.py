"""MIL baselines side by side: seconds/epoch, peak memory and bag AUC (mean +- std over folds).

Every model trains through the real cross-validation trainer (:func:`wsi_mil.mil.cv.train_cohort`:
patient-level folds, validation split, early stopping, test fold scored once, MLflow logging into a
temporary output directory) on the SAME synthetic cohort of HDF5 bags written with
:func:`wsi_mil.stores.write_bag`.

The bags mimic ResNet-50-stage-3 features of slides with small tumours: each instance is
``relu(A z + b + noise)`` (1024-d, non-negative like pooled CNN features) from a 64-d latent ``z``;
in a positive bag a small share of instances (``--tumour-min``..``--tumour-max``, default 2-10%) has
its latent shifted by ``--shift`` along a random direction inside a random 8-d latent subspace.
So the evidence is a few instances per bag, drawn from a shifted distribution in a random subspace -
the MIL problem without pixels. The end-to-end accuracy on rendered synthetic slides (tiling ->
encoder -> MIL) comes from the workflow (``wsi-mil demo`` / ``wsi-mil run``), not from this script.

Timing: wall time of each ``train_epoch`` call (median over all epochs of all folds). Peak memory:
on CUDA ``torch.cuda.max_memory_allocated`` per epoch; on CPU the largest RSS rise above the RSS at
the start of an epoch (sampled every 20 ms; epoch 0 excluded because it fills the bag cache).

Add rows by adding entries to ``MODELS`` (name -> config overrides) and naming them in ``--models``.

    python benchmarks/mil.py [--slides 40] [--min-n 200] [--max-n 600] [--folds 3] [--epochs 10]
                             [--models mean max abmil transmil dsmil] [--device auto]

Last line: ``RESULT mil_abmil_auc <mean test AUC of abmil over folds>``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi_mil.config import Config, load_config  # noqa: E402
from wsi_mil.mil.base import BagItem, FoldContext, Prediction  # noqa: E402
from wsi_mil.mil.cv import train_cohort  # noqa: E402
from wsi_mil.mil.methods import build_method  # noqa: E402
from wsi_mil.stores import write_bag  # noqa: E402

IN_DIM = 1024
# name -> config overrides applied over the CAMELYON16 ABMIL preset (published baseline hyperparameters)
MODELS: dict[str, dict[str, Any]] = {
    "mean": {"model.name": "mean"},
    "max": {"model.name": "max"},
    "abmil": {"model.name": "abmil"},
    "gated_abmil": {"model.name": "gated_abmil"},
    "transmil": {"model.name": "transmil"},
    "dsmil": {"model.name": "dsmil"},
    # rows for the other methods (MHIM trains its per-fold baseline in setup; that time is not in s/epoch)
    "mhim_abmil": {"model.name": "mhim", "model.mhim.student": "abmil", "model.mhim.cl_alpha": 0.1,
                   "model.mhim.mask_ratio_random": 0.5, "model.mhim.mask_ratio_high": 0.01,
                   "model.mhim.high_random_ratio": 0.5},
    "mhim_transmil": {"model.name": "mhim", "model.mhim.student": "transmil", "model.mhim.cl_alpha": 0.1,
                      "model.mhim.mask_ratio_random": 0.0, "model.mhim.mask_ratio_low": 0.8,
                      "model.mhim.mask_ratio_high": 0.03, "model.mhim.momentum_schedule": "cosine"},
    "ins": {"model.name": "ins"},
}
DEFAULT_MODELS = ["mean", "max", "abmil", "transmil", "dsmil"]


# --------------------------------------------------------------------------------------------- data
def write_cohort(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Synthetic bags with small 'tumours' (see the module doc); returns (bags dir, labels CSV)."""
    rng = np.random.default_rng(args.seed)
    latent = 64
    mixing = rng.normal(0, 1 / np.sqrt(latent), size=(latent, IN_DIM)).astype(np.float32)
    bias = rng.normal(0.0, 0.3, size=IN_DIM).astype(np.float32)
    subspace = np.linalg.qr(rng.normal(size=(latent, 8)))[0]  # 8 orthonormal latent directions
    direction = subspace @ (v := rng.normal(size=8)) / np.linalg.norm(v)
    bags = root / "bags"
    bags.mkdir(parents=True)
    rows = ["slide_id,label,patient_id"]
    for i in range(args.slides):
        label = i % 2
        n = int(rng.integers(args.min_n, args.max_n + 1))
        z = rng.normal(size=(n, latent))
        tumour = np.zeros(n, dtype=bool)
        if label:
            k = max(1, int(round(n * rng.uniform(args.tumour_min, args.tumour_max))))
            start = int(rng.integers(0, n - k + 1))  # a contiguous run of patches, like a small lesion
            tumour[start:start + k] = True
            z[tumour] += args.shift * direction
        x = np.maximum(z.astype(np.float32) @ mixing + bias + rng.normal(0, 0.1, size=(n, IN_DIM)).astype(np.float32),
                       0)
        coords = np.stack([np.arange(n) % 64 * 256, np.arange(n) // 64 * 256], axis=1)
        write_bag(bags / f"s{i:03d}.h5", x.astype(np.float32), coords,
                  {"encoder": "synthetic-1024", "patch_size": 256, "patch_level": 0})
        rows.append(f"s{i:03d},{'tumor' if label else 'normal'},p{i:03d}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return bags, labels


# ------------------------------------------------------------------------------------------ timing
class RssSampler:
    """Peak RSS above a starting value, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> RssSampler:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def rise(self) -> int:
        return self.peak - self.start


class Timed:
    """Wraps a method: times ``train_epoch`` and records the memory it needs."""

    def __init__(self, inner: Any, stats: dict[str, list[float]]) -> None:
        self.inner, self.stats = inner, stats

    def setup(self, fold: FoldContext) -> None:
        self.device = fold.device
        self.inner.setup(fold)

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        with RssSampler() as rss:
            t0 = time.perf_counter()
            out = self.inner.train_epoch(epoch, num_epochs)
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
        self.stats["seconds"].append(seconds)
        if cuda:
            self.stats["mem"].append(torch.cuda.max_memory_allocated(self.device))
        elif epoch > 0:
            self.stats["mem"].append(rss.rise)
        return out

    def predict(self, bag: BagItem) -> Prediction:
        return self.inner.predict(bag)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def run_model(name: str, base: Config, out: Path) -> dict[str, Any]:
    """Cross-validate one model; returns its timing, memory and accuracy."""
    cfg = base.with_overrides({**MODELS[name], "tracking.run_name": f"bench {name}"})
    stats: dict[str, list[float]] = {"seconds": [], "mem": []}
    t0 = time.perf_counter()
    result = train_cohort(out, cfg, method_factory=lambda c, ctx: Timed(build_method(c, ctx), stats))
    total = time.perf_counter() - t0
    summary = result.summary
    return {
        "model": name,
        "s_per_epoch": statistics.median(stats["seconds"]),
        "peak_mb": (max(stats["mem"]) / 2**20) if stats["mem"] else float("nan"),
        "epochs": float(np.mean([f.epochs_run for f in result.folds])),
        "auc_mean": float(summary.loc["auc", "mean"]),
        "auc_std": float(summary.loc["auc", "std"]),
        "acc_mean": float(summary.loc["accuracy", "mean"]),
        "total_s": total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=40)
    parser.add_argument("--min-n", type=int, default=200)
    parser.add_argument("--max-n", type=int, default=600)
    parser.add_argument("--tumour-min", type=float, default=0.02, help="Smallest tumour share of a positive bag.")
    parser.add_argument("--tumour-max", type=float, default=0.10, help="Largest tumour share of a positive bag.")
    parser.add_argument("--shift", type=float, default=3.0, help="Latent shift of tumour instances.")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--min-epochs", type=int, default=5)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: fastest for one-bag steps on a shared 2-core CPU).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = load_config(ROOT / "configs" / "camelyon16_abmil.yaml")
    rows = []
    with tempfile.TemporaryDirectory(prefix="wsi-mil-bench-mil-") as tmp:
        t0 = time.perf_counter()
        bags, labels = write_cohort(Path(tmp), args)
        print(f"cohort: {args.slides} slides, {args.min_n}-{args.max_n} instances x {IN_DIM}-d, tumour share "
              f"{args.tumour_min:.0%}-{args.tumour_max:.0%}, shift {args.shift} ({time.perf_counter() - t0:.1f} s)")
        base = base.with_overrides({
            "training.features_dir": str(bags), "training.labels_csv": str(labels), "training.folds": args.folds,
            "training.epochs": args.epochs, "training.min_epochs": args.min_epochs,
            "training.patience": args.patience, "training.device": args.device, "training.bootstrap": 200,
            "training.threads": args.threads, "training.progress": False, "tracking.experiment": "bench-mil",
        })
        for name in args.models:
            row = run_model(name, base, Path(tmp) / "out")
            rows.append(row)
            print(f"  {name}: {row['s_per_epoch']:.3f} s/epoch, AUC {row['auc_mean']:.3f} +- {row['auc_std']:.3f} "
                  f"({row['total_s']:.0f} s)", flush=True)

    device = "cuda:" + torch.cuda.get_device_name(0) if (args.device != "cpu" and torch.cuda.is_available()) \
        else f"cpu ({platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} torch threads)"
    ref = next((r["s_per_epoch"] for r in rows if r["model"] == "abmil"), None)
    mem_kind = "GPU max allocated" if device.startswith("cuda") else "RSS rise per epoch"
    print(f"\nMIL baselines, {args.folds}-fold CV, up to {args.epochs} epochs, device {device}")
    print(f"{'model':<14}{'s/epoch':>9}{'x abmil':>9}{'peak MB':>9}{'epochs':>8}{'AUC mean +- std':>18}{'acc':>7}")
    for r in rows:
        ratio = f"{r['s_per_epoch'] / ref:.2f}" if ref else "-"
        print(f"{r['model']:<14}{r['s_per_epoch']:>9.3f}{ratio:>9}{r['peak_mb']:>9.0f}{r['epochs']:>8.1f}"
              f"{r['auc_mean']:>11.3f} +- {r['auc_std']:.3f}{r['acc_mean']:>7.3f}")
    print(f"(peak memory = {mem_kind}; s/epoch = median over all epochs of all folds)")
    abmil = next((r for r in rows if r["model"] == "abmil"), None)
    print(f"RESULT mil_abmil_auc {abmil['auc_mean']:.4f}" if abmil else "RESULT mil_abmil_auc nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
