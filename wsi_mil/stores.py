"""On-disk formats: the Zarr patch store and the HDF5 feature bag (the one module that defines them).

Patch store ``<id>.zarr`` (zarr v3 group):
    ``patches`` uint8 [N, P, P, 3], chunked by ``chunk_patches`` patches, compressed;
    ``coords``  int64 [N, 2], level-0 x, y of each patch's top-left corner;
    group attributes: every tiling setting, exact MPPs (``mpp_level0``, ``target_mpp``), ``patch_size``,
    ``patch_size_level0``, ``level``, ``downsample``, slide fingerprint, package version, ``complete``.

Feature bag ``<id>.h5``:
    ``features`` float32/float16 [N, D] (attributes ``encoder``, ``name``); ``coords`` int64 [N, 2];
    file attributes: ours (encoder, weights sha256, tiling attributes with exact float MPPs...).
    ``coords`` also carries the attributes CLAM, TRIDENT and TITAN read (:func:`peer_coords_attrs`), so
    their readers open a bag unchanged: CLAM's ``patch_size`` (side read at ``patch_level``) and
    ``patch_level``; TRIDENT's ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
    ``level0_width``, ``level0_height``, ``overlap``; ``name`` (the slide id). Magnifications follow the
    usual convention magnification = 10 / MPP (0.5 um/px = 20x), from the exact MPPs.

Both are written under a temporary name beside the target and renamed into place when complete, so
a reader never sees a half-written output and a crash never damages a finished one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import zarr

from wsi_mil import __version__
from wsi_mil.errors import WsiMilError

FORMAT_VERSION = 1
PARTIAL_TAG = ".partial-"


# ------------------------------------------------------------------------------------------- atomic
def partial_path(final: Path) -> Path:
    """A unique temporary sibling of ``final`` (same directory, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f"{final.name}{PARTIAL_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(tmp: Path, final: Path) -> None:
    """Move a finished temporary output into place, replacing an older one atomically where possible."""
    tmp, final = Path(tmp), Path(final)
    if final.is_dir():  # directories cannot be replaced by rename: move the old one aside first
        trash = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        remove_path(trash)
    else:
        os.replace(tmp, final)


def output_of(leftover: Path) -> Path:
    """The output a temporary write belongs to (``S1.zarr.partial-12-ab`` and ``S1.zarr.old-cd`` -> ``S1.zarr``)."""
    leftover = Path(leftover)
    name = leftover.name.split(PARTIAL_TAG, 1)[0].split(".old-", 1)[0]
    return leftover.with_name(name)


def clean_partials(directory: Path, keep: Callable[[Path], bool] | None = None) -> int:
    """Remove leftovers of interrupted writes in ``directory``; returns how many were removed.

    ``keep(output)`` (see :func:`output_of`) spares the leftovers of outputs another live process is
    writing (:func:`wsi_mil.locks.owner_alive`); without it every leftover goes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    leftovers = [p for p in directory.iterdir() if PARTIAL_TAG in p.name or ".old-" in p.name]
    removed = 0
    for path in leftovers:
        if keep is not None and keep(output_of(path)):
            continue
        remove_path(path)
        removed += 1
    return removed


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``final``, on error it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    try:
        yield tmp
        commit(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_output(Path(path)) as tmp:
        Path(tmp).write_text(text)


def merge_csv_rows(path: Path, columns: list[str], rows: list[dict[str, Any]], *, lock_dir: Path,
                   key: str | tuple[str, ...] = "slide_id", keep: Callable[[dict[str, str]], bool] | None = None) -> None:
    """Write ``rows`` into the shared CSV ``path`` merged with what other commands wrote there.

    Under an inter-process lock (:func:`wsi_mil.locks.file_lock`, its file in ``lock_dir``): a row of ``rows`` replaces the
    file's row with the same ``key`` (a column, or several whose values together name a row), except that a ``pending`` row never replaces a finished one
    (another command finished that slide); the file's other rows stay when ``keep(row)`` is true (all,
    without ``keep``). Rows of ``rows`` come first, in their order, then the others by key. The file
    is replaced atomically.
    """
    from wsi_mil.locks import file_lock

    keys = (key,) if isinstance(key, str) else key

    def ident(row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row[c]) for c in keys)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path, lock_dir):
        existing: dict[tuple[str, ...], dict[str, str]] = {}
        if path.is_file():
            try:
                with open(path, newline="") as fh:
                    existing = {ident(r): r for r in csv.DictReader(fh) if all(r.get(c) for c in keys)}
            except (OSError, csv.Error, UnicodeDecodeError, KeyError):
                existing = {}  # unreadable: this call's rows alone
        ours = {ident(r): {c: "" if r.get(c) is None else str(r.get(c)) for c in columns} for r in rows}
        merged: list[dict[str, str]] = []
        for k, row in ours.items():
            old = existing.get(k)
            finished = old is not None and old.get("status") not in (None, "", "pending")
            merged.append(old if row.get("status") == "pending" and finished else row)
        merged += [existing[k] for k in sorted(existing) if k not in ours and (keep is None or keep(existing[k]))]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in merged:
            writer.writerow({c: row.get(c, "") for c in columns})
        write_text_atomic(path, buf.getvalue())


def _jsonable(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(attrs), default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} as an attribute")


# -------------------------------------------------------------------------------------- patch store
def _codec(name: str, level: int) -> list[Any] | None:
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "none":
        return None
    if name == "zstd":
        return [ZstdCodec(level=level)]
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=min(level, 9), shuffle="noshuffle")]
    if name == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=min(level, 9), shuffle="bitshuffle")]
    raise ValueError(f"unknown codec {name!r}")


def create_patch_store(
    path: Path,
    *,
    n_patches: int,
    patch_size: int,
    chunk_patches: int,
    codec: str = "zstd",
    level: int = 3,
    attrs: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Create an empty patch store at ``path`` (normally a :func:`partial_path`)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    shape = (n_patches, patch_size, patch_size, 3)
    group.create_array(
        "patches",
        shape=shape,
        chunks=(max(1, min(chunk_patches, max(n_patches, 1))), patch_size, patch_size, 3),
        dtype="uint8",
        compressors=_codec(codec, level),
        fill_value=0,
    )
    group.create_array("coords", shape=(n_patches, 2), chunks=(max(n_patches, 1), 2), dtype="int64", fill_value=0)
    meta = {"format": "wsi-mil-patches", "format_version": FORMAT_VERSION, "wsi_mil_version": __version__}
    meta.update(_jsonable(attrs or {}))
    meta["complete"] = False
    group.update_attributes(meta)  # one metadata write (attrs.update rewrites zarr.json once per key)
    return group


def mark_complete(path: Path) -> None:
    """Flag a fully written patch store as complete (done just before it is renamed into place)."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["complete"] = True


