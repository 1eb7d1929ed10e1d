"""Physical resolution (microns per pixel, MPP) you can trust.

Every source is checked against the range a microscope scan can have (``slides.mpp_range``,
default 0.05-20 um/px: below 0.05 um/px is far past the optical resolution of any objective, above
20 um/px is coarser than a 0.5x overview). A value outside it, or one that equals a file writer's
default (72, 96 or 300 dpi, 1 px per cm, inch or mm), is not a scan resolution: the slide is then
treated as having no MPP, with the reason kept for ``slides.csv``, and ``slides.mpp_override_csv`` or
``slides.default_mpp`` decide; without them the slide fails with a sentence naming both.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from wsi_mil.config import SlidesConfig
from wsi_mil.errors import ConfigError, SlideError
from wsi_mil.layout import unsafe_name_reason
from wsi_mil.slides.ids import id_from_text
from wsi_mil.slides.readers import DeclaredMpp, SlideReader

log = logging.getLogger(__name__)

# um/px values that are TIFF/PNG/JPEG writers' defaults, never a scanner's resolution
WRITER_DEFAULTS_UM = {
    25400.0 / 72: "72 dpi",
    25400.0 / 96: "96 dpi",
    25400.0 / 300: "300 dpi",
    10000.0: "1 pixel per centimetre",
    25400.0: "1 pixel per inch",
    1000.0: "1 pixel per millimetre",
}
_DEFAULT_TOLERANCE = 0.005  # PNG stores px per metre: 2835 px/m is 72.009 dpi


@dataclass(frozen=True)
class MppResolution:
    """The level-0 MPP used for a slide.

    ``source`` is ``override`` (slides.mpp_override_csv), ``slide`` (the file's own, plausible value)
    or ``default`` (slides.default_mpp); ``note`` says why the file's own value was not used ("" when
    it was, or when the file's value agrees with nothing to say).
    """

    mpp: float
    source: str
    note: str = ""


def implausible(value: float, cfg: SlidesConfig) -> str | None:
    """Why ``value`` (um/px) is not a microscope scan resolution, or None when it is plausible."""
    low, high = cfg.mpp_range
    if not (math.isfinite(value) and value > 0):
        return f"{value!r} is not a positive number"
    for reference, name in WRITER_DEFAULTS_UM.items():
        if abs(value / reference - 1.0) < _DEFAULT_TOLERANCE:
            return f"{value:.6g} um/px is {name}, a file writer's default rather than a scan resolution"
    if value < low:
        hint = ""
        if low <= value * 1000 <= high:
            hint = f"; it looks like millimetres ({value * 1000:.4g} um/px) - if so, give that as an override"
        return f"{value:.6g} um/px is finer than any microscope scan (below slides.mpp_range {low}){hint}"
    if value > high:
        return f"{value:.6g} um/px is coarser than a microscope scan (above slides.mpp_range {high})"
    return None


def trusted_mpp(declared: DeclaredMpp, cfg: SlidesConfig) -> tuple[float | None, str]:
    """The file's own MPP when plausible, else None and the reason (from where, what is wrong)."""
    values = [v for v in (declared.x, declared.y) if v is not None]
    if not values:
        return None, declared.source
    for value in values:
        reason = implausible(value, cfg)
        if reason is not None:
            return None, f"{declared.source}: {reason}"
    if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * max(values):
        log.warning("%s: MPP x %.5f and y %.5f differ; using their mean", declared.source, *values)
    return float(sum(values) / len(values)), ""


@lru_cache(maxsize=8)
def _read_overrides(csv_path: str, mtime_ns: int, extensions: tuple[str, ...], low: float, high: float) -> dict[str, float]:
    overrides: dict[str, float] = {}
    where = f"slides.mpp_override_csv {csv_path}"
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"slide_id", "mpp"} <= {f.strip() for f in reader.fieldnames}:
            raise ConfigError(f"{where} must have the columns slide_id,mpp.")
        for line, row in enumerate(reader, start=2):
            row = {str(k).strip(): v for k, v in row.items()}
            try:
                value = float(row["mpp"])
            except (TypeError, ValueError):
                raise ConfigError(f"{where} line {line}: mpp {row['mpp']!r} is not a number.") from None
            if not low <= value <= high:
                raise ConfigError(
                    f"{where} line {line}: mpp {value:g} um/px lies outside slides.mpp_range [{low}, {high}]; give "
                    "microns per pixel, e.g. 0.25 (40x) or 0.5 (20x)."
                )
            sid = id_from_text(row["slide_id"] or "", extensions)
            unsafe = unsafe_name_reason(sid)
            if unsafe is not None:
                raise ConfigError(f"{where} line {line}: slide_id {sid!r} cannot name a slide file ({unsafe}); give "
                                  "the slide file's name without extension, e.g. S01.")
            if sid in overrides and overrides[sid] != value:
                raise ConfigError(f"{where} line {line}: slide {sid!r} is listed twice with different MPPs.")
            overrides[sid] = value
    return overrides


def mpp_overrides(cfg: SlidesConfig) -> dict[str, float]:
    """slide_id -> level-0 MPP from ``cfg.mpp_override_csv`` (empty when none is configured).

    Ids are matched as slide ids: ``S1``, ``S1.svs`` and ``S1.ome.tif`` in the CSV all mean slide ``S1``.
    Raises :class:`ConfigError` naming the file and line for a missing file, bad columns, a value that
    is not a number or lies outside ``slides.mpp_range``, a slide id that cannot name a file (path
    separators, ``..``, absolute paths, control characters), or one id with two values.
    """
    if cfg.mpp_override_csv is None:
        return {}
    path = Path(cfg.mpp_override_csv)
    if not path.is_file():
        raise ConfigError(f"slides.mpp_override_csv {path} does not exist; fix the path or remove the key.")
    return _read_overrides(str(path), path.stat().st_mtime_ns, tuple(cfg.extensions), *cfg.mpp_range)


def resolve_mpp(reader: SlideReader, slide_id: str, cfg: SlidesConfig) -> MppResolution:
    """The level-0 MPP of a slide: override, else the file's own when plausible, else ``default_mpp``.

    Raises
    ------
    SlideError
        When none applies: one sentence with what the file states, why it is not used, and both fixes.
    """
    own, note = trusted_mpp(reader.declared_mpp, cfg)
    overrides = mpp_overrides(cfg)
    if slide_id in overrides:
        return MppResolution(overrides[slide_id], "override", note)
    if own is not None:
        return MppResolution(own, "slide")
    if cfg.default_mpp is not None:
        return MppResolution(float(cfg.default_mpp), "default", note)
    if cfg.mpp_override_csv is not None:
        fix = f"add a row '{slide_id},<mpp>' to slides.mpp_override_csv ({cfg.mpp_override_csv} has none for it)"
    else:
        fix = "list it in slides.mpp_override_csv (columns slide_id,mpp)"
    raise SlideError(
        f"slide {slide_id} has no usable microns-per-pixel (MPP): {note}; {fix} or set slides.default_mpp "
        "(e.g. --set slides.default_mpp=0.25)."
    )
