"""Names of every output inside an output directory (the one place that defines them).

```
OUT/slides.csv                                   inventory + per-slide status/error
OUT/qc/<id>_thumb.png, <id>_mask.png, <id>_grid.png
OUT/tiles/<tiling_key>/<id>.zarr                 patch store (zarr v3)
OUT/features/<tiling_key>/<encoder_key>/<id>.h5  HDF5 bag
OUT/mlflow.db, OUT/mlartifacts/                  embedded MLflow store
OUT/heatmaps/<run_id>/<id>.png|.geojson
OUT/export/clam|trident/                         bags linked into CLAM's / TRIDENT's layout
```
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from wsi_mil.config import Config


def tiling_key(cfg: Config) -> str:
    """Name of the settings that change the patches, e.g. ``mpp0.50_px256_ov0_t1a2b3c``.

    The suffix hashes the tissue and patch-selection settings so that changing any of them writes
    under a new key instead of silently reusing stale patches.
    """
    t = cfg.tiling
    selection = cfg.fingerprint("tissue") + f"{t.tissue_threshold:.4f}{t.max_patches_per_slide}"
    digest = hashlib.sha256(selection.encode()).hexdigest()[:6]
    return f"mpp{t.target_mpp:.2f}_px{t.patch_size}_ov{t.overlap}_t{digest}"


@dataclass(frozen=True)
class Layout:
    """Paths inside one output directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def slides_csv(self) -> Path:
        return self.root / "slides.csv"

    @property
    def qc_dir(self) -> Path:
        return self.root / "qc"

    def tiles_dir(self, tiling: str) -> Path:
        return self.root / "tiles" / tiling

    def patch_store(self, tiling: str, slide_id: str) -> Path:
        return self.tiles_dir(tiling) / f"{slide_id}.zarr"

    def features_dir(self, tiling: str, encoder: str) -> Path:
        return self.root / "features" / tiling / encoder

    def bag(self, tiling: str, encoder: str, slide_id: str) -> Path:
        return self.features_dir(tiling, encoder) / f"{slide_id}.h5"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def tracking_uri(self) -> str:
        """The embedded default MLflow store (SQLite inside the output directory)."""
        return f"sqlite:///{self.mlflow_db.resolve()}"

    def heatmaps_dir(self, run_id: str) -> Path:
        return self.root / "heatmaps" / run_id

    def export_dir(self, tool: str) -> Path:
        """Bags linked into another tool's folder layout (``wsi-mil export clam|trident``)."""
        return self.root / "export" / tool

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"
