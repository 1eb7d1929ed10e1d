"""`wsi-mil demo`: synthesise a small cohort and run the whole workflow on it, offline, on a laptop.

The demo's settings are embedded here (``DEMO_SETTINGS``) and can be overridden as usual with
``--config`` / ``--set``. It uses pretrained encoder weights when they can be had (cache or
download); otherwise it says so and uses ``--weights random``, and the MLflow runs record which.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from wsi_mil.workflows.cohort import StageClock, run_cohort, summary_markdown
from wsi_mil.workflows.ui import ui_command

from wsi_mil.config import Config
from wsi_mil.encoders import build_encoder
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout
from wsi_mil.synth import generate_cohort

log = logging.getLogger(__name__)

# Training settings small enough for 2 CPU cores in a few minutes.
DEMO_SETTINGS: dict[str, Any] = {
    "features.encoder": "resnet18",
    "training.folds": 3,
    "training.val_fraction": 0.25,
    "training.epochs": 40,
    "training.min_epochs": 8,
    "training.patience": 10,
    "training.bootstrap": 200,
    "model.ins.queue_size": 1024,
    "heatmap.top_k": 8,
    "tracking.experiment": "wsi-mil-demo",
}
# Large tumours, so that 12 slides embedded by an untrained encoder still carry a signal; the
# benchmarks measure the hard case (small tumours).
DEMO_TUMOUR = "large"
DEMO_SLIDE_SIZE = 5120  # level-0 px at 0.25 um/px: ~45 tissue patches of 256 px at 0.5 um/px


def choose_weights(cfg: Config, requested: str | None) -> tuple[str, str]:
    """The encoder weights the demo uses and why: pretrained when loadable, else an explicit random."""
    if requested:
        return requested, "as requested"
    try:
        build_encoder(cfg.features.model_copy(update={"weights": "pretrained"}))
    except WsiMilError as exc:
        return "random", str(exc).rstrip(".")
    return "pretrained", "pretrained weights found"


def demo_config(cfg: Config, annotations: Path) -> Config:
    """Demo settings under the user's overrides (the user's explicit keys win)."""
    defaults = Config().flat()
    chosen = cfg.flat()
    updates = {k: v for k, v in DEMO_SETTINGS.items() if chosen.get(k) == defaults.get(k)}
    updates["training.annotations_dir"] = str(annotations)
    return cfg.with_overrides(updates)


def cli_demo(args: argparse.Namespace, cfg: Config) -> int:
    """Synthesise -> tile -> embed -> train ABMIL, MHIM(ABMIL), INS -> heatmaps -> summary."""
    started, cpu = time.perf_counter(), StageClock.cpu()
    out = Path(args.out)
    print(f"wsi-mil demo: synthesising {args.slides} slides into {out / 'cohort'} ...", flush=True)
    cohort = generate_cohort(out / "cohort", n_slides=args.slides, seed=0, size=DEMO_SLIDE_SIZE, tumour=DEMO_TUMOUR)
    synth = (time.perf_counter() - started, StageClock.cpu() - cpu)
    cfg = demo_config(cfg, cohort.truth_dir)
    weights, why = choose_weights(cfg, args.weights)
    if weights == "random":
        print(f"NOTE: the demo runs encoder {cfg.features.encoder} with RANDOM weights (recorded in every bag and run "
              f"as features.weights=random) because {why}.", flush=True)
    cfg = cfg.with_overrides({"features.weights": weights})
    outcome = run_cohort(cohort.slides_dir, cohort.labels_csv, out, cfg)
    print(summary_markdown(outcome))
    minutes = (time.perf_counter() - started) / 60
    print(f"Done in {minutes:.1f} min ({StageClock.cpu() - cpu:.0f} s CPU). Where the time went:")
    print(f"  {'synthesis':<22} {synth[0]:7.1f} s wall {synth[1]:7.1f} s CPU")
    if outcome.clock is not None:
        print(outcome.clock.table())
    print("Where to look:")
    print(f"  summary table     {outcome.summary_md}")
    print(f"  per-slide results {Layout(out).results_dir}/<model>/predictions.csv")
    print(f"  heatmaps          {Layout(out).heatmaps_root}/<model>/<run>/<slide>.png (+ .geojson for QuPath)")
    print(f"  trained models    wsi-mil runs {out}")
    print(f"  QC images         {Layout(out).qc_dir}")
    print(f"  MLflow UI         wsi-mil ui {out}   (or: mlflow {' '.join(ui_command(Layout(out), 5000)[1:])})")
    return 0
