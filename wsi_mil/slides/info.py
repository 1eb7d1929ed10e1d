"""The inventory entry of one slide: reader, vendor, size, levels, trusted MPP, fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wsi_mil.config import SlidesConfig
from wsi_mil.errors import SlideError
from wsi_mil.slides.ids import slide_id
from wsi_mil.slides.mpp import MppResolution, resolve_mpp, trusted_mpp
from wsi_mil.slides.readers import SlideReader, forget_slide, open_slide

FINGERPRINT_BYTES = 1 << 20
PROBE_SIZE = 64


@dataclass
class SlideInfo:
    """What the inventory knows about one slide (level-0 pixels, um/px).

    ``mpp`` is None when the slide has no usable MPP; ``mpp_error`` then says why and how to fix it,
    and ``mpp_note`` why the file's own value was not used (also when an override or default was).
    """

    slide_id: str
    path: str
    reader: str
    vendor: str
    width: int
    height: int
    levels: int
    downsamples: list[float]
    mpp: float | None
    mpp_source: str
    mpp_note: str
    fingerprint: dict[str, Any]
    mpp_error: str = ""
    reader_note: str = ""  # why readers tried before ``reader`` refused the file (e.g. the JPEG fast path)
    tile_decoder: str = ""  # the JPEG decoder of the jpeg-tiles reader (simplejpeg | pillow); "" for other readers

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of the first MiB of a slide file (stable across copies, changes with the content)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(FINGERPRINT_BYTES))
    return {"size": path.stat().st_size, "head_sha256": digest.hexdigest()[:16]}


def probe_pixels(reader: SlideReader) -> None:
    """Decode one small region of the coarsest level, so undecodable files fail before any planning.

    Raises
    ------
    SlideError
        Naming the file and the decoder's message (the file's cached reader is dropped).
    """
    level = reader.level_count - 1
    lw, lh = reader.level_dimensions[level]
    w, h = min(lw, PROBE_SIZE), min(lh, PROBE_SIZE)
    ds = reader.level_downsamples[level]
    location = (int((lw - w) // 2 * ds), int((lh - h) // 2 * ds))
    try:
        reader.read_region(location, level, (w, h))
    except Exception as exc:
        forget_slide(reader.path)  # an OpenSlide handle stays unusable after a read error
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        before = f"; {reader.fallback_note}" if reader.fallback_note else ""
        raise SlideError(
            f"slide {reader.path} opens but its pixels cannot be decoded ({reader.name}: {text}{before}); the file "
            "is corrupt or truncated, or uses a codec no reader supports - re-export it or remove it."
        ) from None


def inspect_slide(path: Path, cfg: SlidesConfig) -> SlideInfo:
    """Open a slide, check its pixels decode, and resolve its MPP (None, with the reason, when unusable).

    Raises
    ------
    SlideError
        When it cannot be opened or decoded, or has no pixels.
    """
    path = Path(path)
    reader = open_slide(path, cfg)
    width, height = reader.dimensions
    if width < 1 or height < 1:
        raise SlideError(f"slide {path} has no pixels (dimensions {width}x{height}); the file is damaged.")
    probe_pixels(reader)
    sid = slide_id(path)
    try:
        mpp = resolve_mpp(reader, sid, cfg)
    except SlideError as exc:
        mpp, error = MppResolution(float("nan"), "", trusted_mpp(reader.declared_mpp, cfg)[1]), str(exc)
    else:
        error = ""
    fingerprint = file_fingerprint(path) | {"width": width, "height": height, "levels": reader.level_count}
    return SlideInfo(
        slide_id=sid,
        path=str(path.resolve()),
        reader=reader.name,
        vendor=reader.vendor,
        width=width,
        height=height,
        levels=reader.level_count,
        downsamples=list(reader.level_downsamples),
        mpp=None if error else mpp.mpp,
        mpp_source=mpp.source,
        mpp_note=mpp.note,
        fingerprint=fingerprint,
        mpp_error=error,
        reader_note=reader.fallback_note,
        tile_decoder=str(getattr(reader, "decoder", "")),
    )
