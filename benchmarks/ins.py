"""INS vs attention MIL on small tumours: instance AUC (localisation), bag AUC and seconds per epoch.

Synthetic bags with instance ground truth, in the small-tumour regime: each instance is
``relu(A z + b + noise)`` (``--dim``-d, non-negative like pooled CNN features) from a 64-d latent ``z``;
in a positive bag ``--tumour-min``..``--tumour-max`` (default 2-5%) of the instances are tumour, their
latent shifted by ``--shift`` along a random direction. Every model is trained per fold with the real
trainer loop (:func:`wsi_mil.mil.fit.fit`: early stopping on validation bag AUC, best checkpoint
reloaded) on stratified folds with a validation split carved from each training fold; the test fold is
scored once. Instance AUC pools the test slides' instance scores (INS: instance p(tumour); ABMIL:
attention weights) against the instance truth with :func:`wsi_mil.mil.metrics.instance_auc`.

    python benchmarks/ins.py [--slides 40] [--min-n 150] [--max-n 300] [--folds 3] [--epochs 15]

Last line: ``RESULT ins_instance_auc <mean over folds>`` (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi_mil.config import Config, load_config  # noqa: E402
from wsi_mil.mil.base import BagItem, FoldContext, FoldExtras  # noqa: E402
from wsi_mil.mil.metrics import instance_auc  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "ins": {"model.name": "ins"},
    "abmil": {"model.name": "abmil"},
}


def make_bags(args: argparse.Namespace) -> tuple[list[BagItem], list[np.ndarray]]:
    """Synthetic bags and their instance truth (see the module doc)."""
    rng = np.random.default_rng(args.seed)
    latent = 64
    mixing = rng.normal(0, 1 / np.sqrt(latent), size=(latent, args.dim)).astype(np.float32)
    bias = rng.normal(0.0, 0.3, size=args.dim).astype(np.float32)
    direction = rng.normal(size=latent)
    direction /= np.linalg.norm(direction)
    bags, truth = [], []
    for i in range(args.slides):
        label = i % 2
        n = int(rng.integers(args.min_n, args.max_n + 1))
        z = rng.normal(size=(n, latent))
        tumour = np.zeros(n, dtype=np.int64)
        if label:
            k = max(1, int(round(n * rng.uniform(args.tumour_min, args.tumour_max))))
            start = int(rng.integers(0, n - k + 1))
            tumour[start:start + k] = 1
            z[tumour == 1] += args.shift * direction
        x = np.maximum(z.astype(np.float32) @ mixing + bias + rng.normal(0, 0.1, (n, args.dim)).astype(np.float32), 0)
        coords = np.stack([np.arange(n) % 64 * 256, np.arange(n) // 64 * 256], axis=1)
        bags.append(BagItem(f"s{i:03d}", torch.from_numpy(x), label, coords))
        truth.append(tumour)
    return bags, truth


def run_fold(name: str, cfg: Config, bags: list[BagItem], truth: list[np.ndarray], train_idx: np.ndarray,
             test_idx: np.ndarray, fold: int, seed: int) -> dict[str, float]:
    """Train one model on one fold; bag AUC, instance AUC and median seconds per epoch."""
    from wsi_mil.mil.fit import fit
    from wsi_mil.mil.methods import build_method

    labels = np.array([b.label for b in bags])
    tr, va = train_test_split(train_idx, test_size=0.25, stratify=labels[train_idx], random_state=seed + fold)
    ctx = FoldContext(fold, seed, [bags[i] for i in tr], [bags[i] for i in va], 2, int(bags[0].features.shape[1]),
                      torch.device("cpu"), FoldExtras(config=cfg))
    method = build_method(cfg, ctx)
    method.setup(ctx)
    seconds: list[float] = []
    train_epoch = method.train_epoch

    def timed(epoch: int, num_epochs: int) -> dict[str, float]:
        t0 = time.perf_counter()
        out = train_epoch(epoch, num_epochs)
        seconds.append(time.perf_counter() - t0)
        return out

    method.train_epoch = timed  # type: ignore[method-assign]
    result = fit(method, ctx, cfg.training, progress=False)
    preds = [method.predict(bags[i]) for i in test_idx]
    bag_auc = roc_auc_score(labels[test_idx], [p.probs[1] for p in preds])
    inst = instance_auc([p.instance_scores for p in preds], [truth[i] for i in test_idx])
    extra = preds[0].extra.get("aggregator", "") if preds else ""
    return {"bag_auc": float(bag_auc), "inst_auc": float(inst), "s_epoch": statistics.median(seconds),
            "epochs": float(result.epochs_run), "agg_max": float(extra == "max")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=40)
    parser.add_argument("--min-n", type=int, default=150)
    parser.add_argument("--max-n", type=int, default=300)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tumour-min", type=float, default=0.02)
    parser.add_argument("--tumour-max", type=float, default=0.05)
    parser.add_argument("--shift", type=float, default=4.0, help="Latent shift of tumour instances (latent std 1).")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--min-epochs", type=int, default=8)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["ins", "abmil"], choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    bags, truth = make_bags(args)
    labels = np.array([b.label for b in bags])
    print(f"cohort: {args.slides} slides, {args.min_n}-{args.max_n} instances x {args.dim}-d, tumour share "
          f"{args.tumour_min:.0%}-{args.tumour_max:.0%} of positive bags, shift {args.shift} "
          f"({time.perf_counter() - t0:.1f} s)")
    base = load_config(ROOT / "configs" / "camelyon16_ins.yaml").with_overrides({
        "training.epochs": args.epochs, "training.min_epochs": args.min_epochs, "training.patience": args.patience,
    })
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(np.zeros(len(bags)), labels))
    rows: dict[str, list[dict[str, float]]] = {}
    for name in args.models:
        try:
            cfg = base.with_overrides(MODELS[name])
            for f, (train_idx, test_idx) in enumerate(folds):
                r = run_fold(name, cfg, bags, truth, train_idx, test_idx, f, args.seed)
                rows.setdefault(name, []).append(r)
                print(f"  {name} fold {f}: bag AUC {r['bag_auc']:.3f}, instance AUC {r['inst_auc']:.3f}, "
                      f"{r['s_epoch']:.2f} s/epoch, {r['epochs']:.0f} epochs", flush=True)
        except ImportError as exc:  # a model another module provides is not there yet
            print(f"  {name}: skipped ({exc})")

    def ms(name: str, key: str) -> tuple[float, float]:
        vals = [r[key] for r in rows[name]]
        return float(np.mean(vals)), float(np.std(vals))

    print(f"\nINS vs attention MIL, {args.folds}-fold CV, up to {args.epochs} epochs, "
          f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{'model':<8}{'bag AUC':>18}{'instance AUC':>18}{'s/epoch':>9}{'x abmil':>9}  instance scores")
    ref = statistics.median([r["s_epoch"] for r in rows["abmil"]]) if "abmil" in rows else None
    for name in rows:
        b, i = ms(name, "bag_auc"), ms(name, "inst_auc")
        s = statistics.median([r["s_epoch"] for r in rows[name]])
        ratio = f"{s / ref:.2f}" if ref else "-"
        kind = "instance p(tumour)" if name == "ins" else "attention weights"
        print(f"{name:<8}{b[0]:>10.3f} +- {b[1]:.3f}{i[0]:>10.3f} +- {i[1]:.3f}{s:>9.2f}{ratio:>9}  {kind}")
    value = ms("ins", "inst_auc")[0] if "ins" in rows else float("nan")
    print(f"RESULT ins_instance_auc {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
