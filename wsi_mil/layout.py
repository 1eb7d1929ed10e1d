"""Names of every output inside an output directory: the one place that composes output paths.

```
OUT/slides.csv                                   inventory + per-slide status/error
OUT/qc/<id>_thumb.jpg, <id>_mask.png, <id>_grid.jpg
OUT/tiles/<tiling_key>/<id>.zarr                 patch store (zarr v3)
OUT/tiles/<tiling_key>/clam_coords/<id>.h5       CLAM-style coordinates (tiling.export_clam_h5)
OUT/features/<tiling_key>/<encoder_key>/<id>.h5  HDF5 bag
OUT/features/<tiling_key>/<encoder_key>/extract_status.csv
OUT/mlflow.db, OUT/mlartifacts/                  embedded MLflow store
OUT/.locks/                                      lock files of commands sharing OUT (claims: .claims/ beside outputs)
OUT/heatmaps/<model>/<run>/<id>.png|.geojson|_topk.png|_heatmap.tif   one folder per run: never overwritten
                                                 by another run's maps (<run>: the run's short id)
OUT/predictions/<run_id>/                        new slides of `wsi-mil predict`: laid out like OUT
                                                 (slides.csv, qc/, tiles/, features/) plus
                                                 predictions.csv and heatmaps/<id>.png|.geojson
OUT/results/summary.md                           the latest run of each model: test metrics, where to look
OUT/results/<model>/predictions.csv              per-slide test predictions of the model's latest run
OUT/export/clam|trident/                         bags linked into CLAM's / TRIDENT's layout
```

Every name that comes from outside (a slide id from a file name, a labels or override CSV or the
command line; a run id; a settings key) becomes a path component through :func:`path_component`,
which refuses anything that could leave its directory; :func:`slide_file` is that check for the
files named after a slide anywhere else (heatmaps, annotations, exports).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from wsi_mil.config import Config
from wsi_mil.errors import SlideError, WsiMilError

QCImage = Literal["thumb", "mask", "grid"]
PLAIN_NAMES = "no '/', '\\', '..', absolute paths or control characters"


def unsafe_name_reason(name: str) -> str | None:
    r"""Why ``name`` cannot be one path component, or None when it can.

    Refused: the empty name, ``.`` and ``..``, path separators (``/`` and ``\``), absolute or
    drive paths (``/etc/x``, ``C:x``), NUL and other control characters.
    """
    if not name.strip():
        return "it is empty"
    if name in (".", ".."):
        return f"'{name}' names a directory, not a file"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "it contains a control character"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "it is an absolute or drive path"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    return None


def path_component(name: str, what: str = "slide id") -> str:
    """``name`` unchanged, once checked to be one path component that stays inside its directory.

    Parameters
    ----------
    name : str
        A slide id (from a file name, a labels or override CSV, ``--slides``...), a run id or a key.
    what : str
        What the name is, for the error message.

    Returns
    -------
    str
        ``name`` itself.

    Raises
    ------
    SlideError
        For a slide id that could leave its directory (see :func:`unsafe_name_reason`).
    WsiMilError
        For any other name that could.
    """
    name = str(name)
    reason = unsafe_name_reason(name)
    if reason is None:
        return name
    error = SlideError if what == "slide id" else WsiMilError
    raise error(f"{what} {name!r} cannot name a file: {reason}; {what}s must be plain names such as 'S01' "
                f"({PLAIN_NAMES}).")


def slide_file(directory: Path | str, slide_id: str, suffix: str) -> Path:
    """``directory / (slide_id + suffix)``, the slide id checked by :func:`path_component`.

    ``suffix`` is a constant of the caller (``".png"``, ``"_topk.png"``); the result stays in ``directory``.
    """
    return Path(directory) / f"{path_component(slide_id)}{suffix}"


def tiling_key(cfg: Config) -> str:
    """Name of the settings that change the patches, e.g. ``mpp0.50_px256_ov0_t1a2b3c``.

    The suffix hashes the tissue and patch-selection settings so that changing any of them writes
    under a new key instead of silently reusing stale patches.
    """
    t = cfg.tiling
    selection = cfg.fingerprint("tissue") + f"{t.tissue_threshold:.4f}{t.max_patches_per_slide}"
    digest = hashlib.sha256(selection.encode()).hexdigest()[:6]
    return f"mpp{t.target_mpp:.2f}_px{t.patch_size}_ov{t.overlap}_t{digest}"


def model_folder(label: str) -> str:
    """A model's folder name from its label: ``abmil`` -> ``abmil``, ``mhim(transmil)`` -> ``mhim-transmil``."""
    name = re.sub(r"[^a-z0-9]+", "-", str(label).lower()).strip("-")
    return path_component(name or "model", "model name")