@dataclass
class PatchStore:
    """A read-only view of a finished patch store."""

    path: Path
    patches: zarr.Array
    coords: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def patch_size(self) -> int:
        """Patch side in pixels (at the target MPP)."""
        return int(self.patches.shape[1])


def is_complete_store(path: Path) -> bool:
    """True when ``path`` is a patch store that was finished (never true for a partial write)."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return False
    try:
        return bool(zarr.open_group(str(path), mode="r").attrs.get("complete", False))
    except Exception:
        return False


def open_patch_store(path: Path) -> PatchStore:
    """Open a complete patch store, or raise a clear error naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise WsiMilError(f"patch store {path} does not exist; run `wsi-mil tile` first.")
    if not is_complete_store(path):
        raise WsiMilError(f"patch store {path} is incomplete or unreadable; rerun `wsi-mil tile` to redo it.")
    group = zarr.open_group(str(path), mode="r")
    return PatchStore(path=path, patches=group["patches"], coords=np.asarray(group["coords"][:]), attrs=dict(group.attrs))


# ---------------------------------------------------------------------------------------- HDF5 bags
@dataclass
class Bag:
    """A slide's features and coordinates as stored in an HDF5 bag."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]


def _h5_attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)) or value is None:
        return json.dumps(value, default=_json_default)
    if isinstance(value, Path):
        return str(value)
    return value


MAGNIFICATION_UM = 10.0  # magnification = MAGNIFICATION_UM / MPP: the usual convention (0.25 um/px = 40x)


def peer_coords_attrs(attrs: Mapping[str, Any], *, patch_size: Literal["clam", "trident"] = "clam") -> dict[str, Any]:
    """Attributes of a ``coords`` dataset that CLAM, TRIDENT and TITAN read, from our tiling attributes.

    Parameters
    ----------
    attrs:
        Our attributes of a patch store or bag: ``slide_id``, ``mpp_level0`` and ``target_mpp`` (um/px),
        ``patch_size_level0`` (level-0 px), ``width``/``height`` (level-0 px), ``overlap`` (px at
        ``target_mpp``), ``patch_level``, and the patch sides ``read_size`` (px read at ``patch_level``)
        and ``target_patch_size`` (px at ``target_mpp``). Missing keys give missing attributes.
    patch_size:
        Which meaning ``patch_size`` takes: ``clam`` (CLAM: the side read at ``patch_level``, so
        ``read_region(xy, patch_level, (patch_size, patch_size))`` reads the patch; used in bags) or
        ``trident`` (TRIDENT: the side at ``target_magnification``; used in TRIDENT coordinate files).

    Returns
    -------
    dict
        ``patch_size``, ``patch_level``, ``name``, ``patch_size_level0``, ``level0_magnification`` and
        ``target_magnification`` (10 / MPP, floats), ``level0_width``, ``level0_height``, ``overlap``.
        ``patch_size_level0`` is rounded *down* to whole level-0 px (the exact float stays in our own
        attributes): TRIDENT writes an integer (``patch_size * level0_mag // target_mag``) and TITAN
        floor-divides the coordinates by it to place each patch in a grid cell, which with our grid
        (``round(i * step)``) keeps every patch in its own cell while i < (size - 0.5) / fraction(size),
        e.g. about 500 patches per side for a 256.51 px step, 20000 for 1024.05 px.
    """
    out: dict[str, Any] = {}
    size = attrs.get("read_size") if patch_size == "clam" else attrs.get("target_patch_size")
    if size is not None:
        out["patch_size"] = int(size)
    if attrs.get("patch_level") is not None:
        out["patch_level"] = int(attrs["patch_level"])
    if attrs.get("slide_id"):
        out["name"] = str(attrs["slide_id"])
    if attrs.get("patch_size_level0"):
        out["patch_size_level0"] = int(math.floor(float(attrs["patch_size_level0"]) + 1e-6))
    if attrs.get("mpp_level0"):
        out["level0_magnification"] = MAGNIFICATION_UM / float(attrs["mpp_level0"])
    if attrs.get("target_mpp"):
        out["target_magnification"] = MAGNIFICATION_UM / float(attrs["target_mpp"])
    for ours, theirs in (("width", "level0_width"), ("height", "level0_height"), ("overlap", "overlap")):
        if attrs.get(ours) is not None:
            out[theirs] = int(attrs[ours])
    return out


def write_bag(path: Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, Any] | None = None) -> None:
    """Write an HDF5 bag atomically (features [N, D], coords [N, 2]).

    ``coords`` gets :func:`peer_coords_attrs` (CLAM meaning of ``patch_size``; an explicit ``patch_size``
    in ``attrs`` wins, as CLAM's side at ``patch_level``).
    """
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64)
    if features.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise ValueError(f"features {features.shape} and coords {coords.shape} do not form a bag")
    meta = {"format": "wsi-mil-bag", "format_version": FORMAT_VERSION, "wsi_mil_version": __version__}
    meta.update(attrs or {})
    with atomic_output(Path(path)) as tmp:
        n, d = features.shape
        rows = max(1, min(n, max(1, (1 << 20) // max(1, d * features.dtype.itemsize))))
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features, chunks=(rows, d) if n else None,
                             compression="gzip" if n else None, compression_opts=1 if n else None, shuffle=bool(n))
            ds = f.create_dataset("coords", data=coords)
            for key, value in meta.items():
                f.attrs[key] = _h5_attr(value)
            peer = peer_coords_attrs(meta)
            if meta.get("patch_size") is not None:
                peer["patch_size"] = int(meta["patch_size"])
            for key, value in peer.items():
                ds.attrs[key] = value
            for key, value in (("encoder", meta.get("encoder")), ("name", peer.get("name"))):
                if value is not None:  # TRIDENT's feature files name encoder and slide on `features`
                    f["features"].attrs[key] = str(value)


def _read_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{\"n":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_bag_attrs(path: Path) -> dict[str, Any]:
    """Only the attributes of a bag."""
    with h5py.File(path, "r") as f:
        return {k: _read_attr(v) for k, v in f.attrs.items()}


def read_bag_coords(path: Path) -> np.ndarray:
    """Only the coordinates [N, 2] (int64, level-0 x, y) of a bag."""
    with h5py.File(path, "r") as f:
        return f["coords"][:].astype(np.int64)


def read_bag(path: Path) -> Bag:
    """Read a whole bag, or raise a clear error naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"feature bag {path} does not exist; run `wsi-mil extract` first.")
    try:
        with h5py.File(path, "r") as f:
            return Bag(
                features=f["features"][:],
                coords=f["coords"][:].astype(np.int64),
                attrs={k: _read_attr(v) for k, v in f.attrs.items()},
            )
    except (OSError, KeyError) as exc:
        raise WsiMilError(f"feature bag {path} is unreadable ({exc}); delete it and rerun `wsi-mil extract`.") from None


# ------------------------------------------------------------------------------ CLAM coordinate export
def write_clam_coords(
    path: Path,
    coords: np.ndarray,
    *,
    patch_size: int,
    patch_level: int,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a CLAM-style ``coords`` HDF5 file atomically.

    CLAM reads ``read_region(coord, patch_level, (patch_size, patch_size))``, so ``patch_size`` here is
    the size read at ``patch_level`` (our ``read_size``); our target size and exact MPPs go in ``attrs``.
    """
    coords = np.asarray(coords, dtype=np.int64)
    with atomic_output(Path(path)) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=coords)
        ds.attrs["patch_size"] = int(patch_size)
        ds.attrs["patch_level"] = int(patch_level)
        f.attrs["patch_size"] = int(patch_size)
        f.attrs["patch_level"] = int(patch_level)
        for key, value in (attrs or {}).items():
            ds.attrs[key] = _h5_attr(value)


def write_trident_coords(path: Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write a TRIDENT coordinate file (``<slide>_patches.h5``) atomically from our tiling attributes.

    Dataset ``coords`` int64 [N, 2] (level-0 x, y) with :func:`peer_coords_attrs` in TRIDENT's meaning:
    ``patch_size`` is the side at ``target_magnification``, so TRIDENT re-reads the same patches.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_output(Path(path)) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=coords)
        for key, value in peer_coords_attrs(attrs, patch_size="trident").items():
            ds.attrs[key] = value
