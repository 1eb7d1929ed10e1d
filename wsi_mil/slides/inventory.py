r"""What is in a slide folder: every file becomes a slide, or is skipped or failed with the reason.

Rules, applied per folder:

- a file whose name ends with one of ``slides.extensions`` is a slide (``S1.ome.tif`` has the id ``S1``);
- DICOM (``.dcm``): the whole-slide instances of one folder are ONE slide named after the folder
  (OpenSlide reads them all through the first); other instances of it are skipped as grouped, classic
  DICOM (CT, MR, secondary capture...) is skipped as not a whole-slide image, a ``.dcm`` without the
  DICOM marker fails;
- MIRAX: the data folder beside ``S1.mrxs`` (``S1/``) belongs to that slide; its files are skipped;
- hidden files and folders, and files with other extensions, are skipped with the reason;
- sub-folders are scanned with ``slides.recursive``; without it a sub-folder that holds DICOM files is
  still read (a DICOM slide *is* a folder), any other one gets a row saying how many slide files it
  holds and which key includes them;
- slides sharing an id fail together (labels and outputs would be ambiguous);
- a slide whose id cannot name an output file (a ``\`` or a control character in its file name) fails
  with the reason (:func:`wsi_mil.layout.unsafe_name_reason`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from wsi_mil.config import SlidesConfig
from wsi_mil.errors import SlideError, WsiMilError
from wsi_mil.layout import unsafe_name_reason
from wsi_mil.slides.dicom import WSI_SOP_CLASS, describe_sop_class, sop_class_uid
from wsi_mil.slides.ids import slide_id
from wsi_mil.slides.info import file_fingerprint

EntryStatus = Literal["slide", "skipped", "failed"]

# what other files in slide folders are, for the reason of a skipped row
_KNOWN_OTHERS = {
    ".vsi": "an Olympus VSI slide, which OpenSlide cannot read: export it to OME-TIFF (QuPath, bfconvert)",
    ".czi": "a Zeiss CZI slide, which OpenSlide cannot read: export it to OME-TIFF (QuPath, bfconvert)",
    ".qptiff": "an Akoya QPTIFF (usually multiplexed fluorescence); add '.qptiff' to slides.extensions to try the "
    "TIFF reader",
    ".png": "an image; add it to slides.extensions to tile image regions of interest",
    ".jpg": "an image; add it to slides.extensions to tile image regions of interest",
    ".jpeg": "an image; add it to slides.extensions to tile image regions of interest",
    ".bmp": "an image; add it to slides.extensions to tile image regions of interest",
    ".webp": "an image; add it to slides.extensions to tile image regions of interest",
}
_SCAN_LIMIT = 100_000  # entries looked at when counting slides in a sub-folder that is not scanned


@dataclass(frozen=True)
class FolderEntry:
    """One file (or unscanned sub-folder) of a slide folder and what the inventory made of it.

    ``kind`` groups skipped and failed entries for summaries ("unknown extension", "DICOM instance"...).
    """

    path: Path
    slide_id: str
    status: EntryStatus
    reason: str = ""
    kind: str = ""
    nested_slides: int = 0  # for an unscanned sub-folder: the slide files it holds


@dataclass
class Inventory:
    """Every entry of a slide folder, sorted by path."""

    root: Path
    entries: list[FolderEntry] = field(default_factory=list)

    @property
    def slides(self) -> list[Path]:
        """Paths of the entries that are slides."""
        return [e.path for e in self.entries if e.status == "slide"]

    def slides_in_subfolders(self) -> int:
        """Slide files in sub-folders that were not scanned (counted for the recursive hint)."""
        return sum(e.nested_slides for e in self.entries)


def _extensions(cfg: SlidesConfig) -> tuple[str, ...]:
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.extensions}
    return tuple(sorted(exts, key=len, reverse=True))


def _is_slide_name(name: str, extensions: tuple[str, ...]) -> bool:
    lower = name.lower()
    return any(lower.endswith(ext) and len(lower) > len(ext) for ext in extensions)


def _skip(path: Path, reason: str, kind: str) -> FolderEntry:
    return FolderEntry(path=path, slide_id=slide_id(path) if path.is_file() else path.name, status="skipped",
                       reason=reason, kind=kind)


def _other_file(path: Path) -> FolderEntry:
    suffix = path.suffix.lower()
    what = _KNOWN_OTHERS.get(suffix, "not a slide extension")
    shown = suffix or "(none)"
    return _skip(path, f"extension {shown} is not in slides.extensions: {what}", "unknown extension")


def _walk_files(directory: Path) -> Iterator[Path]:
    for base, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            yield Path(base) / name


def _count_slides(directory: Path, extensions: tuple[str, ...]) -> int:
    count = 0
    for seen, path in enumerate(_walk_files(directory)):
        if seen >= _SCAN_LIMIT:
            break
        count += _is_slide_name(path.name, extensions) and not path.name.startswith(".")
    return count


def _dicom_entries(folder: Path, files: list[Path]) -> list[FolderEntry]:
    """One slide for the whole-slide instances of ``folder``; rows for every other .dcm file."""
    entries: list[FolderEntry] = []
    instances: list[Path] = []
    sid = folder.name
    for path in files:
        uid = sop_class_uid(path)
        if uid is None:
            entries.append(FolderEntry(path, slide_id(path), "failed", f"{path} is not a DICOM file (no 'DICM' marker "
                                       "after the 128-byte preamble); remove it or fix the extension.", "not DICOM"))
        elif uid == WSI_SOP_CLASS:
            instances.append(path)
        else:
            entries.append(_skip(path, f"classic DICOM ({describe_sop_class(uid)}), not a whole-slide image",
                                 "classic DICOM"))
    if instances:
        first = instances[0]
        entries.append(FolderEntry(first, sid, "slide"))
        entries += [_skip(p, f"instance of DICOM slide '{sid}' (read together with {first.name})", "DICOM instance")
                    for p in instances[1:]]
    return entries


def _scan(directory: Path, cfg: SlidesConfig, extensions: tuple[str, ...], top: bool) -> list[FolderEntry]:
    children = sorted(directory.iterdir(), key=lambda p: p.name)
    files = [p for p in children if p.is_file()]
    folders = [p for p in children if p.is_dir()]
    mrxs_data = {p.with_suffix("").name: slide_id(p) for p in files if p.suffix.lower() == ".mrxs"}
    use_dicom = ".dcm" in extensions
    dcm = [p for p in files if use_dicom and p.suffix.lower() == ".dcm" and not p.name.startswith(".")]
    entries = _dicom_entries(directory, dcm) if dcm else []
    for path in children:  # neither file nor folder: a symbolic link whose target is gone
        if path.is_symlink() and not path.exists():
            target = os.readlink(path)
            reason = f"{path} is a symbolic link to {target}, which does not exist; fix or remove the link."
            if _is_slide_name(path.name, extensions) and not path.name.startswith("."):
                entries.append(FolderEntry(path, slide_id(path), "failed", reason, "dangling link"))
            else:
                entries.append(FolderEntry(path, path.name, "skipped", reason, "dangling link"))
    for path in files:
        if path in dcm:
            continue
        if path.name.startswith("."):
            entries.append(_skip(path, "hidden file", "hidden"))
        elif _is_slide_name(path.name, extensions):
            entries.append(FolderEntry(path, slide_id(path), "slide"))
        else:
            entries.append(_other_file(path))
    for folder in folders:
        if folder.name.startswith("."):
            entries.append(_skip(folder, "hidden folder, not scanned", "hidden"))
        elif folder.name in mrxs_data:
            sid = mrxs_data[folder.name]
            entries += [_skip(p, f"data file of MIRAX slide '{sid}'", "MIRAX data") for p in _walk_files(folder)]
        elif cfg.recursive:
            entries += _scan(folder, cfg, extensions, top=False)
        elif use_dicom and any(p.suffix.lower() == ".dcm" for p in folder.iterdir() if p.is_file()):
            entries += _scan(folder, cfg, extensions, top=False)  # a DICOM slide is a folder
        else:
            n = _count_slides(folder, extensions) if top else 0
            hint = f"; it holds {n} slide file(s): set slides.recursive=true to include them" if n else ""
            entries.append(FolderEntry(folder, folder.name, "skipped", f"sub-folder not scanned (slides.recursive is "
                                       f"false){hint}", "sub-folder", nested_slides=n))
    return entries


def _fail_duplicates(entries: list[FolderEntry]) -> list[FolderEntry]:
    by_id: dict[str, list[FolderEntry]] = {}
    for e in entries:
        if e.status == "slide":
            by_id.setdefault(e.slide_id, []).append(e)
    out = []
    for e in entries:
        same = by_id.get(e.slide_id, [])
        if e.status == "slide" and len(same) > 1:
            names = ", ".join(str(o.path) for o in same)
            e = FolderEntry(e.path, e.slide_id, "failed", f"slides {names} share the id '{e.slide_id}' (ids are file "
                            "names without extension); rename all but one.", "duplicate id")
        out.append(e)
    return out


def _fail_unsafe_ids(entries: list[FolderEntry]) -> list[FolderEntry]:
    out = []
    for e in entries:
        reason = unsafe_name_reason(e.slide_id) if e.status == "slide" else None
        if reason is not None:
            e = FolderEntry(e.path, e.slide_id, "failed", f"slide {str(e.path)!r}: its id {e.slide_id!r} cannot name an "
                            f"output file ({reason}); rename the file.", "unsafe id")
        out.append(e)
    return out


def scan_folder(slides_dir: Path, cfg: SlidesConfig) -> Inventory:
    """Sort every file of ``slides_dir`` into slides, skipped and failed entries (see the module docstring).

    Raises
    ------
    WsiMilError
        When ``slides_dir`` is not a directory.
    """
    slides_dir = Path(slides_dir).resolve()
    if not slides_dir.is_dir():
        raise WsiMilError(f"slide directory {slides_dir} does not exist; pass a directory of slide files.")
    entries = _fail_unsafe_ids(_fail_duplicates(_scan(slides_dir, cfg, _extensions(cfg), top=True)))
    return Inventory(root=slides_dir, entries=sorted(entries, key=lambda e: str(e.path)))


def find_slides(slides_dir: Path, cfg: SlidesConfig) -> list[Path]:
    """The slide files of ``slides_dir`` (sorted; one path per DICOM slide; duplicates excluded)."""
    return scan_folder(slides_dir, cfg).slides


def no_slides_message(inventory: Inventory, cfg: SlidesConfig) -> str:
    """One sentence for a folder without slides: what was there and, if sub-folders hold slides, the key."""
    root = inventory.root
    nested = inventory.slides_in_subfolders()
    if nested:
        return (f"no slides found directly in {root}, but its sub-folders hold {nested} slide file(s); set "
                "slides.recursive=true (--set slides.recursive=true) to include them.")
    others = len(inventory.entries)
    seen = f"; its {others} other entr{'y' if others == 1 else 'ies'} are listed in slides.csv" if others else ""
    return (f"no slides found in {root} (extensions {', '.join(cfg.extensions)}){seen}; check the directory or "
            "slides.extensions.")


@lru_cache(maxsize=4)
def _index(slides_dir: str, cfg_json: str) -> dict[str, Path]:
    cfg = SlidesConfig.model_validate_json(cfg_json)
    return {slide_id(p): p for p in find_slides(Path(slides_dir), cfg)}


def locate_slide(
    sid: str,
    recorded: Path | str | None,
    slides_dir: Path | None,
    cfg: SlidesConfig,
    fingerprint: dict | None = None,
) -> Path:
    """The file of slide ``sid``: found by id in ``slides_dir`` when given, else the ``recorded`` path.

    A slide found in ``slides_dir`` must match the recorded ``fingerprint`` (size and head hash) when one
    is given, so a heatmap is never drawn over another slide that happens to share the id.

    Raises
    ------
    SlideError
        Naming the id, where it was looked for, and the ``--slides-dir`` fix.
    """
    if slides_dir is not None:
        found = _index(str(Path(slides_dir).resolve()), cfg.model_dump_json()).get(sid)
        if found is not None:
            if fingerprint and {k: fingerprint.get(k) for k in ("size", "head_sha256")} != file_fingerprint(found):
                raise SlideError(f"slide {found} has the id '{sid}' but is not the file its patches came from "
                                 "(size or content differs); point --slides-dir at the original slides.")
            return found
    if recorded is not None and Path(recorded).exists():
        return Path(recorded)
    where = f"{recorded}" + (f" nor in {slides_dir}" if slides_dir is not None else "")
    raise SlideError(f"slide '{sid}' is not at {where}; pass --slides-dir DIR with the folder it moved to "
                     "(slides are found there by id).")
