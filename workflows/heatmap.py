"""`wsi-mil heatmap --run RUN_ID`: per-slide heatmaps of a trained run from its saved features.

Scores come from the fold model that held the slide out as test (attention of ABMIL/TransMIL/DSMIL/
MHIM students, instance probabilities of INS); nothing is re-extracted. Outputs per slide go to
``OUT/heatmaps/<model>/<run>/`` (``<run>``: the run id's first 8 characters) and are attached to the MLflow run as
``heatmaps/<label>/<slide>__p<probability>.png`` (and ``.geojson``, ``_topk.png``, ``_heatmap.tif``):
the slide's true class, and that fold model's probability of the positive class (binary) or of the
slide's class. When instance ground truth exists (``training.annotations_dir``), the localisation AUC
of the scores is logged too (``heatmap/localisation_auc``).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from wsi_mil import stores
from wsi_mil.annotations import load_instance_labels
from wsi_mil.config import Config, HeatmapConfig, SlidesConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.heatmaps import SlideHeatmap, render_slide_heatmap
from wsi_mil.heatmaps.normalise import cohort_bounds, comparable_scores, resolve_method
from wsi_mil.layout import Layout, path_component, slide_file
from wsi_mil.mil.base import BagItem
from wsi_mil.mil.checkpoints import LoadedFold, load_fold_method, load_run_splits
from wsi_mil.mil.metrics import instance_auc, predict_labels
from wsi_mil.mil.splits import fold_ids
from wsi_mil.slides import locate_slide, slide_thumbnail
from wsi_mil.tracking import FoldRun, Tracker, open_tracker

log = logging.getLogger(__name__)


@dataclass
class RunHeatmaps:
    """Heatmaps drawn for one run and, where ground truth exists, their localisation AUC."""

    run_id: str
    slides: list[SlideHeatmap] = field(default_factory=list)
    localisation_auc: float = float("nan")
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    directory: Path | None = None  # OUT/heatmaps/<model>/<run>/


def _features_dir(tracker: Tracker, parent: str) -> Path:
    """The features directory the run trained on."""
    tags = tracker.get_run(parent).tags
    directory = Path(tags["wsi_mil.features_dir"]) if "wsi_mil.features_dir" in tags else None
    if directory is None or not directory.is_dir():
        raise WsiMilError(f"MLflow run {parent} records no existing features directory; rerun `wsi-mil extract`.")
    return directory


def _tissue_mask(layout: Layout, slide_id: str) -> np.ndarray | None:
    path = layout.qc_image(slide_id, "mask")
    return np.asarray(Image.open(path).convert("L")) > 127 if path.is_file() else None


def _instance_labels(cfg: Config, slide_id: str, coords: np.ndarray, size0: float, label: int | None) -> np.ndarray | None:
    directory = cfg.training.annotations_dir
    if directory is None:
        return None
    return load_instance_labels(Path(directory), slide_id, coords, size0, cfg.training.instance_threshold,
                                normal_slide=label == 0, rules=cfg.training.annotations)


def bag_item(bag: stores.Bag, slide_id: str, device: torch.device | str = "cpu") -> BagItem:
    """A stored bag as a method's input (label unknown: -1)."""
    return BagItem(slide_id, torch.as_tensor(bag.features, dtype=torch.float32, device=device), -1, bag.coords)


def heatmap_artifact_name(slide_id: str, label: str, prob: float, file: Path) -> str:
    """The MLflow artifact name of one heatmap file.

    ``<label>/<slide>__p<prob>`` and what follows the slide id in the file's name (``.png``,
    ``.geojson``, ``_topk.png``, ``_heatmap.tif``); ``prob`` with two decimals.
    """
    name = Path(file).name
    rest = name[len(slide_id):] if name.startswith(slide_id) else Path(file).suffix
    folder = re.sub(r"[^\w.-]+", "_", label) or "unlabelled"
    return f"{folder}/{slide_id}__p{prob:.2f}{rest}"


