"""Small synthetic MIL cohorts written with the real bag writer (shared by the MIL-core tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wsi_mil.stores import write_bag


def write_cohort(
    root: Path,
    *,
    n_slides: int = 24,
    dim: int = 32,
    n_min: int = 16,
    n_max: int = 64,
    n_classes: int = 2,
    shift: float = 3.0,
    seed: int = 0,
    slides_per_patient: int = 1,
    label_names: list[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``n_slides`` bags into ``root/bags`` and ``root/labels.csv``; returns (features dir, labels csv).

    Class 0 bags hold Gaussian noise; a class-c bag (c >= 1) also holds 2-6 instances shifted by
    ``shift`` along class c's own random 4-d subspace, so the cohort is easy but not trivial.
    """
    rng = np.random.default_rng(seed)
    bags = Path(root) / "bags"
    bags.mkdir(parents=True, exist_ok=True)
    directions = []
    for _ in range(n_classes):
        v = np.zeros(dim, dtype=np.float32)
        v[rng.choice(dim, size=4, replace=False)] = 1.0
        directions.append(v)
    names = label_names or [str(c) for c in range(n_classes)]
    rows = []
    for i in range(n_slides):
        label = i % n_classes
        n = int(rng.integers(n_min, n_max + 1))
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        if label > 0:
            k = int(rng.integers(2, 7))
            idx = rng.choice(n, size=k, replace=False)
            feats[idx] += shift * directions[label]
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
        sid = f"slide_{i:03d}"
        write_bag(bags / f"{sid}.h5", feats, coords, {"encoder": "synthetic", "patch_size": 256, "patch_level": 0})
        rows.append({"slide_id": sid, "patient_id": f"p{i // slides_per_patient:03d}", "label": names[label]})
    labels = Path(root) / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return bags, labels
