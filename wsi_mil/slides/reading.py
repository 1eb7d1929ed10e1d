"""Reading at a physical resolution: level choice, patches, thumbnails - the same for every reader."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_mil.config import SlidesConfig
from wsi_mil.errors import SlideError
from wsi_mil.slides.readers import SlideReader, forget_slide, open_slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadPlan:
    """How patches of a given physical size are read from one slide."""

    level: int
    downsample: float
    level_mpp: float
    read_size: int
    patch_size: int
    patch_size_level0: float

    @property
    def resample(self) -> bool:
        """Whether the read region must be resized to the patch size."""
        return self.read_size != self.patch_size

    @property
    def resample_filter(self) -> str:
        """The resampling filter: 'none', 'box' or 'lanczos'.

        'box' for whole-number reductions (exact area mean of each patch pixel's footprint, as pyramid
        levels are built); 'lanczos' (antialiased) for every other size change.
        """
        if not self.resample:
            return "none"
        if self.read_size > self.patch_size and self.read_size % self.patch_size == 0:
            return "box"
        return "lanczos"


def choose_level(downsamples: list[float], mpp0: float, target_mpp: float, patch_size: int) -> ReadPlan:
    """The coarsest level that is still at least as fine as ``target_mpp``, and the read size there.

    A level counts as fine enough when reading it gives at least ``patch_size`` pixels after rounding,
    so a level whose MPP is a hair above the target (odd pyramid sizes) is used without resampling.
    Slides coarser than the target are read at level 0 and upsampled (logged).
    """
    best = 0
    for level, ds in enumerate(downsamples):
        if round(patch_size * target_mpp / (mpp0 * ds)) >= patch_size and ds >= downsamples[best]:
            best = level
    ds = float(downsamples[best])
    level_mpp = mpp0 * ds
    read_size = max(1, int(round(patch_size * target_mpp / level_mpp)))
    if read_size < patch_size:
        log.warning("slide level 0 (%.4f um/px) is coarser than the target %.4f um/px: patches are upsampled",
                    mpp0, target_mpp)
    return ReadPlan(level=best, downsample=ds, level_mpp=level_mpp, read_size=read_size, patch_size=patch_size,
                    patch_size_level0=patch_size * target_mpp / mpp0)


def read_patch(reader: SlideReader, x: int, y: int, plan: ReadPlan, out: np.ndarray | None = None) -> np.ndarray:
    """One RGB uint8 [P, P, 3] patch at the target resolution whose top-left is level-0 ``(x, y)``.

    Reads ``read_size`` pixels at the plan's level and resizes only when that size differs from
    ``patch_size``: whole-number reductions average each k x k block (box, exact footprint), other
    factors use Lanczos (antialiased). Pixels outside the slide are white.
    """
    method = plan.resample_filter
    size = (plan.read_size, plan.read_size)
    if method == "box":  # readers that decode at a reduced scale do so here (shrink-on-load)
        return reader.read_region_reduced_array((int(x), int(y)), plan.level, size,
                                                plan.read_size // plan.patch_size, out=out)
    if method == "none":
        array = reader.read_region((int(x), int(y)), plan.level, size)
    else:
        image = reader.read_region_image((int(x), int(y)), plan.level, size)
        array = np.asarray(image.resize((plan.patch_size, plan.patch_size), Image.Resampling.LANCZOS))
    if out is None:
        return array
    out[...] = array
    return out


def thumbnail_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) of a thumbnail ``scale`` times smaller than level 0 (at least 1 px)."""
    return max(1, int(np.ceil(width / scale))), max(1, int(np.ceil(height / scale)))


def read_thumbnail(reader: SlideReader, mpp0: float, thumb_mpp: float) -> np.ndarray:
    """RGB thumbnail [th, tw, 3] of the whole slide at about ``thumb_mpp`` um/px (bounded memory).

    Its size is ``ceil(level-0 size * mpp0 / thumb_mpp)``; map thumbnail pixels back to level 0 with
    the per-axis factors ``dimensions / thumbnail.shape`` (never with a level downsample).
    """
    w0, h0 = reader.dimensions
    return reader.thumbnail(thumbnail_size(w0, h0, max(thumb_mpp / mpp0, 1.0)))


def slide_thumbnail(
    slide_path: Path, *, max_size: int = 2048, target_downsample: float | None = None,
    cfg: SlidesConfig | None = None,
) -> tuple[np.ndarray, float]:
    """A slide thumbnail (RGB uint8 [h, w, 3]) and its downsample relative to level 0, with any reader.

    The thumbnail fits in ``max_size`` px on its longest side (or is level-0 size / ``target_downsample``
    when that is given), never larger than level 0. The returned downsample is exactly
    ``level0_width / thumbnail_width``; the vertical one differs from it by under one thumbnail pixel
    over the whole height (aspect ratio rounding).

    Raises
    ------
    SlideError
        Naming the file when it does not exist or cannot be opened or read.
    ValueError
        When ``target_downsample`` is not positive.
    """
    slide_path = Path(slide_path)
    if not slide_path.is_file():
        raise SlideError(f"slide {slide_path} does not exist; check the path.")
    if target_downsample is not None and not target_downsample > 0:
        raise ValueError(f"target_downsample must be positive, got {target_downsample}")
    reader = open_slide(slide_path, cfg)
    width0, height0 = reader.dimensions
    if target_downsample is not None:
        scale = max(1.0, float(target_downsample))
    else:
        scale = max(1.0, max(width0, height0) / float(max_size))
    size = (max(1, round(width0 / scale)), max(1, round(height0 / scale)))
    try:
        thumb = reader.thumbnail(size)
    except Exception as exc:  # an OpenSlide handle stays unusable after a read error
        forget_slide(slide_path)
        raise SlideError(f"slide {slide_path} cannot be read for a thumbnail by {reader.name} ({exc}); check the "
                         "file is a complete slide.") from None
    return thumb, width0 / thumb.shape[1]