def log_heatmaps(tracker: Tracker, run_id: str, drawn: list[tuple[SlideHeatmap, str, float]], artifact_dir: str) -> None:
    """Attach each slide's heatmap files to ``run_id`` under ``artifact_dir/<label>/<slide>__p<prob>...``.

    ``drawn`` holds (files, label, probability) per slide.
    """
    if not drawn:
        return
    with tempfile.TemporaryDirectory(prefix="wsi-mil-heatmaps-") as tmp:
        for files, label, prob in drawn:
            for path in (files.png, files.geojson, files.montage, files.tiff):
                if path is not None and Path(path).is_file():
                    target = Path(tmp) / heatmap_artifact_name(files.slide_id, label, prob, Path(path))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
        tracker.log_artifact(run_id, Path(tmp), artifact_dir)


def slide_title(slide_id: str, truth: str, probs: np.ndarray, classes: list[str], threshold: float | None,
                model_name: str, fold: FoldRun, in_test_fold: bool) -> str:
    """A heatmap's title: the slide, its true label, the prediction and its probability, the fold model.

    ``probs`` float [C] of the fold model; binary: the predicted class is the second one when its
    probability reaches ``threshold`` (0.5 without one), and that probability is shown.
    """
    role = "test fold" if in_test_fold else "not in any test fold"
    guess = prediction_text(probs, classes, threshold)
    return f"{slide_id}: true {truth}, {guess}\n{model_name}, seed {fold.seed} fold {fold.fold} model ({role})"


def prediction_text(probs: np.ndarray, classes: list[str], threshold: float | None) -> str:
    """``predicted <class> (p(<positive>) = 0.620, threshold 0.629)``: a heatmap title's prediction part.

    ``probs`` float [C]; binary: the second class is predicted when its probability reaches
    ``threshold`` (0.5 without one); more classes: the largest probability, shown without a threshold.
    """
    pred = int(predict_labels(probs[None, :], threshold)[0]) if len(probs) else 0
    name = classes[pred] if pred < len(classes) else str(pred)
    if len(probs) == 2 and len(classes) == 2:
        cut = 0.5 if threshold is None else threshold
        return f"predicted {name} (p({classes[1]}) = {probs[1]:.3f}, threshold {cut:.3f})"
    return f"predicted {name} (p = {probs[pred]:.3f})" if len(probs) else "no prediction"


def predict_title(slide_id: str, probs: np.ndarray, classes: list[str], threshold: float | None,
                  model_name: str, n_folds: int) -> str:
    """A `wsi-mil predict` heatmap's title: the slide, the prediction, its probability and threshold, the model.

    Like :func:`slide_title` without the true label (unknown for new slides); ``probs`` float [C] is
    the mean over the ``n_folds`` fold models and ``threshold`` the ensemble's (median of the folds').
    """
    guess = prediction_text(np.asarray(probs, dtype=np.float64).reshape(-1), classes, threshold)
    return f"{slide_id}: {guess}\n{model_name}, mean of {n_folds} fold models"


def draw_slide(slide_id: str, bag: stores.Bag, scores: np.ndarray, out_dir: Path, hcfg: HeatmapConfig, layout: Layout,
               *, title: str, model_name: str, run_id: str, slides_dir: Path | None = None,
               slides_cfg: SlidesConfig | None = None, bounds: tuple[float, float] | None = None) -> SlideHeatmap:
    """Render one slide's heatmap files from its bag (coordinates, slide path, patch store) and scores.

    The slide is read where the bag recorded it, or found by id in ``slides_dir`` (slides that moved).
    ``bounds``: the cohort scale (see :func:`wsi_mil.heatmaps.render_slide_heatmap`).
    """
    attrs = bag.attrs
    slides_cfg = slides_cfg or SlidesConfig()
    path = locate_slide(slide_id, attrs.get("slide_path"), slides_dir, slides_cfg, attrs.get("slide_fingerprint"))
    thumb, downsample = slide_thumbnail(path, max_size=hcfg.thumbnail_max_size, cfg=slides_cfg)
    patches = None
    if attrs.get("patch_store") and stores.is_complete_store(Path(attrs["patch_store"])):
        patches = stores.open_patch_store(Path(attrs["patch_store"])).patches
    return render_slide_heatmap(
        slide_id=slide_id, coords=bag.coords, scores=scores, patch_size_level0=float(attrs["patch_size_level0"]),
        thumbnail=thumb, downsample=downsample, out_dir=out_dir, cfg=hcfg, tissue_mask=_tissue_mask(layout, slide_id),
        patches=patches, title=title,
        score_label="instance probability" if resolve_method("auto", model_name) == "absolute" else "attention",
        mpp_level0=attrs.get("mpp_level0"), properties={"model": model_name, "run_id": run_id},
        model_name=model_name, bounds=bounds,
    )


