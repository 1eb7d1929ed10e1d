"""Tissue detection and patch selection against ground truth, on a held-out synthetic cohort with artefacts.

The cohort (``wsi-mil synth --artefacts``: marker ink of four colours, blur, folds; seed 101, never
used by tests or the demo) is tiled the way ``wsi-mil tile`` plans it: thumbnail, tissue mask, patch
grid. For each ``tiling.tissue_threshold`` it reports, pooled over slides (area-weighted):

- coverage: share of the true tissue lying inside kept patches (goal >= 0.85),
- background: share of the kept patches' area that is not true tissue - glass, fat interiors, ink
  (goal <= 0.12),
- ink: share of the kept patches' area lying on marker ink,

and the worst slide for each. Ground truth is the generator's tissue mask (ink is never tissue).

    python benchmarks/tissue.py [--slides 10 --size 8192 --mpp 0.25]   # the `wsi-mil synth` defaults

Last lines: ``RESULT tissue_coverage <value>`` and ``RESULT tissue_background_share <value>`` at the
default threshold.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_mil.config import Config, TilingConfig
from wsi_mil.slides import open_slide, read_thumbnail
from wsi_mil.synth import generate_cohort, load_truth
from wsi_mil.synth.fields import make_fields
from wsi_mil.tiling import patch_grid
from wsi_mil.tissue import TissueParams, detect_tissue, thumbnail_mpp

THRESHOLDS = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
GOALS = {"coverage": 0.85, "background": 0.12}


@dataclass
class SlideCase:
    slide_id: str
    width: int
    height: int
    mpp: float
    mask: np.ndarray  # detected tissue on the thumbnail
    truth: np.ndarray  # true tissue at truth_ds level-0 px per pixel
    ink: np.ndarray  # marker ink on the truth grid
    truth_ds: float


def _load(cohort, slide_id: str, params: TissueParams) -> SlideCase:
    truth = load_truth(cohort.truth_dir, slide_id)
    meta = json.loads((cohort.truth_dir / f"{slide_id}.json").read_text())
    fields = make_fields(truth.width, truth.height, int(meta["seed"]), truth.mpp, meta["tumour"],
                         tuple(meta["artefacts"]))
    reader = open_slide(cohort.slides_dir / f"{slide_id}.svs")
    thumb = read_thumbnail(reader, truth.mpp, thumbnail_mpp(truth.width, truth.height, truth.mpp, params))
    um_per_px = truth.mpp * truth.width / thumb.shape[1]
    return SlideCase(slide_id, truth.width, truth.height, truth.mpp, detect_tissue(thumb, um_per_px, params).mask,
                     truth.tissue_mask, fields.pen > 0.3, truth.downsample)


def _kept_area(case: SlideCase, coords: np.ndarray, size0: float) -> np.ndarray:
    """Kept patches rasterised on the truth grid."""
    kept = np.zeros(case.truth.shape, bool)
    for x, y in coords:
        c0, r0 = int(round(x / case.truth_ds)), int(round(y / case.truth_ds))
        c1, r1 = int(round((x + size0) / case.truth_ds)), int(round((y + size0) / case.truth_ds))
        kept[r0:r1, c0:c1] = True
    return kept


def measure(cases: list[SlideCase], tiling: TilingConfig) -> dict[str, float]:
    tissue = covered = kept_px = background = ink = 0.0
    worst_cov, worst_bg = 1.0, 0.0
    for case in cases:
        coords, _ = patch_grid(case.mask, case.width, case.height, case.mpp, tiling)
        size0 = tiling.patch_size * tiling.target_mpp / case.mpp
        kept = _kept_area(case, coords, size0)
        t, c, k = case.truth.sum(), (kept & case.truth).sum(), kept.sum()
        b, i = (kept & ~case.truth).sum(), (kept & case.ink).sum()
        tissue, covered, kept_px, background, ink = tissue + t, covered + c, kept_px + k, background + b, ink + i
        worst_cov = min(worst_cov, c / t if t else 1.0)
        worst_bg = max(worst_bg, b / k if k else 0.0)
    return {"coverage": covered / tissue, "background": background / max(kept_px, 1), "ink": ink / max(kept_px, 1),
            "worst_coverage": worst_cov, "worst_background": worst_bg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsi-mil-bench/tissue"))
    parser.add_argument("--slides", type=int, default=10)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--mpp", type=float, default=0.25)
    args = parser.parse_args()

    started = time.perf_counter()
    cohort = generate_cohort(args.work / f"cohort-{args.size}-{args.mpp}", n_slides=args.slides, seed=101,
                             size=args.size, tumour="mixed", artefacts=True, mpp=args.mpp)
    cfg = Config()
    params = TissueParams.from_config(cfg.tissue)
    cases = [_load(cohort, sid, params) for sid in cohort.slide_ids]
    with_ink = sum(c.ink.any() for c in cases)
    print(f"{len(cases)} held-out synthetic slides ({args.size} px at {args.mpp} um/px, {with_ink} with marker ink), "
          f"patches {cfg.tiling.patch_size} px at {cfg.tiling.target_mpp} um/px, tissue preset "
          f"'{cfg.tissue.preset}' ({time.perf_counter() - started:.0f} s to generate and segment)")
    print(f"{'tissue_threshold':>16} {'coverage':>9} {'background':>11} {'ink':>7} {'worst cov':>10} {'worst bg':>9}")
    default = cfg.tiling.tissue_threshold
    results = {}
    for threshold in sorted({*THRESHOLDS, default}):
        r = measure(cases, cfg.tiling.model_copy(update={"tissue_threshold": threshold}))
        results[threshold] = r
        ok = r["coverage"] >= GOALS["coverage"] and r["background"] <= GOALS["background"]
        mark = " <- default" if threshold == default else ""
        print(f"{threshold:>16.2f} {r['coverage']:>9.3f} {r['background']:>11.3f} {r['ink']:>7.4f} "
              f"{r['worst_coverage']:>10.3f} {r['worst_background']:>9.3f} {'meets both goals' if ok else ''}{mark}")
    r = results[default]
    print(f"RESULT tissue_coverage {r['coverage']:.3f}")
    print(f"RESULT tissue_background_share {r['background']:.3f}")


if __name__ == "__main__":
    main()
