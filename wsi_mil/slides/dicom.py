"""Just enough DICOM to sort a folder: the SOP class of each file, from its file meta header.

Part 10 files start with a 128-byte preamble, the marker ``DICM`` and the file meta group (0002),
always in explicit-VR little endian (DICOM PS3.10, section 7.1). Its element (0002,0002)
MediaStorageSOPClassUID tells a whole-slide image (VL Whole Slide Microscopy Image Storage) from a
classic one (CT, MR, secondary capture...). Nothing beyond that group is parsed.
"""

from __future__ import annotations

import struct
from pathlib import Path

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
SOP_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR image",
    "1.2.840.10008.5.1.4.1.1.1.1": "digital X-ray image",
    "1.2.840.10008.5.1.4.1.1.2": "CT image",
    "1.2.840.10008.5.1.4.1.1.4": "MR image",
    "1.2.840.10008.5.1.4.1.1.6.1": "ultrasound image",
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture image",
    "1.2.840.10008.5.1.4.1.1.77.1.2": "VL microscopic image",
    "1.2.840.10008.5.1.4.1.1.77.1.3": "VL slide-coordinates microscopic image",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL photographic image",
    "1.2.840.10008.5.1.4.1.1.88.11": "basic text SR",
    "1.2.840.10008.5.1.4.1.1.91.1": "microscopy bulk simple annotations",
    WSI_SOP_CLASS: "VL whole-slide microscopy image",
}
# value representations whose length field is 4 bytes after 2 reserved bytes (PS3.5 table 7.1-1)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_META_LIMIT = 64 * 1024


def sop_class_uid(path: Path) -> str | None:
    """MediaStorageSOPClassUID of a DICOM Part 10 file; None when the file is not one.

    Raises nothing for malformed files: a file without the ``DICM`` marker, or whose meta group
    cannot be walked, gives None; a valid meta group without the element gives ``""``.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132 + _META_LIMIT)
    except OSError:
        return None
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if element == 0x0002:
            return head[start : start + length].decode("ascii", "replace").strip("\x00 ")
        pos = start + length
    return ""


def describe_sop_class(uid: str) -> str:
    """A readable name for a SOP class UID (the UID itself when unknown)."""
    return SOP_CLASS_NAMES.get(uid, f"SOP class {uid}" if uid else "unknown SOP class")
