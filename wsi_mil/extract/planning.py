"""What to embed: finished bags are kept (resume), leftovers removed, everything else becomes a job.

A bag whose attributes match (same encoder key, same patch store signature, same precision, same
patch count) is reused; a bag whose patch store was deleted after embedding is kept; anything else is
redone. The bag's attributes copy the patch store's (tiling settings, exact MPPs, slide fingerprint)
and add ours and CLAM's (``patch_size``, ``patch_level``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.config import Config, FeaturesConfig
from wsi_mil.encoders import encoder_key
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout, path_component
from wsi_mil.reports import SlideResult
from wsi_mil.stores import (
    FORMAT_VERSION,
    PARTIAL_TAG,
    PatchStore,
    atomic_output,
    open_patch_store,
    read_bag,
    read_bag_attrs,
)

_STORE_ONLY_ATTRS = ("format", "format_version", "complete", "wsi_mil_version")


@dataclass
class Job:
    """One slide to embed."""

    slide_id: str
    store: Path
    bag: Path
    n_patches: int
    chunk: int
    attrs: dict[str, Any]
    parts: list[torch.Tensor] = field(default_factory=list)
    remaining: int = 0
    error: str = ""
    started: float = field(default_factory=time.perf_counter)  # reset when the stream reaches this slide
    seconds: float = 0.0  # from the stream reaching this slide to its last block embedded (this slide only)


def store_signature(store: PatchStore) -> str:
    """A short hash of a patch store's attributes and shape: a re-tiled store gets a new signature."""
    attrs = {k: v for k, v in store.attrs.items() if k != "complete"}
    text = json.dumps(attrs, sort_keys=True, default=str) + str(tuple(store.patches.shape))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _clam_patch_size(attrs: dict[str, Any], patch_size: int) -> int:
    """CLAM's ``patch_size``: the patch side in pixels at ``patch_level``."""
    if attrs.get("read_size"):
        return int(attrs["read_size"])
    if attrs.get("patch_size_level0") and attrs.get("downsample"):
        return int(round(float(attrs["patch_size_level0"]) / float(attrs["downsample"])))
    return int(patch_size)


def bag_attrs(store: PatchStore, slide_id: str, tiling: str, cfg: FeaturesConfig) -> dict[str, Any]:
    """Bag attributes that do not depend on the built encoder: the store's tiling attributes and ours."""
    attrs = {k: v for k, v in store.attrs.items() if k not in _STORE_ONLY_ATTRS}
    attrs.update(
        slide_id=slide_id,
        tiling_key=tiling,
        patch_store=str(store.path.resolve()),
        patch_store_signature=store_signature(store),
        patch_store_format_version=store.attrs.get("format_version"),
        n_patches=len(store),
        target_patch_size=store.patch_size,
        patch_level=int(store.attrs.get("level", 0) or 0),
        patch_size=_clam_patch_size(store.attrs, store.patch_size),
        encoder_key=encoder_key(cfg),
        precision=cfg.precision,
    )
    return attrs


def bag_is_current(bag: Path, expected: dict[str, Any]) -> bool:
    """True when ``bag`` is a finished bag made from the same store with the same encoder and precision."""
    if not bag.is_file():
        return False
    try:
        attrs = read_bag_attrs(bag)
    except Exception:
        return False
    keys = ("encoder_key", "patch_store_signature", "precision", "n_patches", "slide_id", "tiling_key")
    return attrs.get("format_version") == FORMAT_VERSION and all(attrs.get(k) == expected[k] for k in keys)


def finished_bag(bag: Path, key: str, tiling: str) -> bool:
    """A readable bag of this encoder and tiling (used when its patch store is gone)."""
    try:
        attrs = read_bag_attrs(bag) if bag.is_file() else {}
    except Exception:
        return False
    return attrs.get("encoder_key") == key and attrs.get("tiling_key") == tiling


def pt_path(bag: Path) -> Path:
    """Where the optional ``.pt`` export of a bag goes (beside it)."""
    return bag.with_suffix(".pt")


def write_pt(bag: Path, features: np.ndarray) -> None:
    """Write the optional float32 ``.pt`` export of a bag's features, atomically."""
    with atomic_output(pt_path(bag)) as tmp, open(tmp, "wb") as fh:
        torch.save(torch.from_numpy(np.asarray(features, dtype=np.float32)), fh)


def discover_slides(layout: Layout, tiling: str, slide_ids: list[str] | None) -> list[str]:
    """``slide_ids`` (deduplicated, each checked to name a file), or every finished patch store of the tiling.

    Raises
    ------
    WsiMilError
        When there is none, or a given id cannot name a file (:func:`wsi_mil.layout.path_component`).
    """
    if slide_ids is not None:
        return [path_component(sid) for sid in dict.fromkeys(slide_ids)]
    tiles = layout.tiles_dir(tiling)
    found = sorted(p.name[: -len(".zarr")] for p in tiles.glob("*.zarr")
                   if PARTIAL_TAG not in p.name and ".old-" not in p.name) if tiles.is_dir() else []
    if not found:
        raise WsiMilError(f"no patch stores under {tiles}; run `wsi-mil tile` first with the same tiling settings "
                          f"(tiling key {tiling}).")
    return found


def plan_slides(layout: Layout, tiling: str, cfg: Config, slide_ids: list[str]) -> tuple[list[Job], list[SlideResult]]:
    """Split slides into jobs to run and finished results (skipped, or failed before any compute)."""
    key = encoder_key(cfg.features)
    jobs: list[Job] = []
    results: list[SlideResult] = []
    for slide_id in slide_ids:
        bag = layout.bag(tiling, key, slide_id)
        store_path = layout.patch_store(tiling, slide_id)
        if not store_path.exists() and finished_bag(bag, key, tiling):
            # patch stores are often deleted to save space once embedded: the bag is still valid
            results.append(SlideResult(slide_id, "reused", output=bag))
            continue
        try:
            store = open_patch_store(store_path)
        except WsiMilError as exc:
            results.append(SlideResult(slide_id, "failed", str(exc)))
            continue
        if len(store) == 0:
            results.append(SlideResult(slide_id, "failed", f"patch store {store.path} holds no patches; check the "
                                       "tissue and tiling settings and rerun `wsi-mil tile`."))
            continue
        attrs = bag_attrs(store, slide_id, tiling, cfg.features)
        if bag_is_current(bag, attrs):
            if cfg.features.export_pt and not pt_path(bag).is_file():
                write_pt(bag, read_bag(bag).features)
            results.append(SlideResult(slide_id, "reused", n_patches=len(store), output=bag))
            continue
        jobs.append(Job(slide_id, store.path, bag, len(store), int(store.patches.chunks[0]), attrs))
    return jobs, results
