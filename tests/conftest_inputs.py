"""Generated slide inputs of every kind a slide folder holds: each written as the real file format.

Tissue is a textured pink-purple disc on glass (what the tissue detector must find); ink strokes are
drawn on the glass beside it. Writers: the synthetic pyramid writer (SVS / generic TIFF with any
declared MPP, so writer defaults and millimetre MPPs are real file headers), tifffile (flat stripped
TIFF, OME-TIFF with SubIFD levels), Pillow (PNG), and a minimal DICOM Part 10 writer (file meta group
only, as PS3.10 lays it out).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from wsi_mil.synth.pyramid import write_pyramid

GLASS = np.array([242, 240, 245], np.int16)
TISSUE = np.array([196, 118, 178], np.int16)
INKS = {"red": (200, 30, 45), "blue": (60, 90, 215), "green": (70, 170, 90), "black": (35, 35, 40)}


def render(width: int, height: int, ink: str | None = None, seed: int = 0) -> np.ndarray:
    """RGB uint8 [height, width, 3]: a tissue disc in the left half, an ink stroke on the glass to its right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy, r = width * 0.3, height * 0.5, min(width, height) * 0.25
    tissue = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    image = np.where(tissue[..., None], TISSUE, GLASS) + rng.integers(-12, 13, (height, width, 3))
    nuclei = tissue & (rng.random((height, width)) < 0.03)
    image[nuclei] = (110, 60, 150)
    if ink is not None:
        stroke = (np.abs(xx - width * 0.75 - 0.1 * (yy - cy)) < width * 0.04) & (np.abs(yy - cy) < height * 0.35)
        image[stroke] = np.array(INKS[ink]) + rng.integers(-8, 9, (int(stroke.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def ink_box(width: int, height: int) -> tuple[float, float, float, float]:
    """Level-0 x0, y0, x1, y1 bounding the ink stroke of :func:`render`."""
    return width * 0.6, height * 0.15, width * 0.9, height * 0.85


def write_svs_or_tiff(path: Path, image: np.ndarray, mpp: float, fmt: str) -> Path:
    """A tiled JPEG pyramid (Aperio SVS with ``MPP = mpp`` or generic TIFF with resolution tags for ``mpp``)."""
    h, w = image.shape[:2]
    write_pyramid(path, lambda x, y, cw, ch: image[y : y + ch, x : x + cw], width=w, height=h, mpp=mpp, fmt=fmt)
    return path


def write_flat_tiff(path: Path, image: np.ndarray, mpp: float) -> Path:
    """A stripped (untiled), uncompressed RGB TIFF: one level, OpenSlide cannot open it."""
    per_cm = 1e4 / mpp
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=32, resolution=(per_cm, per_cm),
                     resolutionunit="CENTIMETER")
    return path


def write_ome_tiff(path: Path, image: np.ndarray, size_nm: float) -> Path:
    """An OME-TIFF whose OME-XML gives PhysicalSizeX/Y in nanometres, with 2x SubIFD levels, no resolution tags."""
    levels = [image, image[::2, ::2], image[::4, ::4]]
    meta = {"axes": "YXS", "PhysicalSizeX": size_nm, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": size_nm,
            "PhysicalSizeYUnit": "nm"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(levels[0], photometric="rgb", tile=(128, 128), subifds=len(levels) - 1, metadata=meta,
                  compression="zlib")
        for level in levels[1:]:
            tif.write(level, photometric="rgb", tile=(128, 128), subfiletype=1, compression="zlib")
    return path


def write_png(path: Path, image: np.ndarray, dpi: float | None = 72.0) -> Path:
    """A PNG (with a pHYs chunk saying ``dpi`` when given, as most writers do)."""
    Image.fromarray(image).save(path, dpi=(dpi, dpi)) if dpi else Image.fromarray(image).save(path)
    return path


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    if vr in (b"OB", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def write_dicom(path: Path, sop_class: str) -> Path:
    """A DICOM Part 10 file: preamble, ``DICM``, file meta group (explicit VR little endian), one dataset element."""
    meta = (_element(0x0002, 0x0001, b"OB", b"\x00\x01")
            + _element(0x0002, 0x0002, b"UI", sop_class.encode())
            + _element(0x0002, 0x0003, b"UI", b"1.2.826.0.1.3680043.8.498.1")
            + _element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1"))
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta)))
    dataset = _element(0x0008, 0x0060, b"CS", b"CT")
    path.write_bytes(b"\x00" * 128 + b"DICM" + group_length + meta + dataset)
    return path
