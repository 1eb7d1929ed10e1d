"""`wsi-mil tile SLIDES_DIR --out OUT`: tissue detection and patch extraction for a slide directory."""

from __future__ import annotations

import argparse
import logging
import sys

from wsi_mil.config import Config
from wsi_mil.layout import Layout
from wsi_mil.tiling import tile_cohort

log = logging.getLogger(__name__)


def cli_tile(args: argparse.Namespace, cfg: Config) -> int:
    """Tile every slide; exit 0 when all are done, 1 when some failed (see OUT/slides.csv), 2 on --strict."""
    report = tile_cohort(args.slides_dir, args.out, cfg, strict=bool(getattr(args, "strict", False)))
    print(report.summary(), file=sys.stdout)
    if report.failed:
        print(f"{len(report.failed)} slide(s) failed; their errors are in {Layout(args.out).slides_csv}.", file=sys.stderr)
        return 1
    return 0
