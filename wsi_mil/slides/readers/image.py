"""Plain images (PNG, JPEG, BMP, WebP) read with Pillow: region-of-interest datasets (BACH/BRACS-style).

The image is decoded once, on the first read, and kept in memory (one level); images larger than
``MAX_PIXELS`` are refused with a clear error rather than exhausting memory. Their resolution, when
stated at all, is a DPI field that is usually a writer's default, so such slides mostly need
``slides.default_mpp`` or ``slides.mpp_override_csv``.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_mil.slides.readers.base import WHITE, DeclaredMpp, SlideReader, to_rgb, window

MAX_PIXELS = 178_000_000  # just under Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageReader(SlideReader):
    """A single-level image opened with Pillow."""

    name = "pillow"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with Image.open(self.path) as image:  # reads the header only
            width, height = image.size
            fmt = (image.format or "image").lower()
            mode = image.mode
            dpi = image.info.get("dpi")
        if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"{mode} pixels; the tiler reads 8-bit RGB brightfield images, convert it to 8-bit RGB")
        if width * height > MAX_PIXELS:
            raise ValueError(f"{width} x {height} px is too large to decode whole in memory (limit {MAX_PIXELS:,} px); "
                             "convert it to a tiled pyramidal TIFF")
        self.vendor = fmt
        self.level_dimensions = ((int(width), int(height)),)
        self.level_downsamples = (1.0,)
        self.properties = {"image.format": fmt, "image.mode": mode}
        if dpi and all(float(d) > 0 for d in dpi):
            self.properties["image.dpi"] = f"{float(dpi[0]):.6g}"
            self.declared_mpp = DeclaredMpp(25400.0 / float(dpi[0]), 25400.0 / float(dpi[1]),
                                            f"{fmt.upper()} resolution field ({float(dpi[0]):.6g} dpi)")
        else:
            self.declared_mpp = DeclaredMpp.none(f"{fmt.upper()} file states no resolution")
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _rgb(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(self.path) as image:
                        keep_alpha = "A" in image.mode or "transparency" in image.info
                        self._pixels = to_rgb(np.asarray(image.convert("RGBA" if keep_alpha else "RGB")))
            return self._pixels

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """See :meth:`SlideReader.read_region`."""
        if level != 0:
            raise IndexError(f"{self.path.name} has one level, not level {level}")
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        win = window(self.level_dimensions[0], int(location[0]), int(location[1]), w, h)
        if win is not None:
            rows, cols, out_rows, out_cols = win
            out[out_rows, out_cols] = self._rgb()[rows, cols]
        return out

    def close(self) -> None:
        """Release the file."""
        self._pixels = None
