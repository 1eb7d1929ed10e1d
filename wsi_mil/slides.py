"""Opening whole-slide images: inventory, physical resolution (MPP), level choice and region reads.

Every function here works on real OpenSlide handles. Handles are cached per process (one per slide
path and file version) because opening a slide is expensive; Dask tasks therefore carry slide paths,
never handles, and each worker process keeps its own cache.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image

from wsi_mil.config import SlidesConfig
from wsi_mil.errors import ConfigError, SlideError, WsiMilError

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 1 << 20
_HANDLES_PER_PROCESS = 16


# -------------------------------------------------------------------------------------------- finding
def slide_id(path: Path) -> str:
    """The id of a slide: its file stem (for DICOM, the name of its directory)."""
    path = Path(path)
    return path.parent.name if path.suffix.lower() == ".dcm" else path.stem


def find_slides(slides_dir: Path, cfg: SlidesConfig) -> list[Path]:
    """Every slide file under ``slides_dir`` (sorted); raise a clear error on duplicate ids.

    A DICOM slide is a directory of ``.dcm`` files; the first one stands for the whole slide.
    """
    slides_dir = Path(slides_dir)
    if not slides_dir.is_dir():
        raise WsiMilError(f"slide directory {slides_dir} does not exist; pass a directory of slide files.")
    extensions = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.extensions}
    pattern = "**/*" if cfg.recursive else "*"
    found: list[Path] = []
    dicom_dirs: set[Path] = set()
    for path in sorted(slides_dir.glob(pattern)):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in extensions:
            continue
        if path.suffix.lower() == ".dcm":
            if path.parent in dicom_dirs:
                continue
            dicom_dirs.add(path.parent)
        found.append(path)
    seen: dict[str, Path] = {}
    for path in found:
        sid = slide_id(path)
        if sid in seen:
            raise WsiMilError(
                f"slides {seen[sid]} and {path} share the id '{sid}' (ids are file stems); rename one of them."
            )
        seen[sid] = path
    return found


# -------------------------------------------------------------------------------------------- opening
class _HandleCache:
    """A small thread-safe LRU of open slides keyed by path and file version (size, mtime)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int, int], openslide.OpenSlide] = OrderedDict()

    def get(self, path: Path) -> openslide.OpenSlide:
        path = Path(path)
        try:
            stat = path.stat()
        except OSError as exc:
            raise SlideError(f"slide {path} cannot be read ({exc.strerror}); check the path and permissions.") from None
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            handle = self._items.get(key)
            if handle is not None:
                self._items.move_to_end(key)
                return handle
        handle = _open_uncached(path)
        with self._lock:
            self._items[key] = handle
            while len(self._items) > self.maxsize:
                _, old = self._items.popitem(last=False)
                old.close()
        return handle

    def evict(self, path: Path) -> None:
        """Forget (and close) every cached handle of ``path``, e.g. after a read error."""
        name = str(Path(path).resolve())
        with self._lock:
            for key in [k for k in self._items if k[0] == name]:
                self._items.pop(key).close()

    def clear(self) -> None:
        with self._lock:
            for handle in self._items.values():
                handle.close()
            self._items.clear()


_CACHE = _HandleCache(_HANDLES_PER_PROCESS)


def _open_uncached(path: Path) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(
            f"slide {path} is not in a format OpenSlide can read (unsupported or not a slide); "
            "convert it or remove it from the slide directory."
        ) from None
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise SlideError(f"slide {path} cannot be opened ({_short(exc)}); the file may be corrupt or truncated.") from None


def open_slide(path: Path | str) -> openslide.OpenSlide:
    """An open OpenSlide handle for ``path``, cached per process; raise :class:`SlideError` on failure."""
    return _CACHE.get(Path(path))


def forget_slide(path: Path | str) -> None:
    """Drop the cached handle of ``path`` (OpenSlide handles stay broken after a read error)."""
    _CACHE.evict(Path(path))


def close_all_slides() -> None:
    """Close every cached handle of this process."""
    _CACHE.clear()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


