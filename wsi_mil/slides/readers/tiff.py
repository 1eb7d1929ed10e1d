"""TIFF files OpenSlide cannot open, read with tifffile (+ imagecodecs for the codecs).

Flat (stripped, one level) RGB TIFFs as region-of-interest datasets ship them, OME-TIFF (MPP from the
OME-XML ``PhysicalSizeX/Y`` and their units, pyramid levels from SubIFDs or pages where present),
and tiled TIFFs in codecs OpenSlide lacks. Pixels are read through tifffile's Zarr view, so a
region decodes only the strips or tiles it overlaps (memory bounded by the request, not the file).
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile
import zarr

from wsi_mil.slides.readers.base import WHITE, DeclaredMpp, SlideReader, to_rgb, window

log = logging.getLogger(__name__)

# microns per unit of the OME-XML PhysicalSize units (OME's UnitsLength) we expect in microscopy
OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "pm": 1e-6, "mm": 1e3, "cm": 1e4,
                "m": 1e6, "in": 25400.0, "inch": 25400.0}
# microns per TIFF ResolutionUnit (1 = none; 4 and 5 are tifffile's millimetre / micrometre extensions)
TIFF_UNITS_UM = {2: ("inch", 25400.0), 3: ("centimeter", 10000.0), 4: ("millimeter", 1000.0), 5: ("micrometer", 1.0)}


class TiffReader(SlideReader):
    """A TIFF (flat, pyramidal or OME) opened with tifffile."""

    name = "tifffile"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tif = tifffile.TiffFile(str(path))
        try:
            self._setup()
        except Exception:
            self._tif.close()
            raise

    def _setup(self) -> None:
        tif = self._tif
        if not tif.series:
            raise ValueError("the TIFF holds no image")
        series = tif.series[0]
        levels = list(series.levels) or [series]
        self._axes = series.axes
        if series.dtype != np.uint8:
            raise ValueError(f"{series.dtype} pixels (axes {series.axes}); the tiler reads 8-bit RGB brightfield "
                             "images, convert it to 8-bit RGB")
        if "Y" not in self._axes or "X" not in self._axes:
            raise ValueError(f"no image plane in axes {self._axes}")
        self._arrays = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(levels))]
        y, x = self._axes.index("Y"), self._axes.index("X")
        self.level_dimensions = tuple((int(a.shape[x]), int(a.shape[y])) for a in self._arrays)
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions)
        extra = [ax for ax, n in zip(self._axes, series.shape, strict=True) if ax not in "YXSC" and n > 1]
        colour = [n for ax, n in zip(self._axes, series.shape, strict=True) if ax in "SC"]
        if any(n not in (1, 3, 4) for n in colour) or len(colour) > 1:
            raise ValueError(f"{series.shape} image with axes {self._axes} is not a grey or RGB image "
                             "(multichannel fluorescence is not supported)")
        kept = [ax for ax in self._axes if ax in "YXSC"]
        self._order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax in "SC"]
        if extra:
            log.info("%s: axes %s; reading the first plane of %s", self.path.name, self._axes, "".join(extra))
        self.vendor = "ome-tiff" if tif.is_ome else ("aperio" if tif.is_svs else "tiff")
        page = tif.pages.first
        self.properties = {
            "tiff.Compression": str(page.compression.name if hasattr(page.compression, "name") else page.compression),
            "tiff.Tiled": str(page.is_tiled),
            "tiff.Axes": self._axes,
            "tiff.Series": str(len(tif.series)),
        }
        self.declared_mpp = _declared_mpp(tif)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """See :meth:`SlideReader.read_region`."""
        w, h = int(size[0]), int(size[1])
        ds = self.level_downsamples[level]
        x, y = int(np.floor(location[0] / ds + 1e-9)), int(np.floor(location[1] / ds + 1e-9))
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        win = window(self.level_dimensions[level], x, y, w, h)
        if win is None:
            return out
        rows, cols, out_rows, out_cols = win
        index = tuple(rows if ax == "Y" else cols if ax == "X" else slice(None) if ax in "SC" else 0
                      for ax in self._axes)
        data = np.asarray(self._arrays[level][index]).transpose(self._order)
        out[out_rows, out_cols] = to_rgb(data)
        return out

    def close(self) -> None:
        """Release the file."""
        self._tif.close()


def _declared_mpp(tif: tifffile.TiffFile) -> DeclaredMpp:
    """MPP from the OME-XML, an Aperio description, or the TIFF resolution tags (in that order)."""
    if tif.is_ome and tif.ome_metadata:
        found = _ome_mpp(tif.ome_metadata)
        if found is not None:
            return found
    page = tif.pages.first
    if tif.is_svs:
        match = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        if match:
            value = float(match.group(1))
            return DeclaredMpp(value, value, f"Aperio MPP field ({match.group(1)})")
    unit = int(page.resolutionunit)
    xres, yres = page.resolution
    if unit not in TIFF_UNITS_UM or not (xres > 0 and yres > 0):
        return DeclaredMpp.none("TIFF resolution tags give no physical unit")
    name, um = TIFF_UNITS_UM[unit]
    return DeclaredMpp(um / xres, um / yres, f"TIFF resolution tags ({xres:.6g} px per {name})")


def _ome_mpp(xml: str) -> DeclaredMpp | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return DeclaredMpp.none("OME-XML that cannot be parsed")
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    values = []
    for axis in ("X", "Y"):
        raw = pixels.attrib.get(f"PhysicalSize{axis}")
        unit = pixels.attrib.get(f"PhysicalSize{axis}Unit", "µm")
        if raw is None:
            values.append(None)
            continue
        if unit not in OME_UNITS_UM:
            return DeclaredMpp.none(f"OME-XML PhysicalSize{axis}Unit {unit!r} is not a length unit we know")
        values.append(float(raw) * OME_UNITS_UM[unit])
    unit_x = pixels.attrib.get("PhysicalSizeXUnit", "µm")
    return DeclaredMpp(values[0], values[1], f"OME-XML PhysicalSizeX ({pixels.attrib['PhysicalSizeX']} {unit_x})")
