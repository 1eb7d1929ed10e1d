"""Choosing and caching slide readers: :func:`open_slide` is the one way the package opens a slide.

``slides.reader: auto`` (the default) tries, by what the file is:

==============================  ===========================================================
file                            readers tried, in order
==============================  ===========================================================
.png .jpg .jpeg .bmp .webp      pillow
Aperio SVS, generic tiled TIFF  jpeg-tiles (tiled JPEG pages decoded directly, OpenSlide's
                                metadata), then openslide, then tifffile
other TIFF OpenSlide reads      openslide, then tifffile (codecs OpenSlide lacks)
OME-TIFF                        tifffile (MPP from the OME-XML), then openslide
other TIFF (flat, stripped)     tifffile
anything else (DICOM, MRXS...)  openslide
==============================  ===========================================================

``slides.fast_jpeg: false`` leaves JPEG tiles to OpenSlide. When a reader refuses a file (e.g.
jpeg-tiles on a JPEG 2000 SVS), the next one is tried and its ``fallback_note`` says why.

Readers are cached per process, one per slide path and file version, because opening is expensive;
Dask tasks therefore carry slide paths, never readers, and each worker process keeps its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import openslide
import tifffile

from wsi_mil.config import SlidesConfig
from wsi_mil.errors import SlideError
from wsi_mil.slides.readers.base import DeclaredMpp, SlideReader
from wsi_mil.slides.readers.image import IMAGE_SUFFIXES, ImageReader
from wsi_mil.slides.readers.jpeg_tiles import VENDORS as JPEG_TILE_VENDORS
from wsi_mil.slides.readers.jpeg_tiles import JpegTiffReader
from wsi_mil.slides.readers.openslide_reader import OpenSlideReader
from wsi_mil.slides.readers.tiff import TiffReader

__all__ = ["READERS", "DeclaredMpp", "SlideReader", "close_all_slides", "forget_slide", "open_slide"]

READERS: dict[str, type[SlideReader]] = {
    "jpeg-tiles": JpegTiffReader, "openslide": OpenSlideReader, "tifffile": TiffReader, "pillow": ImageReader,
}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PER_PROCESS = 16


def is_tiff(path: Path) -> bool:
    """True when the file starts with a TIFF or BigTIFF header."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in TIFF_MAGIC
    except OSError:
        return False


def candidate_readers(path: Path, fast_jpeg: bool = True) -> list[str]:
    """Reader names to try for ``path``, best first (see the module docstring)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ["pillow"]
    if not is_tiff(path):
        return ["openslide"]
    vendor = openslide.OpenSlide.detect_format(str(path))
    if vendor is None:
        return ["tifffile"]
    if vendor == "generic-tiff" and _is_ome(path):
        return ["tifffile", "openslide"]
    if fast_jpeg and vendor in JPEG_TILE_VENDORS:
        return ["jpeg-tiles", "openslide", "tifffile"]
    return ["openslide", "tifffile"]


def _is_ome(path: Path) -> bool:
    try:
        with tifffile.TiffFile(str(path)) as tif:
            return bool(tif.is_ome)
    except Exception:
        return False


def _message(exc: BaseException) -> str:
    if isinstance(exc, openslide.OpenSlideUnsupportedFormatError):
        return "unsupported or missing image file"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _open_uncached(path: Path, choice: str) -> SlideReader:
    reader, _, decoder = choice.partition("/")
    names = [reader] if reader != "auto" else candidate_readers(path, fast_jpeg=decoder != "openslide")
    problems: list[str] = []
    for name in names:
        try:
            reader = READERS[name](path)
            reader.fallback_note = "; ".join(problems)
            return reader
        except Exception as exc:  # any library's refusal becomes one line of the error
            problems.append(f"{name}: {_message(exc)}")
    tried = "; ".join(problems)
    if names == ["openslide"] and "unsupported or missing" in tried:
        raise SlideError(
            f"slide {path} is not a slide: no reader recognises its format ({tried}); remove it from the slide "
            "directory, or convert it to a tiled pyramidal TIFF."
        )
    raise SlideError(
        f"slide {path} cannot be opened ({tried}); the file may be corrupt, truncated or in an encoding no reader "
        "supports - convert it to a tiled pyramidal TIFF or remove it."
    )


class _ReaderCache:
    """A small thread-safe LRU of open readers keyed by path, file version (size, mtime) and reader choice."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int, int, str], SlideReader] = OrderedDict()

    def get(self, path: Path, choice: str) -> SlideReader:
        try:
            stat = path.stat()
        except OSError as exc:
            raise SlideError(f"slide {path} cannot be read ({exc.strerror}); check the path and permissions.") from None
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, choice)
        with self._lock:
            reader = self._items.get(key)
            if reader is not None:
                self._items.move_to_end(key)
                return reader
        reader = _open_uncached(path, choice)
        with self._lock:
            self._items[key] = reader
            while len(self._items) > self.maxsize:
                _, old = self._items.popitem(last=False)
                old.close()
        return reader

    def evict(self, path: Path) -> None:
        name = str(path.resolve())
        with self._lock:
            for key in [k for k in self._items if k[0] == name]:
                self._items.pop(key).close()

    def clear(self) -> None:
        with self._lock:
            for reader in self._items.values():
                reader.close()
            self._items.clear()


_CACHE = _ReaderCache(_PER_PROCESS)


def open_slide(path: Path | str, cfg: SlidesConfig | None = None) -> SlideReader:
    """An open reader for the slide at ``path``, cached per process.

    Parameters
    ----------
    path:
        A slide file (for a DICOM slide, any of its instances).
    cfg:
        ``slides`` settings; ``cfg.reader`` forces one reader (default ``auto``, see the module docstring),
        ``cfg.fast_jpeg: false`` keeps the jpeg-tiles reader out of ``auto``.

    Raises
    ------
    SlideError
        Naming the file, every reader tried and why it failed, and the fix.
    """
    if cfg is None:
        return _CACHE.get(Path(path), "auto")
    return _CACHE.get(Path(path), f"{cfg.reader}/{'fast' if cfg.fast_jpeg else 'openslide'}")


def forget_slide(path: Path | str) -> None:
    """Drop (and close) the cached readers of ``path``, e.g. after a read error left one unusable."""
    _CACHE.evict(Path(path))


def close_all_slides() -> None:
    """Close every cached reader of this process."""
    _CACHE.clear()