# ------------------------------------------------------------------------------------------------ MPP
@lru_cache(maxsize=8)
def _read_overrides(csv_path: str, mtime_ns: int) -> dict[str, float]:
    overrides: dict[str, float] = {}
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"slide_id", "mpp"} <= set(reader.fieldnames):
            raise ConfigError(f"slides.mpp_override_csv {csv_path} must have the columns slide_id,mpp.")
        for line, row in enumerate(reader, start=2):
            try:
                value = float(row["mpp"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"slides.mpp_override_csv {csv_path} line {line}: mpp {row['mpp']!r} is not a number."
                ) from None
            if not value > 0:
                raise ConfigError(f"slides.mpp_override_csv {csv_path} line {line}: mpp must be positive.")
            overrides[str(row["slide_id"]).strip()] = value
    return overrides


def mpp_overrides(cfg: SlidesConfig) -> dict[str, float]:
    """slide_id -> level-0 MPP from ``cfg.mpp_override_csv`` (empty when none is configured)."""
    if cfg.mpp_override_csv is None:
        return {}
    path = Path(cfg.mpp_override_csv)
    if not path.is_file():
        raise ConfigError(f"slides.mpp_override_csv {path} does not exist; fix the path or remove the key.")
    return _read_overrides(str(path), path.stat().st_mtime_ns)


def resolve_mpp(slide: openslide.OpenSlide, slide_id: str, cfg: SlidesConfig) -> tuple[float, str]:
    """The level-0 microns per pixel of a slide and where it came from: override, slide or default."""
    overrides = mpp_overrides(cfg)
    if slide_id in overrides:
        return overrides[slide_id], "override"
    props = slide.properties
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            value = float(props.get(key, "nan"))
        except ValueError:
            value = float("nan")
        if np.isfinite(value) and value > 0:
            values.append(value)
    if values:
        if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * max(values):
            log.warning("slide %s: MPP x %.5f and y %.5f differ; using their mean", slide_id, *values)
        return float(np.mean(values)), "slide"
    if cfg.default_mpp is not None:
        return float(cfg.default_mpp), "default"
    raise SlideError(
        f"slide {slide_id} declares no microns-per-pixel (MPP); add it to slides.mpp_override_csv "
        "or set slides.default_mpp."
    )


# ----------------------------------------------------------------------------------------- inventory
@dataclass
class SlideInfo:
    """What the inventory knows about one slide."""

    slide_id: str
    path: str
    vendor: str
    width: int
    height: int
    levels: int
    downsamples: list[float]
    mpp: float
    mpp_source: str
    fingerprint: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of the first MiB of a slide file (stable across copies, changes with the content)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(FINGERPRINT_BYTES))
    return {"size": path.stat().st_size, "head_sha256": digest.hexdigest()[:16]}


