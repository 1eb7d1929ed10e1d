"""`wsi-mil synth OUT`: generate a synthetic slide cohort with ground truth (see :mod:`wsi_mil.synth`)."""

from __future__ import annotations

import argparse

from wsi_mil.config import Config
from wsi_mil.synth import FORMATS, generate_cohort, load_truth


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
