"""Slides in: what a folder holds, opening any supported format, MPP you can trust, reads at a physical size.

Modules, in the order data flows through them:

- :mod:`~wsi_mil.slides.inventory` - every file of a slide folder becomes a slide, or a skipped or
  failed entry with the reason (DICOM folders grouped via :mod:`~wsi_mil.slides.dicom`, MIRAX data
  folders, unknown extensions...); slide ids (:mod:`~wsi_mil.slides.ids`) drop ``.ome.tif`` whole;
- :mod:`~wsi_mil.slides.readers` - :func:`open_slide` picks a reader (OpenSlide, tifffile, Pillow)
  that all offer the same :class:`SlideReader` interface (``read_region`` -> RGB uint8 array);
- :mod:`~wsi_mil.slides.mpp` - plausibility of every MPP source, overrides and the default;
- :mod:`~wsi_mil.slides.info` - the inventory entry of one slide (:func:`inspect_slide`);
- :mod:`~wsi_mil.slides.reading` - level choice, patch and thumbnail reads at a physical resolution.
"""

from wsi_mil.slides.ids import slide_id
from wsi_mil.slides.info import SlideInfo, file_fingerprint, inspect_slide
from wsi_mil.slides.inventory import (
    FolderEntry,
    Inventory,
    find_slides,
    locate_slide,
    no_slides_message,
    scan_folder,
)
from wsi_mil.slides.mpp import MppResolution, implausible, mpp_overrides, resolve_mpp
from wsi_mil.slides.readers import DeclaredMpp, SlideReader, close_all_slides, forget_slide, open_slide
from wsi_mil.slides.reading import ReadPlan, choose_level, read_patch, read_thumbnail, slide_thumbnail

__all__ = [
    "DeclaredMpp", "FolderEntry", "Inventory", "MppResolution", "ReadPlan", "SlideInfo", "SlideReader",
    "choose_level", "close_all_slides", "file_fingerprint", "find_slides", "forget_slide", "implausible",
    "inspect_slide", "locate_slide", "mpp_overrides", "no_slides_message", "open_slide", "read_patch",
    "read_thumbnail", "resolve_mpp", "scan_folder", "slide_id", "slide_thumbnail",
]
