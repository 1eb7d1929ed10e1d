"""Streaming writer of pyramidal slides (Aperio SVS or generic tiled TIFF) with bounded memory.

Level 0 is rendered band by band (one row of 256-px tiles) and handed to tifffile as a tile
iterator; each band is also reduced 4x and appended to a raw temporary file, which later levels are
reduced from and tiled out of in bands. Memory is a few bands, whatever the slide size.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

TILE = 256
CHUNK = 2048  # width of the level-0 pieces rendered at once (multiple of TILE)
MIN_LEVEL_SIZE = 512  # lower levels are added while their larger side is at least this
THUMB_SIZE = 768
APERIO_HEADER = "Aperio Image Library v12.0.0\r\n"

Render = Callable[[int, int, int, int], np.ndarray]


def level_shapes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(downsample, width, height) of every pyramid level: downsamples 1, 4, 16 ... until small."""
    levels = [(1, width, height)]
    d = 4
    while max(math.ceil(width / d), math.ceil(height / d)) >= MIN_LEVEL_SIZE:
        levels.append((d, math.ceil(width / d), math.ceil(height / d)))
        d *= 4
    return levels


def reduce4(band: np.ndarray) -> np.ndarray:
    """Mean of 4x4 pixel blocks of an RGB uint8 image (edges padded by replication)."""
    ph, pw = (-band.shape[0]) % 4, (-band.shape[1]) % 4
    if ph or pw:
        band = np.pad(band, ((0, ph), (0, pw), (0, 0)), mode="edge")
    s = band.reshape(band.shape[0] // 4, 4, band.shape[1] // 4, 4, 3).sum(axis=(1, 3), dtype=np.uint16)
    return ((s + 8) // 16).astype(np.uint8)


def _tiles_of(rows: np.ndarray, width: int) -> Iterator[np.ndarray]:
    """The TILE x TILE tiles of a band of at most TILE rows; edge tiles padded by replication."""
    for x0 in range(0, width, TILE):
        tile = rows[:, x0 : x0 + TILE]
        if tile.shape[0] < TILE or tile.shape[1] < TILE:
            tile = np.pad(tile, ((0, TILE - tile.shape[0]), (0, TILE - tile.shape[1]), (0, 0)), mode="edge")
        yield np.ascontiguousarray(tile)


def _level0_tiles(render: Render, width: int, height: int, sink: BinaryIO | None, desc: str) -> Iterator[np.ndarray]:
    """Render level 0 band by band, yield its tiles, and stream the 4x reduction into ``sink``."""
    n_bands = math.ceil(height / TILE)
    for b, y0 in enumerate(tqdm(range(0, height, TILE), desc=desc, unit="band", leave=False, disable=None)):
        if n_bands >= 100 and b % (n_bands // 10) == 0:
            log.info("%s: level 0, band %d of %d", desc, b, n_bands)
        bh = min(TILE, height - y0)
        rows = np.empty((bh, width, 3), np.uint8)
        for x0 in range(0, width, CHUNK):
            cw = min(CHUNK, width - x0)
            rows[:, x0 : x0 + cw] = render(x0, y0, cw, bh)
        if sink is not None:
            sink.write(reduce4(rows).tobytes())
        yield from _tiles_of(rows, width)


def _read_rows(f: BinaryIO, width: int, n: int) -> np.ndarray:
    data = np.frombuffer(f.read(n * width * 3), np.uint8)
    return data.reshape(-1, width, 3)


def _reduce_file(src: Path, width: int, height: int, dst: Path) -> None:
    """Write the 4x reduction of a raw RGB level file into another raw file, in bands."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for _ in range(0, height, 4 * TILE):
            fo.write(reduce4(_read_rows(fi, width, 4 * TILE)).tobytes())


def _raw_tiles(src: Path, width: int, height: int) -> Iterator[np.ndarray]:
    with open(src, "rb") as f:
        for _ in range(0, height, TILE):
            yield from _tiles_of(_read_rows(f, width, TILE), width)


def _thumbnail(src: Path, width: int, height: int) -> np.ndarray:
    with open(src, "rb") as f:
        img = Image.fromarray(_read_rows(f, width, height))
    scale = THUMB_SIZE / max(width, height)
    return np.asarray(img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR))


def _mag(mpp: float) -> str:
    mag = 10.0 / mpp
    return str(int(round(mag))) if abs(mag - round(mag)) < 1e-6 else f"{mag:g}"


def write_pyramid(path: Path, render: Render, *, width: int, height: int, mpp: float, fmt: str = "svs",
                  quality: int = 85, name: str = "") -> list[tuple[int, int, int]]:
    """Write a pyramidal slide to ``path`` (written in place; callers make it atomic). Returns the levels."""
    path = Path(path)
    levels = level_shapes(width, height)
    svs = fmt == "svs"
    common = dict(dtype=np.uint8, photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                  metadata=None, software=False, maxworkers=1)
    tiled = dict(common, tile=(TILE, TILE))
    head = f"{APERIO_HEADER}{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
    props = f"|AppMag = {_mag(mpp)}|MPP = {mpp:g}|Filename = {name}"
    res_cm = 1e4 / mpp
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-tmp-") as tmp:
        raw = [Path(tmp) / f"level{k}.raw" for k in range(max(2, len(levels)))]  # level-1 raw feeds the thumbnail
        bigtiff = width * height * 3 > 2**32 - 2**28
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
            with open(raw[1], "wb") as sink:
                extra: dict = ({"description": head + props} if svs else
                               {"resolution": (res_cm, res_cm), "resolutionunit": "CENTIMETER"})
                tif.write(_level0_tiles(render, width, height, sink, name or path.name),
                          shape=(height, width, 3), **tiled, **extra)
            for k in range(2, len(levels)):
                _reduce_file(raw[k - 1], levels[k - 1][1], levels[k - 1][2], raw[k])
            if svs:
                k = len(levels) - 1 if len(levels) > 1 else 1
                thumb = _thumbnail(raw[k], math.ceil(width / 4**k), math.ceil(height / 4**k))
                tif.write(thumb, **common, rowsperstrip=16,
                          description=f"{APERIO_HEADER}{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - {props}")
            for k in range(1, len(levels)):
                d, lw, lh = levels[k]
                if svs:
                    extra = {"description": f"{head} -> {lw}x{lh} JPEG/RGB Q={quality}{props}"}
                else:
                    extra = {"resolution": (res_cm / d, res_cm / d), "resolutionunit": "CENTIMETER", "subfiletype": 1}
                tif.write(_raw_tiles(raw[k], lw, lh), shape=(lh, lw, 3), **tiled, **extra)
    return levels
