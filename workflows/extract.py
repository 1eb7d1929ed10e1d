"""`wsi-mil extract OUT`: embed the patch stores of a tiled output directory into HDF5 feature bags."""

from __future__ import annotations

import argparse
import logging

from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.extract import extract_cohort

log = logging.getLogger(__name__)


def cli_extract(args: argparse.Namespace, cfg: Config) -> int:
    """Run the extractor over ``args.out``; exit 0 when every slide has a bag, 1 when some failed.

    ``--encoder/--weights/--batch-size/--device`` arrive through ``cfg.features`` and ``--scheduler``
    through ``cfg.compute.scheduler`` (see :mod:`wsi_mil.extract` for the Dask scale-out).
    """
    out = args.out
    if not out.is_dir():
        raise WsiMilError(f"output directory {out} does not exist; run `wsi-mil tile SLIDES --out {out}` first.")
    report = extract_cohort(out, cfg, strict=bool(getattr(args, "strict", False)))
    print(report.summary())
    return 1 if report.failed else 0
