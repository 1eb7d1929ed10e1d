"""Finished patch stores of random pixels in an output folder, written with the real store writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_mil.config import Config
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.stores import create_patch_store, mark_complete

# `wsi-mil extract` flags for a fast, offline, untrained encoder
EXTRACT_FLAGS = ["--encoder", "tiny_cnn", "--weights", "random", "--device", "cpu", "--batch-size", "16"]


def write_patch_stores(out: Path, cfg: Config, *, n: int, patches: int, patch_size: int, chunk_patches: int,
                       seed: int) -> None:
    """Slides ``s0``..``s{n-1}``: finished stores of ``patches`` random patches [P, P, 3] uint8 each.

    Patches are read at level 0 of a 0.25 um/px slide with twice their size (0.5 um/px); slide ``i``'s
    coordinates lie on row ``1000 * i`` (level-0 px).
    """
    layout, key = Layout(out), tiling_key(cfg)
    rng = np.random.default_rng(seed)
    read = 2 * patch_size
    for i in range(n):
        final = layout.patch_store(key, f"s{i}")
        group = create_patch_store(final, n_patches=patches, patch_size=patch_size, chunk_patches=chunk_patches, attrs={
            "slide_id": f"s{i}", "mpp_level0": 0.25, "target_mpp": 0.5, "patch_size_level0": read, "level": 0,
            "downsample": 1.0, "read_size": read, "slide_path": f"/slides/s{i}.svs"})
        group["patches"][:] = rng.integers(0, 256, (patches, patch_size, patch_size, 3), dtype=np.uint8)
        group["coords"][:] = np.stack([np.arange(patches) * read, np.full(patches, 1000 * i)], axis=1)
        mark_complete(final)
