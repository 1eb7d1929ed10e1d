"""Localisation and bag accuracy of every model end to end on rendered synthetic slides.

Runs the real workflow (synth -> tile -> extract -> train -> heatmaps) on a synthetic cohort whose
positive slides carry tumour of the chosen size, then prints per model: bag AUC (mean +- std over
test folds), instance AUC (per-patch scores vs ground-truth tumour on each test fold) and the
heatmap localisation AUC (pooled over all slides' heatmaps). Copies one heatmap of a tumour slide to
``docs/images/`` for the README.

    python benchmarks/localisation.py --slides 24 --size 5120 --tumour small --models abmil mhim ins

Last line: ``RESULT localisation_auc_<best model> <value>``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

from wsi_mil.workflows.cohort import run_cohort

from wsi_mil.config import load_config
from wsi_mil.synth import generate_cohort, load_truth

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsi-mil-bench/localisation"))
    parser.add_argument("--slides", type=int, default=24)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--tumour", default="small", choices=["micro", "small", "large", "mixed"])
    parser.add_argument("--models", nargs="+", default=["abmil", "mhim", "ins"])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--example", type=Path, default=REPO / "docs" / "images" / "heatmap_example.png")
    args = parser.parse_args()

    started = time.perf_counter()
    cohort = generate_cohort(args.work / "cohort", n_slides=args.slides, seed=7, size=args.size, tumour=args.tumour)
    out = args.work / f"out-{args.encoder}-{args.weights.replace('/', '_')}"
    cfg = load_config(None, {
        "features.encoder": args.encoder, "features.weights": args.weights, "training.folds": args.folds,
        "training.epochs": args.epochs, "training.min_epochs": 8, "training.patience": 10, "training.bootstrap": 0,
        "training.annotations_dir": str(cohort.truth_dir), "run.models": args.models,
        "tracking.experiment": "localisation-benchmark",
    })
    outcome = run_cohort(cohort.slides_dir, cohort.labels_csv, out, cfg)
    print(f"\n{args.slides} slides ({args.size} px, tumour {args.tumour}), encoder {args.encoder} ({args.weights}), "
          f"{args.folds}-fold CV, {time.perf_counter() - started:.0f} s")
    print(f"{'model':<8} {'bag AUC':>16} {'instance AUC':>16} {'heatmap AUC':>12}")
    best = ("none", -1.0)
    for m in outcome.models:
        auc, inst = m.summary["auc"], m.summary["instance_auc"]
        print(f"{m.name:<8} {auc[0]:>8.3f} +- {auc[1]:.3f} {inst[0]:>8.3f} +- {inst[1]:.3f} {m.localisation_auc:>12.3f}")
        if not math.isnan(m.localisation_auc) and m.localisation_auc > best[1]:
            best = (m.name, m.localisation_auc)
    if best[0] != "none":
        run_id = next(m.run_id for m in outcome.models if m.name == best[0])
        tumour_slide = max(cohort.slide_ids, key=lambda s: load_truth(cohort.truth_dir, s).tumour_fraction)
        args.example.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "heatmaps" / run_id / f"{tumour_slide}.png", args.example)
        print(f"example heatmap ({best[0]}, {tumour_slide}): {args.example}")
    print(f"RESULT localisation_auc_{best[0]} {best[1]:.4f}")


if __name__ == "__main__":
    main()
