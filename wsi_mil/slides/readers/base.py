"""The interface every slide reader offers, whatever library decodes the pixels.

A reader is opened once per process and slide (see :func:`wsi_mil.slides.open_slide`) and is safe to
use from several threads. Coordinates follow OpenSlide's convention: ``read_region`` takes the
top-left corner in level-0 pixels and a size in pixels of the requested level.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

WHITE = 255
STRIP_PIXELS = 16_000_000  # level pixels read at once when a thumbnail is built from a level


@dataclass(frozen=True)
class DeclaredMpp:
    """The level-0 resolution a file states about itself, before any plausibility check.

    ``x`` and ``y`` are microns per pixel (None where the file states nothing); ``source`` says where
    they were read, e.g. ``"TIFF resolution tags (28.35 px per centimeter)"``.
    """

    x: float | None
    y: float | None
    source: str

    @classmethod
    def none(cls, source: str) -> DeclaredMpp:
        """No MPP declared by ``source``."""
        return cls(None, None, source)


class SlideReader(ABC):
    """A whole-slide image opened for reading.

    Attributes
    ----------
    name:
        The reader ("jpeg-tiles", "openslide", "tifffile", "pillow"), recorded in ``slides.csv`` and the store.
    path:
        The file that was opened (for a DICOM slide, one of its instances).
    vendor:
        Format or scanner vendor as the library reports it (``aperio``, ``ome-tiff``, ``png``...).
    level_dimensions:
        (width, height) of each pyramid level, level 0 first.
    level_downsamples:
        Level-0 pixels per level pixel for each level (1.0 first).
    properties:
        The file's metadata as strings.
    declared_mpp:
        The MPP the file states (see :class:`DeclaredMpp`); :func:`wsi_mil.slides.resolve_mpp` decides
        whether it is trusted.
    fallback_note:
        Why the readers tried before this one could not open the file ("" when none was).
    """

    name: ClassVar[str] = ""
    fallback_note: str = ""  # why the readers tried before this one failed ("" when it was the first choice)
    path: Path
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    declared_mpp: DeclaredMpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [height, width, 3] of ``level`` whose top-left corner is level-0 ``location``.

        ``size`` is (width, height) in pixels of ``level``. Pixels outside the image (or outside the
        scanned area) are white. Raises the library's error when the pixels cannot be decoded.
        """

    def read_region_image(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """:meth:`read_region` as an RGB PIL image (readers that decode to PIL override it to skip a copy)."""
        return Image.fromarray(self.read_region(location, level, size))

    def read_region_reduced(self, location: tuple[int, int], level: int, size: tuple[int, int],
                            factor: int) -> Image.Image:
        """:meth:`read_region_image` reduced ``factor`` times: each output pixel the mean of a factor x factor block.

        ``size`` is the region read, in pixels of ``level``; the image is ``ceil(size / factor)``.
        Readers that can decode at a reduced scale (:class:`~wsi_mil.slides.readers.jpeg_tiles.JpegTiffReader`)
        override it.
        """
        return self.read_region_image(location, level, size).reduce(int(factor))

    def read_region_reduced_array(self, location: tuple[int, int], level: int, size: tuple[int, int], factor: int,
                                  out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`read_region_reduced` as RGB uint8 [ceil(h / factor), ceil(w / factor), 3], written into ``out`` if given."""
        image = np.asarray(self.read_region_reduced(location, level, size, factor))
        if out is None:
            return image
        out[...] = image
        return out

    def close(self) -> None:  # noqa: B027 - readers without resources keep the default
        """Release the file (the reader is unusable afterwards)."""

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (level 0 if none)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:
                best = level
        return best

    def thumbnail(self, size: tuple[int, int], max_pixels: int = STRIP_PIXELS) -> np.ndarray:
        """RGB uint8 [size[1], size[0], 3] of the whole slide, read in strips (bounded memory).

        The finest level no finer than needed is read band by band and box-averaged to ``size``; map
        thumbnail pixels to level 0 with the per-axis factors ``dimensions / size``.
        """
        tw, th = max(1, int(size[0])), max(1, int(size[1]))
        w0, h0 = self.dimensions
        level = self.best_level_for_downsample(max(1.0, min(w0 / tw, h0 / th)))
        lw, lh = self.level_dimensions[level]
        ds_level = self.level_downsamples[level]
        fy = lh / th  # level rows per thumbnail row
        out = np.empty((th, tw, 3), dtype=np.uint8)
        strip = max(1, int(max_pixels / max(1.0, lw * fy)))
        for r0 in range(0, th, strip):
            r1 = min(th, r0 + strip)
            ly0, ly1 = int(np.floor(r0 * fy)), min(lh, int(np.ceil(r1 * fy)))
            ly1 = max(ly1, ly0 + 1)
            region = self.read_region((0, int(round(ly0 * ds_level))), level, (lw, ly1 - ly0))
            if region.shape[:2] != (r1 - r0, tw):
                region = np.asarray(Image.fromarray(region).resize((tw, r1 - r0), Image.Resampling.BOX))
            out[r0:r1] = region
        return out

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"<{type(self).__name__} {self.path.name} {w}x{h} levels={self.level_count} vendor={self.vendor}>"


def window(level_size: tuple[int, int], x: int, y: int, w: int, h: int) -> tuple[slice, slice, slice, slice] | None:
    """Where the request ``(x, y, w, h)`` (level pixels) overlaps a level of ``level_size``.

    Returns (rows in the level, columns in the level, rows in the output, columns in the output), or
    None when they do not overlap.
    """
    lw, lh = level_size
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
    if x1 <= x0 or y1 <= y0:
        return None
    return slice(y0, y1), slice(x0, x1), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)


def to_rgb(array: np.ndarray) -> np.ndarray:
    """RGB uint8 [h, w, 3] from a uint8 [h, w] grey, [h, w, 1..4] array (alpha composited over white)."""
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    channels = array.shape[2]
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 2:  # grey + alpha
        grey, alpha = array[..., :1], array[..., 1:2]
        return rgba_to_rgb(np.concatenate([grey, grey, grey, alpha], axis=2))
    if channels == 4:
        return rgba_to_rgb(array)
    return np.ascontiguousarray(array[..., :3])


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Flatten RGBA over white (transparent = outside the scanned area)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + WHITE * (255 - a) + 127) // 255
    return out.astype(np.uint8)
