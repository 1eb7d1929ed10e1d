"""Slides OpenSlide reads, the default reader for every format it recognises.

Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips, Ventana, DICOM WSI, tiled generic TIFF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsi_mil.slides.readers.base import DeclaredMpp, SlideReader, rgba_to_rgb


class OpenSlideReader(SlideReader):
    """A slide opened with OpenSlide (``openslide-python`` over ``openslide-bin``)."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self.properties = dict(props)
        self.vendor = str(props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.declared_mpp = _declared_mpp(self.properties, self.vendor)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """See :meth:`SlideReader.read_region`."""
        return np.asarray(self.read_region_image(location, level, size))

    def read_region_image(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """See :meth:`SlideReader.read_region_image`."""
        image = self._slide.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))
        if image.getextrema()[3][0] == 255:  # fully opaque: one conversion in PIL
            return image.convert("RGB")
        return Image.fromarray(rgba_to_rgb(np.asarray(image)))

    def close(self) -> None:
        """Release the file."""
        self._slide.close()


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _declared_mpp(props: dict[str, str], vendor: str) -> DeclaredMpp:
    x = _number(props.get(openslide.PROPERTY_NAME_MPP_X))
    y = _number(props.get(openslide.PROPERTY_NAME_MPP_Y))
    if "aperio.MPP" in props:
        source = f"Aperio MPP field ({props['aperio.MPP']})"
    elif "tiff.XResolution" in props and vendor in ("generic-tiff", "hamamatsu", "philips"):
        source = f"TIFF resolution tags ({props['tiff.XResolution']} px per {props.get('tiff.ResolutionUnit', '?')})"
    elif vendor == "dicom":
        source = "DICOM PixelSpacing"
    else:
        source = f"{vendor} metadata (openslide.mpp-x/y)"
    if x is None and y is None:
        unit = props.get("tiff.ResolutionUnit")
        if vendor == "generic-tiff" and unit is not None:
            return DeclaredMpp.none(f"TIFF resolution tags give no physical unit (ResolutionUnit {unit})")
        return DeclaredMpp.none(f"{vendor} file states no MPP")
    return DeclaredMpp(x, y, source)
