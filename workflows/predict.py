"""`wsi-mil predict SLIDES_DIR --run RUN_ID | --model URI`: new slides through a trained model.

The model is the fold ensemble of a `wsi-mil train` run (:mod:`wsi_mil.mil.ensemble`), given by the
run id or as an MLflow model (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``).
The slides are tiled and embedded with the tiling and encoder settings the model carries (into
``OUT/predictions/<run or model>/``, apart from the training cohort's files), then scored by every
fold model; the reported probability is the mean over fold models and the decision uses the median
of the folds' validation thresholds (the ``threshold`` column). Heatmap titles give the prediction,
its probability and the threshold; attention maps share one scale across the slides of the call
(``heatmap.normalize: auto``). Writes ``predictions.csv`` and per-slide heatmaps there, and
logs both to the training run under ``predictions/`` (heatmaps as
``predictions/heatmaps/<predicted class>/<slide>__p<probability>.png``).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from wsi_mil.workflows.heatmap import draw_slide, log_heatmaps, predict_title

from wsi_mil import stores
from wsi_mil.config import Config
from wsi_mil.encoders import encoder_key
from wsi_mil.errors import WsiMilError
from wsi_mil.extract import extract_cohort
from wsi_mil.heatmaps.normalise import cohort_bounds, comparable_scores, resolve_method
from wsi_mil.layout import Layout, slide_file, tiling_key
from wsi_mil.mil.ensemble import is_model_uri, load_ensemble
from wsi_mil.mil.methods import method_label
from wsi_mil.tiling import tile_cohort
from wsi_mil.tracking import Tracker, open_tracker

log = logging.getLogger(__name__)


def predictions_key(tracker: Tracker, source: str) -> str:
    """The folder name of a model's predictions: the parent run id, or the model URI made path-safe."""
    if is_model_uri(source):
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", source.split(":/", 1)[1]).strip("_")
    return tracker.parent_of(source)


def predict_slides(source: str, slides_dir: Path, out: Path, cfg: Config) -> pd.DataFrame:
    """Predict every slide of ``slides_dir`` with a trained model (see the module docstring).

    Parameters
    ----------
    source : str
        A `wsi-mil train` parent run id (or one of its fold runs), or an MLflow model URI
        (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``).
    slides_dir : Path
        Directory of new slides; tiled and embedded with the model's recorded settings.
    out : Path
        Output directory holding the MLflow store (or set ``tracking.uri``); the new slides' files go
        to ``OUT/predictions/<run or model>/``.
    cfg : Config
        The tracking URI, ``compute.scheduler``, ``features.device`` and the ``heatmap`` settings.

    Returns
    -------
    pandas.DataFrame
        One row per slide: ``slide_id``, ``prob_<class>`` (mean over the fold models), ``threshold``
        (binary: the median of the folds' thresholds; ``pred`` is the positive class when its
        probability reaches it; empty for more classes), ``pred``, ``n_patches``, ``heatmap``; or ``error`` for a slide that failed. Also written to
        ``predictions.csv`` and logged to the training run under ``predictions/``.

    Raises
    ------
    WsiMilError
        When the run or model cannot be read or no slide could be predicted.
    """
    out = Path(out)
    tracker = open_tracker(out, cfg, create=False)
    ensemble, run_id = load_ensemble(tracker, source)
    run_cfg = ensemble.config.with_overrides(
        {"compute.scheduler": cfg.compute.scheduler, "features.device": cfg.features.device,
         **{f"slides.{k}": v for k, v in cfg.slides.model_dump(mode="json").items()}}  # this call's slide settings
    )
    work = Layout(out).predictions_dir(predictions_key(tracker, source))
    layout = Layout(work)
    tiling = tile_cohort(Path(slides_dir), work, run_cfg)
    # only this call's slides: the folder may hold stores and bags of earlier calls with other slides
    extraction = extract_cohort(work, run_cfg, slide_ids=[r.slide_id for r in tiling.ok])
    classes = ensemble.classes
    features_dir = layout.features_dir(tiling_key(run_cfg), encoder_key(run_cfg.features))
    model_name = method_label(run_cfg)
    rows, drawn, scored = [], [], []
    for result in extraction.done + extraction.reused:
        bag = stores.read_bag(slide_file(features_dir, result.slide_id, ".h5"))
        pred = ensemble.predict(bag.features, slide_id=result.slide_id)
        scored.append((result.slide_id, bag, pred))
    bounds = None
    if resolve_method(cfg.heatmap.normalize, model_name) == "cohort" and scored:
        # one scale for the slides of this call, as training heatmaps share one for the run's test slides
        pooled = [comparable_scores(np.asarray(p.instance_scores, dtype=np.float64).reshape(-1))[0] for _, _, p in scored]
        bounds = cohort_bounds(pooled, (cfg.heatmap.percentile_low, cfg.heatmap.percentile_high))
    for slide_id, bag, pred in scored:
        title = predict_title(slide_id, pred.probs, classes, pred.threshold, model_name, len(ensemble.folds))
        heatmap = draw_slide(slide_id, bag, pred.instance_scores, layout.heatmaps_root, cfg.heatmap, layout,
                             title=title, model_name=model_name, run_id=run_id or source,
                             slides_dir=Path(slides_dir), slides_cfg=run_cfg.slides, bounds=bounds)
        shown = pred.probs[1] if len(classes) == 2 else pred.probs[classes.index(pred.label)]
        drawn.append((heatmap, pred.label, float(shown)))
        rows.append({"slide_id": slide_id,
                     **{f"prob_{c}": float(p) for c, p in zip(classes, pred.probs, strict=True)},
                     "threshold": pred.threshold, "pred": pred.label, "n_patches": len(bag.coords),
                     "heatmap": str(heatmap.png)})
    failed = [(r.slide_id, r.error) for r in tiling.failed] + [(r.slide_id, r.error) for r in extraction.failed]
    for slide_id, error in failed:
        rows.append({"slide_id": slide_id, "pred": "", "error": error})
    if not rows:
        raise WsiMilError(f"no slide of {slides_dir} could be predicted; see {layout.slides_csv}.")
    frame = pd.DataFrame(rows)
    csv = layout.predictions_csv
    stores.write_text_atomic(csv, frame.to_csv(index=False))
    if run_id is not None:
        tracker.log_artifact(run_id, csv, "predictions")
        log_heatmaps(tracker, run_id, drawn, "predictions/heatmaps")
    return frame


def cli_predict(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil predict SLIDES_DIR|--slides-dir SLIDES_DIR --run RUN_ID | --model URI [--out OUT]`."""
    slides_dir = args.slides_dir or getattr(args, "slides_dir_option", None)
    if slides_dir is None:
        raise WsiMilError("wsi-mil predict needs the folder of slides to predict: pass SLIDES_DIR or --slides-dir DIR.")
    source = args.model_uri or args.run
    frame = predict_slides(source, slides_dir, args.out, cfg)
    print(frame.drop(columns=[c for c in ("heatmap",) if c in frame]).to_string(index=False))
    key = predictions_key(open_tracker(args.out, cfg, create=False), source)
    print(f"predictions and heatmaps in {Layout(args.out).predictions_dir(key)}")
    return 1 if "error" in frame and frame["error"].notna().any() else 0
