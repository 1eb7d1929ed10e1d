"""Slide ids: the name a slide is known by in labels, overrides, stores and bags."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# extensions that are two suffixes long; the id drops both ("S1.ome.tif" -> "S1")
DOUBLE_EXTENSIONS = (".ome.tiff", ".ome.tif", ".ome.btf", ".ome.tf2", ".ome.tf8")


def slide_id(path: Path | str) -> str:
    """The id of a slide: its file name without extension; for a DICOM slide, the name of its folder.

    Known double extensions such as ``.ome.tif`` are dropped whole.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm" or path.is_dir():
        return path.parent.name if path.suffix.lower() == ".dcm" else path.name
    lower = path.name.lower()
    for ext in DOUBLE_EXTENSIONS:
        if lower.endswith(ext) and len(lower) > len(ext):
            return path.name[: -len(ext)]
    return path.stem


def id_from_text(text: str, extensions: Iterable[str]) -> str:
    """A slide id as a user may write it in a CSV: ``S1``, ``S1.svs`` or ``S1.ome.tif`` all give ``S1``.

    Only the given slide ``extensions`` and :data:`DOUBLE_EXTENSIONS` are dropped, so ids that contain
    dots (``case.12``) stay whole.
    """
    text = str(text).strip()
    lower = text.lower()
    for ext in sorted({*DOUBLE_EXTENSIONS, *(e.lower() for e in extensions)}, key=len, reverse=True):
        if lower.endswith(ext) and len(lower) > len(ext):
            return text[: -len(ext)]
    return text
