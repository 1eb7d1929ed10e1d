"""Names of every output inside an output directory: the one place that composes output paths.

```
OUT/slides.csv                                   inventory + per-slide status/error
OUT/qc/<id>_thumb.png, <id>_mask.png, <id>_grid.png
OUT/tiles/<tiling_key>/<id>.zarr                 patch store (zarr v3)
OUT/tiles/<tiling_key>/clam_coords/<id>.h5       CLAM-style coordinates (tiling.export_clam_h5)
OUT/features/<tiling_key>/<encoder_key>/<id>.h5  HDF5 bag
OUT/features/<tiling_key>/<encoder_key>/extract_status.csv
OUT/mlflow.db, OUT/mlartifacts/                  embedded MLflow store
OUT/heatmaps/<run_id>/<id>.png|.geojson|_topk.png|_heatmap.tif
OUT/predictions/<run_id>/                        new slides of `wsi-mil predict`: laid out like OUT
                                                 (slides.csv, qc/, tiles/, features/) plus
                                                 predictions.csv and heatmaps/<id>.png|.geojson
OUT/summary.md                                   `wsi-mil run` summary table
OUT/export/clam|trident/                         bags linked into CLAM's / TRIDENT's layout
```
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from wsi_mil.config import Config

QCImage = Literal["thumb", "mask", "grid"]


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
    """Paths inside one output directory (see the module docstring for the tree)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------------------ tiling
    @property
    def slides_csv(self) -> Path:
        """The slide inventory with each slide's status and error."""
        return self.root / "slides.csv"

    @property
    def qc_dir(self) -> Path:
        """Quality-control images of tissue detection and tiling."""
        return self.root / "qc"

    def qc_image(self, slide_id: str, kind: QCImage) -> Path:
        """One QC image of a slide: its thumbnail, tissue mask or patch grid."""
        return self.qc_dir / f"{slide_id}_{kind}.png"

    def qc_images(self, slide_id: str) -> dict[str, Path]:
        """The three QC images of a slide, by kind."""
        return {kind: self.qc_image(slide_id, kind) for kind in ("thumb", "mask", "grid")}

    def tiles_dir(self, tiling: str) -> Path:
        """Patch stores of one tiling key."""
        return self.root / "tiles" / tiling

    def patch_store(self, tiling: str, slide_id: str) -> Path:
        """The Zarr patch store of a slide."""
        return self.tiles_dir(tiling) / f"{slide_id}.zarr"

    def clam_coords(self, tiling: str, slide_id: str) -> Path:
        """CLAM-style coordinate HDF5 file of a slide."""
        return self.tiles_dir(tiling) / "clam_coords" / f"{slide_id}.h5"

    # ------------------------------------------------------------------------------ features
    def features_dir(self, tiling: str, encoder: str) -> Path:
        """HDF5 bags of one tiling key and encoder key."""
        return self.root / "features" / tiling / encoder

    def bag(self, tiling: str, encoder: str, slide_id: str) -> Path:
        """The HDF5 bag of a slide."""
        return self.features_dir(tiling, encoder) / f"{slide_id}.h5"

    def extract_status(self, tiling: str, encoder: str) -> Path:
        """Per-slide status of the last embedding run into a features directory."""
        return self.features_dir(tiling, encoder) / "extract_status.csv"

    # ------------------------------------------------------------------------------ tracking
    @property
    def mlflow_db(self) -> Path:
        """The embedded MLflow store."""
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """Artifacts of the embedded MLflow store."""
        return self.root / "mlartifacts"

    @property
    def tracking_uri(self) -> str:
        """The embedded default MLflow store (SQLite inside the output directory)."""
        return f"sqlite:///{self.mlflow_db.resolve()}"

    # ------------------------------------------------------------------------------ results
    @property
    def heatmaps_root(self) -> Path:
        """Heatmaps of every run."""
        return self.root / "heatmaps"

    def heatmaps_dir(self, run_id: str) -> Path:
        """Heatmaps of one training run."""
        return self.heatmaps_root / run_id

    def predictions_dir(self, run_id: str) -> Path:
        """Output directory of `wsi-mil predict` with one run (itself laid out like OUT)."""
        return self.root / "predictions" / run_id

    @property
    def predictions_csv(self) -> Path:
        """The predictions table of a `wsi-mil predict` output directory."""
        return self.root / "predictions.csv"

    def export_dir(self, tool: str) -> Path:
        """Bags linked into another tool's folder layout (``wsi-mil export clam|trident``)."""
        return self.root / "export" / tool

    @property
    def summary_md(self) -> Path:
        """The `wsi-mil run` summary table."""
        return self.root / "summary.md"
