"""Synthetic slide cohort generator with ground truth: the offline stand-in for CAMELYON16.

Real pyramidal slides that OpenSlide opens (Aperio SVS by default, generic tiled TIFF as option),
H&E-like tissue rendered from low-resolution fields, tumour recognisable only by nuclear morphology,
ground-truth masks (PNG) and outlines (GeoJSON, level-0 px), and ``labels.csv`` with patients.
Same seed, byte-identical files. Implementation in :mod:`wsi_mil.synth`.

Layout written by :func:`generate_cohort`::

    OUT/slides/<id>.svs|.tiff
    OUT/truth/<id>.json                 label, width, height, mpp, downsample, tumour_fraction, seed, artefacts
    OUT/truth/<id>_tissue.png, _tumour.png          uint8 0/255 masks at `downsample`
    OUT/truth/<id>_tissue.geojson, _tumour.geojson  Polygons in level-0 pixel coordinates
    OUT/labels.csv                      slide_id,label(tumor|normal),patient_id
"""

from __future__ import annotations

import argparse
import logging

from wsi_mil.config import Config
from wsi_mil.synth.cohort import (
    FORMATS,
    MIN_SIZE,
    Cohort,
    SlideTruth,
    generate_cohort,
    load_truth,
    mask_geojson,
    plan_cohort,
    save_truth,
    write_slide,
)
from wsi_mil.synth.fields import ARTEFACTS, TUMOUR_KINDS

__all__ = [
    "ARTEFACTS", "FORMATS", "MIN_SIZE", "TUMOUR_KINDS", "Cohort", "SlideTruth", "cli_synth", "generate_cohort",
    "load_truth", "mask_geojson", "plan_cohort", "save_truth", "write_slide",
]

log = logging.getLogger(__name__)


def cli_synth(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil synth OUT ...`: generate a cohort and print what was written."""
    cohort = generate_cohort(args.out, n_slides=args.slides, seed=args.seed, size=args.size, fmt=args.format,
                             tumour=args.tumour, positive_fraction=args.positive_fraction,
                             artefacts=args.artefacts, mpp=args.mpp)
    ext = FORMATS[args.format]
    print(f"wrote {len(cohort.slide_ids)} synthetic slides ({args.size}x{args.size} px, {args.mpp} um/px) to {cohort.root}")
    n_pos = 0
    for sid in cohort.slide_ids:
        truth = load_truth(cohort.truth_dir, sid)
        n_pos += truth.label
        kind = "tumor " if truth.label else "normal"
        print(f"  {cohort.slides_dir / (sid + ext)}  {kind}  tumour {100 * truth.tumour_fraction:.2f}% of tissue")
    print(f"  labels: {cohort.labels_csv} ({n_pos} tumor, {len(cohort.slide_ids) - n_pos} normal)")
    print(f"  ground truth (masks, GeoJSON): {cohort.truth_dir}")
    return 0
