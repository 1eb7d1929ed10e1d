"""A montage of the highest-scoring patches, read from the patch store."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.heatmaps.render import as_rgb
from wsi_mil.stores import atomic_output


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest finite scores, highest first (ties: lower index first)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if k <= 0 or values.size == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.flatnonzero(np.isfinite(values))
    order = np.argsort(-values[candidates], kind="stable")
    return candidates[order[:k]].astype(np.int64)


def _read_rows(patches: Any, indices: np.ndarray) -> np.ndarray:
    """Read only the given rows of an [N, P, P, 3] array (numpy, zarr or h5py-like)."""
    if len(indices) == 0:
        return np.zeros((0,) + tuple(patches.shape[1:]), dtype=np.uint8)
    order = np.argsort(indices)
    sorted_idx = indices[order]
    if isinstance(patches, np.ndarray):
        rows = patches[sorted_idx]
    elif hasattr(patches, "get_orthogonal_selection"):  # zarr: each touched chunk is decoded once
        rows = np.asarray(patches.get_orthogonal_selection((sorted_idx,)))
    else:
        rows = np.stack([np.asarray(patches[int(i)]) for i in sorted_idx])
    out = np.empty_like(rows)
    out[order] = rows
    return out


def top_k_montage(
    patches: Any,
    scores: np.ndarray,
    k: int,
    out_png: Path,
    *,
    title: str = "",
) -> Path:
    """Save a grid of the ``k`` highest-scoring patches, each captioned with rank, index and score.

    Only those ``k`` rows are read from ``patches`` ([N, P, P, 3] numpy, zarr or h5py array).
    Non-finite scores are never chosen. With no scored patch the image says so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(scores, dtype=np.float64).ravel()
    if patches.shape[0] != values.shape[0]:
        raise ValueError(f"{patches.shape[0]} patches but {values.shape[0]} scores; they must match one to one")
    chosen = top_k_indices(values, k)
    rows = _read_rows(patches, chosen)
    n = len(chosen)
    cols = max(1, math.ceil(math.sqrt(n)))
    nrows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(2.0 * cols, 2.0 * nrows + (0.4 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    if n == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no scored patches", ha="center", va="center")
        ax.set_axis_off()
    for rank, (index, patch) in enumerate(zip(chosen, rows, strict=True)):
        ax = fig.add_subplot(nrows, cols, rank + 1)
        ax.imshow(as_rgb(patch), interpolation="nearest")
        ax.set_title(f"#{rank + 1}  idx {int(index)}\n{values[index]:.4g}", fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(out_png)