def run_folder(run_id: str) -> str:
    """The short form of a run id that names its heatmap folder (first 8 characters)."""
    return path_component(str(run_id)[:8], "run id")


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
        """One QC image of a slide: its thumbnail and patch grid (JPEG) or tissue mask (PNG)."""
        return slide_file(self.qc_dir, slide_id, f"_{kind}.{'png' if kind == 'mask' else 'jpg'}")

    def qc_images(self, slide_id: str) -> dict[str, Path]:
        """The three QC images of a slide, by kind."""
        return {kind: self.qc_image(slide_id, kind) for kind in ("thumb", "mask", "grid")}

    def tiles_dir(self, tiling: str) -> Path:
        """Patch stores of one tiling key."""
        return self.root / "tiles" / path_component(tiling, "tiling key")

    def patch_store(self, tiling: str, slide_id: str) -> Path:
        """The Zarr patch store of a slide."""
        return slide_file(self.tiles_dir(tiling), slide_id, ".zarr")

    def clam_coords(self, tiling: str, slide_id: str) -> Path:
        """CLAM-style coordinate HDF5 file of a slide."""
        return slide_file(self.tiles_dir(tiling) / "clam_coords", slide_id, ".h5")

    # ------------------------------------------------------------------------------ features
    def features_dir(self, tiling: str, encoder: str) -> Path:
        """HDF5 bags of one tiling key and encoder key."""
        return self.root / "features" / path_component(tiling, "tiling key") / path_component(encoder, "encoder key")

    def bag(self, tiling: str, encoder: str, slide_id: str) -> Path:
        """The HDF5 bag of a slide."""
        return slide_file(self.features_dir(tiling, encoder), slide_id, ".h5")

    def extract_status(self, tiling: str, encoder: str) -> Path:
        """Per-slide status of the last embedding run into a features directory."""
        return self.features_dir(tiling, encoder) / "extract_status.csv"

    @property
    def locks_dir(self) -> Path:
        """Inter-process lock files of commands sharing this directory (shared CSVs, claim takeovers)."""
        return self.root / ".locks"

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

    def heatmaps_dir(self, run_id: str, model: str | None = None) -> Path:
        """Heatmaps of one training run: ``heatmaps/<model>/<short run id>`` (``heatmaps/<run id>`` without a model).

        ``model`` is the model's label (``abmil``, ``mhim(abmil)``), turned into a folder by :func:`model_folder`.
        """
        if model is None:
            return self.heatmaps_root / path_component(run_id, "run id")
        return self.heatmaps_root / model_folder(model) / run_folder(run_id)

    def predictions_dir(self, run_id: str) -> Path:
        """Output directory of `wsi-mil predict` with one run (itself laid out like OUT)."""
        return self.root / "predictions" / path_component(run_id, "run id")

    @property
    def predictions_csv(self) -> Path:
        """The predictions table of a `wsi-mil predict` output directory."""
        return self.root / "predictions.csv"

    def export_dir(self, tool: str) -> Path:
        """Bags linked into another tool's folder layout (``wsi-mil export clam|trident``)."""
        return self.root / "export" / path_component(tool, "export layout")

    @property
    def results_dir(self) -> Path:
        """Results at a glance: the summary and per-model predictions."""
        return self.root / "results"

    @property
    def summary_md(self) -> Path:
        """The summary: the latest run of each model (and, after `wsi-mil run`, what each stage did)."""
        return self.results_dir / "summary.md"

    def model_results_dir(self, model: str) -> Path:
        """Results of one model (its label, see :func:`model_folder`)."""
        return self.results_dir / model_folder(model)

    def model_predictions_csv(self, model: str) -> Path:
        """Per-slide test predictions of a model's latest run."""
        return self.model_results_dir(model) / "predictions.csv"
