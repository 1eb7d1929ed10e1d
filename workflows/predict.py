"""`wsi-mil predict --run RUN_ID SLIDES_DIR`: new slides through a trained run.

The slides are tiled and embedded with the tiling and encoder settings recorded in the run (into
``OUT/predictions/<run>/``, apart from the training cohort's files), then scored by every fold model
of the run; the reported probability is the mean over fold models and the decision uses the median
of the folds' validation thresholds. Writes ``predictions.csv`` and per-slide heatmaps there, and
logs both to the run under ``predictions/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from wsi_mil.workflows.heatmap import bag_item, draw_slide

from wsi_mil import stores
from wsi_mil.config import Config
from wsi_mil.encoders import encoder_key
from wsi_mil.errors import WsiMilError
from wsi_mil.extract import extract_cohort
from wsi_mil.layout import Layout, slide_file, tiling_key
from wsi_mil.mil.checkpoints import load_fold_method
from wsi_mil.tiling import tile_cohort
from wsi_mil.tracking import open_tracker

log = logging.getLogger(__name__)


def predict_slides(run_id: str, slides_dir: Path, out: Path, cfg: Config) -> pd.DataFrame:
    """Predict every slide of ``slides_dir`` with the fold models of ``run_id`` (see the module docstring).

    Parameters
    ----------
    run_id : str
        A `wsi-mil train` parent run (or one of its fold runs).
    slides_dir : Path
        Directory of new slides; tiled and embedded with the run's recorded settings.
    out : Path
        Output directory of the run; the new slides' files go to ``OUT/predictions/<run>/``.
    cfg : Config
        The tracking URI, ``compute.scheduler``, ``features.device`` and the ``heatmap`` settings.

    Returns
    -------
    pandas.DataFrame
        One row per slide: ``slide_id``, ``prob_<class>`` (mean over the fold models), ``pred``,
        ``n_patches``, ``heatmap``; or ``error`` for a slide that failed. Also written to
        ``predictions.csv`` and logged to the run under ``predictions/``.

    Raises
    ------
    WsiMilError
        When the run cannot be read or no slide could be predicted.
    """
    out = Path(out)
    tracker = open_tracker(out, cfg)
    parent = tracker.parent_of(run_id)
    run_cfg = tracker.load_config(parent).with_overrides(
        {"compute.scheduler": cfg.compute.scheduler, "features.device": cfg.features.device,
         **{f"slides.{k}": v for k, v in cfg.slides.model_dump(mode="json").items()}}  # this call's slide settings
    )
    work = Layout(out).predictions_dir(parent)
    layout = Layout(work)
    tiling = tile_cohort(Path(slides_dir), work, run_cfg)
    extraction = extract_cohort(work, run_cfg)
    folds = [load_fold_method(tracker, f.run_id, device="cpu", config=run_cfg) for f in tracker.fold_runs(parent)]
    classes = folds[0].classes
    thresholds = [f.threshold for f in folds if f.threshold is not None]
    threshold = float(np.median(thresholds)) if thresholds else None
    features_dir = layout.features_dir(tiling_key(run_cfg), encoder_key(run_cfg.features))
    model_name = tracker.get_run(parent).tags.get("wsi_mil.model", run_cfg.model.name)
    rows = []
    for result in extraction.done + extraction.reused:
        bag = stores.read_bag(slide_file(features_dir, result.slide_id, ".h5"))
        item = bag_item(bag, result.slide_id)
        preds = [f.method.predict(item) for f in folds]
        probs = np.mean([p.probs for p in preds], axis=0)
        scores = np.mean([np.asarray(p.instance_scores, dtype=np.float64) for p in preds], axis=0)
        if len(classes) == 2 and threshold is not None:
            pred = classes[int(probs[1] >= threshold)]
        else:
            pred = classes[int(np.argmax(probs))]
        drawn = draw_slide(result.slide_id, bag, scores, layout.heatmaps_root, cfg.heatmap, layout,
                           title=f"{result.slide_id} - {model_name}, mean of {len(folds)} fold models",
                           model_name=model_name, run_id=parent, slides_dir=Path(slides_dir),
                           slides_cfg=run_cfg.slides)
        rows.append({"slide_id": result.slide_id, **{f"prob_{c}": float(p) for c, p in zip(classes, probs, strict=True)},
                     "pred": pred, "n_patches": len(bag.coords), "heatmap": str(drawn.png)})
    failed = [(r.slide_id, r.error) for r in tiling.failed] + [(r.slide_id, r.error) for r in extraction.failed]
    for slide_id, error in failed:
        rows.append({"slide_id": slide_id, "pred": "", "error": error})
    if not rows:
        raise WsiMilError(f"no slide of {slides_dir} could be predicted; see {layout.slides_csv}.")
    frame = pd.DataFrame(rows)
    csv = layout.predictions_csv
    stores.write_text_atomic(csv, frame.to_csv(index=False))
    tracker.log_artifact(parent, csv, "predictions")
    if layout.heatmaps_root.is_dir():
        tracker.log_artifact(parent, layout.heatmaps_root, "predictions/heatmaps")
    return frame


def cli_predict(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil predict --run RUN_ID SLIDES_DIR|--slides-dir SLIDES_DIR [--out OUT]`."""
    slides_dir = args.slides_dir or getattr(args, "slides_dir_option", None)
    if slides_dir is None:
        raise WsiMilError("wsi-mil predict needs the folder of slides to predict: pass SLIDES_DIR or --slides-dir DIR.")
    frame = predict_slides(args.run, slides_dir, args.out, cfg)
    print(frame.drop(columns=[c for c in ("heatmap",) if c in frame]).to_string(index=False))
    print(f"predictions and heatmaps in {Layout(args.out).predictions_dir(open_tracker(args.out, cfg).parent_of(args.run))}")
    return 1 if "error" in frame and frame["error"].notna().any() else 0