def inspect_slide(path: Path, cfg: SlidesConfig) -> SlideInfo:
    """Open a slide and read its inventory entry; raise :class:`SlideError` when it is unusable."""
    path = Path(path)
    slide = open_slide(path)
    sid = slide_id(path)
    mpp, source = resolve_mpp(slide, sid, cfg)
    width, height = (int(v) for v in slide.dimensions)
    if width < 1 or height < 1:
        raise SlideError(f"slide {path} has no pixels (dimensions {width}x{height}); the file is damaged.")
    fingerprint = file_fingerprint(path) | {"width": width, "height": height, "levels": int(slide.level_count)}
    return SlideInfo(
        slide_id=sid,
        path=str(path.resolve()),
        vendor=str(slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")),
        width=width,
        height=height,
        levels=int(slide.level_count),
        downsamples=[float(d) for d in slide.level_downsamples],
        mpp=mpp,
        mpp_source=source,
        fingerprint=fingerprint,
    )


# -------------------------------------------------------------------------------------- level choice
@dataclass(frozen=True)
class ReadPlan:
    """How patches of a given physical size are read from one slide."""

    level: int
    downsample: float
    level_mpp: float
    read_size: int
    patch_size: int
    patch_size_level0: float

    @property
    def resample(self) -> bool:
        return self.read_size != self.patch_size

    @property
    def resample_filter(self) -> str:
        """'none'; 'box' for whole-number reductions (exact area mean of each patch pixel's footprint,
        as pyramid levels are built); 'lanczos' (antialiased) for every other size change."""
        if not self.resample:
            return "none"
        if self.read_size > self.patch_size and self.read_size % self.patch_size == 0:
            return "box"
        return "lanczos"


def choose_level(downsamples: list[float], mpp0: float, target_mpp: float, patch_size: int) -> ReadPlan:
    """The coarsest level that is still at least as fine as ``target_mpp``, and the read size there.

    A level counts as fine enough when reading it gives at least ``patch_size`` pixels after rounding,
    so a level whose MPP is a hair above the target (odd pyramid sizes) is used without resampling.
    Slides coarser than the target are read at level 0 and upsampled (logged).
    """
    best = 0
    for level, ds in enumerate(downsamples):
        if round(patch_size * target_mpp / (mpp0 * ds)) >= patch_size and ds >= downsamples[best]:
            best = level
    ds = float(downsamples[best])
    level_mpp = mpp0 * ds
    read_size = max(1, int(round(patch_size * target_mpp / level_mpp)))
    if read_size < patch_size:
        log.warning("slide level 0 (%.4f um/px) is coarser than the target %.4f um/px: patches are upsampled",
                    mpp0, target_mpp)
    return ReadPlan(level=best, downsample=ds, level_mpp=level_mpp, read_size=read_size, patch_size=patch_size,
                    patch_size_level0=patch_size * target_mpp / mpp0)


# ----------------------------------------------------------------------------------------- reading
def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Flatten OpenSlide's RGBA over white (transparent = outside the scanned area)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def read_region_rgb(slide: openslide.OpenSlide, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 [height, width, 3] at ``level`` whose top-left is level-0 ``(x, y)``."""
    rgba = np.asarray(slide.read_region((int(x), int(y)), int(level), (int(width), int(height))))
    return rgba_to_rgb(rgba)


def read_patch(
    slide: openslide.OpenSlide, x: int, y: int, plan: ReadPlan, out: np.ndarray | None = None
) -> np.ndarray:
    """One RGB patch at the target resolution (into ``out`` when given).

    Reads ``read_size`` pixels at the plan's level and resizes only when that size differs from
    ``patch_size``: whole-number reductions average each k x k block (box, exact footprint), other
    factors use Lanczos (antialiased). Transparent pixels (outside the scanned area) become white.
    """
    image = slide.read_region((int(x), int(y)), plan.level, (plan.read_size, plan.read_size))
    if image.getextrema()[3][0] == 255:  # fully opaque: stay in PIL, one copy into numpy
        rgb = image.convert("RGB")
    else:
        rgb = Image.fromarray(rgba_to_rgb(np.asarray(image)))
    method = plan.resample_filter
    if method == "box":
        rgb = rgb.reduce(plan.read_size // plan.patch_size)
    elif method == "lanczos":
        rgb = rgb.resize((plan.patch_size, plan.patch_size), Image.Resampling.LANCZOS)
    if out is None:
        return np.asarray(rgb)
    out[...] = np.asarray(rgb)
    return out


def read_thumbnail(slide: openslide.OpenSlide, mpp0: float, thumb_mpp: float, max_pixels: int = 16_000_000) -> np.ndarray:
    """RGB thumbnail of the whole slide at about ``thumb_mpp`` um/px, read in strips (bounded memory).

    Its size is ``ceil(level-0 size * mpp0 / thumb_mpp)``; map thumbnail pixels back to level 0 with
    the per-axis factors ``slide.dimensions / thumbnail.shape`` (never with a level downsample).
    """
    w0, h0 = slide.dimensions
    scale = max(thumb_mpp / mpp0, 1.0)
    tw, th = max(1, int(np.ceil(w0 / scale))), max(1, int(np.ceil(h0 / scale)))
    level = 0
    for lv, ds in enumerate(slide.level_downsamples):
        if ds <= scale * 1.001:
            level = lv
    lw, lh = slide.level_dimensions[level]
    ds_level = slide.level_downsamples[level]
    fy = lh / th  # level rows per thumbnail row
    out = np.empty((th, tw, 3), dtype=np.uint8)
    strip = max(1, int(max_pixels / max(1.0, lw * fy)))  # thumbnail rows per read, bounded level pixels
    for r0 in range(0, th, strip):
        r1 = min(th, r0 + strip)
        ly0, ly1 = int(np.floor(r0 * fy)), min(lh, int(np.ceil(r1 * fy)))
        ly1 = max(ly1, ly0 + 1)
        region = read_region_rgb(slide, 0, int(round(ly0 * ds_level)), level, lw, ly1 - ly0)
        if region.shape[:2] != (r1 - r0, tw):
            region = np.asarray(Image.fromarray(region).resize((tw, r1 - r0), Image.Resampling.BOX))
        out[r0:r1] = region
    return out