def heatmaps_for_run(run_id: str, out: Path, cfg: Config, *, slide_ids: list[str] | None = None,
                     log_artifacts: bool = True, slides_dir: Path | None = None) -> RunHeatmaps:
    """Draw heatmaps for ``slide_ids`` (default: every fold's test slides) of a `wsi-mil train` run.

    Each slide is scored by the fold model that held it out as test, from its saved bag. Slides are
    read with this call's ``cfg.slides`` settings, and found by id in ``slides_dir`` when given. The
    scale is ``cfg.heatmap.normalize`` (``auto``: absolute 0-1 for instance probabilities; for
    attention one cohort scale from every test slide of the run, so a slide looks the same whether
    drawn alone or with the others).

    Parameters
    ----------
    run_id : str
        A `wsi-mil train` parent run or one of its fold runs.
    out : Path
        Output directory of that run; files go to ``OUT/heatmaps/<model>/<run>/``.
    cfg : Config
        ``heatmap`` settings, the tracking URI, and ``training.annotations_dir`` for the localisation AUC.
    slide_ids : list of str, optional
        Slides to draw (default: every fold's test slides).
    log_artifacts : bool
        Attach the files (and the localisation AUC) to the MLflow run.
    slides_dir : Path, optional
        Where to find slides that moved since tiling (by id; their fingerprint is checked).

    Returns
    -------
    RunHeatmaps
        The files per slide, the per-patch scores float64 [N] per slide, the instance labels where
        ground truth exists, and the pooled localisation AUC (NaN without ground truth).

    Raises
    ------
    WsiMilError
        When the run, its checkpoints, its features directory or a bag cannot be read, or a slide id
        cannot name a file (:func:`wsi_mil.layout.path_component`; checked before anything is read).
    """
    for sid in slide_ids or []:
        path_component(sid)
    out = Path(out)
    layout = Layout(out)
    tracker = open_tracker(out, cfg, create=False)
    parent = tracker.parent_of(run_id)
    run_cfg = tracker.load_config(parent)
    if cfg.training.annotations_dir is not None:
        run_cfg = run_cfg.with_overrides({"training.annotations_dir": str(cfg.training.annotations_dir),
                                          "training.annotations": cfg.training.annotations.model_dump()})
    hcfg = cfg.heatmap
    folds = tracker.fold_runs(parent)
    splits = load_run_splits(tracker, parent)
    y_of = dict(zip(splits["slide_id"], splits["y"].astype(int), strict=False))
    # each slide is scored by the model of the first fold that held it out as test
    owner: dict[str, FoldRun] = {}
    for f in folds:
        for sid in fold_ids(splits, f.seed, f.fold, "test"):
            owner.setdefault(sid, f)
    wanted = slide_ids or sorted(owner)
    unknown = [s for s in wanted if s not in owner]
    if unknown:
        log.info("slides %s were in no test fold; scored by the first fold's model", ", ".join(unknown[:5]))
    result = RunHeatmaps(parent)
    device = torch.device("cpu")
    loaded: dict[str, LoadedFold] = {}
    model_name = tracker.get_run(parent).tags.get("wsi_mil.model", run_cfg.model.name)
    target = result.directory = layout.heatmaps_dir(parent, model_name)
    features_dir = _features_dir(tracker, parent)
    named: list[tuple[SlideHeatmap, str, float]] = []
    scored: list[tuple[str, str, str, float]] = []  # slide, title, true label, probability shown
    for sid in tqdm(wanted, desc="heatmap scores", unit="slide", leave=False):
        fold = owner.get(sid, folds[0])
        if fold.run_id not in loaded:
            loaded[fold.run_id] = load_fold_method(tracker, fold.run_id, device="cpu", config=run_cfg)
        model = loaded[fold.run_id]
        bag = stores.read_bag(slide_file(features_dir, sid, ".h5"))
        pred = model.method.predict(bag_item(bag, sid, device))
        result.scores[sid] = np.asarray(pred.instance_scores, dtype=np.float64).reshape(-1)
        y = y_of.get(sid)
        probs = np.asarray(pred.probs, dtype=np.float64).reshape(-1)
        shown = probs[1] if len(probs) == 2 else (probs[y] if y is not None else probs.max())
        truth = model.classes[y] if y is not None else "unlabelled"
        title = slide_title(sid, truth, probs, model.classes, model.threshold, model_name, fold, sid in owner)
        scored.append((sid, title, truth, float(shown)))
        labels = _instance_labels(run_cfg, sid, bag.coords, float(bag.attrs["patch_size_level0"]), y)
        if labels is not None:
            result.labels[sid] = labels
    method = resolve_method(hcfg.normalize, model_name)
    bounds = None
    if method == "cohort" and result.scores:  # one scale: the run's test slides, however many are drawn
        pooled = [comparable_scores(v)[0] for v in result.scores.values()]
        for sid in sorted(set(owner) - set(result.scores)):
            fold = owner[sid]
            if fold.run_id not in loaded:
                loaded[fold.run_id] = load_fold_method(tracker, fold.run_id, device="cpu", config=run_cfg)
            bag = stores.read_bag(slide_file(features_dir, sid, ".h5"))
            pred = loaded[fold.run_id].method.predict(bag_item(bag, sid, device))
            pooled.append(comparable_scores(np.asarray(pred.instance_scores, dtype=np.float64).reshape(-1))[0])
        bounds = cohort_bounds(pooled, (hcfg.percentile_low, hcfg.percentile_high))
    earlier = [sid for sid, *_ in scored if slide_file(target, sid, ".png").is_file()]
    if earlier:
        log.info("redrawing %d heatmap(s) of run %s in %s (maps of other runs are kept in their own folders)",
                 len(earlier), parent, target)
    for sid, title, truth, shown in tqdm(scored, desc="heatmaps", unit="slide", leave=False):
        bag = stores.read_bag(slide_file(features_dir, sid, ".h5"))
        result.slides.append(draw_slide(
            sid, bag, result.scores[sid], target, hcfg, layout, title=title, model_name=model_name,
            run_id=parent, slides_dir=slides_dir, slides_cfg=cfg.slides, bounds=bounds,
        ))
        named.append((result.slides[-1], truth, shown))
    if result.labels:
        result.localisation_auc = instance_auc(result.scores, result.labels)
    if log_artifacts and result.slides:
        log_heatmaps(tracker, parent, named, "heatmaps")
        if np.isfinite(result.localisation_auc):
            tracker.log_metrics(parent, {"heatmap/localisation_auc": result.localisation_auc})
    return result


def cli_heatmap(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil heatmap --run RUN_ID [--slides ID ...] [--slides-dir DIR]`."""
    result = heatmaps_for_run(args.run, args.out, cfg, slide_ids=args.slides or None,
                              slides_dir=getattr(args, "slides_dir", None))
    for drawn in result.slides:
        print(f"{drawn.slide_id}: {drawn.png}  {drawn.geojson}")
    if np.isfinite(result.localisation_auc):
        print(f"localisation AUC (per-patch scores vs ground truth): {result.localisation_auc:.4f}")
    print(f"{len(result.slides)} heatmaps in {result.directory}, logged to MLflow run {result.run_id}")
    return 0
