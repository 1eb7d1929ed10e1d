"""Slides, ground-truth files and labels.csv of a synthetic cohort (the CAMELYON16 stand-in)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import measure
from tqdm import tqdm

from wsi_mil.errors import WsiMilError
from wsi_mil.stores import atomic_output, clean_partials, write_text_atomic
from wsi_mil.synth.fields import ARTEFACTS, TUMOUR_KINDS, make_fields
from wsi_mil.synth.pyramid import write_pyramid
from wsi_mil.synth.render import Renderer

log = logging.getLogger(__name__)

MIN_SIZE = 1024
MAX_SIZE = 250_000
FORMATS = {"svs": ".svs", "tiff": ".tiff"}
TRUTH_VERSION = 1


@dataclass
class SlideTruth:
    """Ground truth of one slide; masks at ``downsample`` level-0 px per mask px."""

    slide_id: str
    label: int
    width: int
    height: int
    mpp: float
    downsample: float
    tissue_mask: np.ndarray
    tumour_mask: np.ndarray
    tumour_fraction: float


@dataclass
class Cohort:
    """Where a generated cohort lives."""

    root: Path
    slides_dir: Path
    truth_dir: Path
    labels_csv: Path
    slide_ids: list[str]


# ------------------------------------------------------------------------------------------ checks
def _check_slide_args(width: int, height: int, mpp: float, fmt: str, tumour: str | None,
                      artefacts: Sequence[str], where: str) -> None:
    for name, v in (("width", width), ("height", height)):
        if not MIN_SIZE <= int(v) <= MAX_SIZE:
            raise WsiMilError(f"{where}: slide {name} {v} px is outside {MIN_SIZE}..{MAX_SIZE}; "
                              f"pass a size of at least {MIN_SIZE} px (e.g. --size 4096).")
    if not (0.05 <= float(mpp) <= 10.0):
        raise WsiMilError(f"{where}: MPP {mpp} is not a plausible microns-per-pixel; use e.g. --mpp 0.25 (40x) or 0.5 (20x).")
    if fmt not in FORMATS:
        raise WsiMilError(f"{where}: unknown slide format {fmt!r}; use 'svs' or 'tiff'.")
    if tumour is not None and tumour not in TUMOUR_KINDS:
        raise WsiMilError(f"{where}: unknown tumour size {tumour!r}; use one of {', '.join(TUMOUR_KINDS)}.")
    bad = [a for a in artefacts if a not in ARTEFACTS]
    if bad:
        raise WsiMilError(f"{where}: unknown artefact(s) {bad}; use a subset of {', '.join(ARTEFACTS)}.")


# ------------------------------------------------------------------------------------------- slides
def write_slide(path: Path, *, width: int, height: int, seed: int, mpp: float = 0.25, fmt: str = "svs",
                tumour: str | None = None, artefacts: Sequence[str] = (), slide_id: str | None = None) -> SlideTruth:
    """Render one pyramidal synthetic slide to ``path`` (atomically) and return its ground truth.

    ``tumour`` None makes a normal slide (label 0); "micro" / "small" / "large" a tumour slide
    (label 1) whose tumour covers well under 1% / ~2-5% / 20-40% of the tissue.
    """
    path = Path(path)
    _check_slide_args(width, height, mpp, fmt, tumour, artefacts, str(path))
    slide_id = slide_id or path.stem
    fields = make_fields(int(width), int(height), int(seed), float(mpp), tumour, tuple(artefacts))
    renderer = Renderer(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        write_pyramid(tmp, renderer.region, width=int(width), height=int(height), mpp=float(mpp), fmt=fmt, name=slide_id)
    tissue_px = float(fields.tissue_mask.sum())
    return SlideTruth(
        slide_id=slide_id, label=int(tumour is not None), width=int(width), height=int(height), mpp=float(mpp),
        downsample=float(fields.ds), tissue_mask=fields.tissue_mask.copy(), tumour_mask=fields.tumour_mask.copy(),
        tumour_fraction=float(fields.tumour_mask.sum()) / tissue_px if tissue_px else 0.0,
    )


# -------------------------------------------------------------------------------------------- truth
def mask_geojson(mask: np.ndarray, downsample: float, name: str, width: int, height: int) -> dict:
    """A FeatureCollection of Polygons (with holes) outlining ``mask``, in level-0 pixel coordinates."""
    features = []
    labels, n = ndimage.label(mask)
    colour = [200, 0, 0] if name.lower().startswith("tum") else [0, 160, 0]

    def ring(contour: np.ndarray) -> list[list[float]]:
        c = measure.approximate_polygon(contour, tolerance=0.5) - 1.0  # undo the 1-px padding
        xs = np.clip((c[:, 1] + 0.5) * downsample, 0, width)
        ys = np.clip((c[:, 0] + 0.5) * downsample, 0, height)
        pts = [[round(float(x), 1), round(float(y), 1)] for x, y in zip(xs, ys, strict=True)]
        if pts[0] != pts[-1]:
            pts.append(pts[0])
        return pts

    for i in range(1, n + 1):
        comp = labels == i
        filled = ndimage.binary_fill_holes(comp)
        outer = max(measure.find_contours(np.pad(filled, 1).astype(np.float32), 0.5), key=len)
        rings = [ring(outer)]
        holes, nh = ndimage.label(filled & ~comp)
        for j in range(1, nh + 1):
            hc = measure.find_contours(np.pad(holes == j, 1).astype(np.float32), 0.5)
            if hc:
                rings.append(ring(max(hc, key=len)))
        rings = [r for r in rings if len(r) >= 4]
        if not rings:
            continue
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "name": name,
                           "classification": {"name": name, "color": colour}},
        })
    return {"type": "FeatureCollection", "features": features}


def _png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)


def save_truth(truth_dir: Path, truth: SlideTruth, **extra: object) -> None:
    """Write ``<id>.json``, ``<id>_tissue.png``, ``<id>_tumour.png`` and the two GeoJSON outlines."""
    truth_dir = Path(truth_dir)
    truth_dir.mkdir(parents=True, exist_ok=True)
    sid = truth.slide_id
    _write_bytes(truth_dir / f"{sid}_tissue.png", _png_bytes(truth.tissue_mask))
    _write_bytes(truth_dir / f"{sid}_tumour.png", _png_bytes(truth.tumour_mask))
    for kind, mask, name in (("tissue", truth.tissue_mask, "Tissue"), ("tumour", truth.tumour_mask, "Tumor")):
        gj = mask_geojson(mask, truth.downsample, name, truth.width, truth.height)
        write_text_atomic(truth_dir / f"{sid}_{kind}.geojson", json.dumps(gj))
    meta = {"slide_id": sid, "label": truth.label, "width": truth.width, "height": truth.height, "mpp": truth.mpp,
            "downsample": truth.downsample, "tumour_fraction": truth.tumour_fraction,
            "truth_version": TRUTH_VERSION, **extra}
    write_text_atomic(truth_dir / f"{sid}.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_truth(truth_dir: Path, slide_id: str) -> SlideTruth:
    """Read the ground truth written by :func:`save_truth`."""
    truth_dir = Path(truth_dir)
    meta_path = truth_dir / f"{slide_id}.json"
    try:
        meta = json.loads(meta_path.read_text())
        tissue = np.asarray(Image.open(truth_dir / f"{slide_id}_tissue.png")) > 127
        tumour = np.asarray(Image.open(truth_dir / f"{slide_id}_tumour.png")) > 127
    except (OSError, ValueError) as exc:
        raise WsiMilError(f"{meta_path}: ground truth of slide {slide_id!r} is missing or unreadable ({exc}); "
                          "regenerate the cohort with `wsi-mil synth`.") from exc
    return SlideTruth(slide_id=meta["slide_id"], label=int(meta["label"]), width=int(meta["width"]),
                      height=int(meta["height"]), mpp=float(meta["mpp"]), downsample=float(meta["downsample"]),
                      tissue_mask=tissue, tumour_mask=tumour, tumour_fraction=float(meta["tumour_fraction"]))


# ------------------------------------------------------------------------------------------- cohort
@dataclass(frozen=True)
class SlidePlan:
    """What one slide of a cohort will be."""

    slide_id: str
    patient_id: str
    seed: int
    tumour: str | None
    artefacts: tuple[str, ...]


def plan_cohort(n_slides: int, seed: int, tumour: str = "small", positive_fraction: float = 0.5,
                artefacts: bool = False) -> list[SlidePlan]:
    """Decide labels, tumour sizes, artefacts, seeds and patients of every slide (deterministic)."""
    rng = np.random.default_rng([int(seed), 0xC0407])
    n_pos = int(round(n_slides * positive_fraction))
    if 0 < positive_fraction < 1 and n_slides >= 2:
        n_pos = min(max(n_pos, 1), n_slides - 1)  # a mixed cohort always has both classes
    positive = np.zeros(n_slides, bool)
    positive[:n_pos] = True
    rng.shuffle(positive)
    # patients: about a quarter of the slides come in pairs from one patient
    n_pairs = max(1, n_slides // 4) if n_slides >= 3 else 0
    order = rng.permutation(n_slides)
    owner = np.arange(n_slides)
    for p in range(n_pairs):
        a, b = order[2 * p], order[2 * p + 1]
        owner[max(a, b)] = min(a, b)
    patient_names: dict[int, str] = {}
    plans = []
    for i in range(n_slides):
        pid = patient_names.setdefault(int(owner[i]), f"patient_{len(patient_names):03d}")
        kind = None
        if positive[i]:
            kind = str(rng.choice(TUMOUR_KINDS)) if tumour == "mixed" else tumour
        arts: tuple[str, ...] = ()
        if artefacts and rng.random() < 0.6:
            chosen = [a for a in ARTEFACTS if rng.random() < 0.5]
            arts = tuple(chosen or [str(rng.choice(ARTEFACTS))])
        slide_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        plans.append(SlidePlan(f"slide_{i:03d}", pid, slide_seed, kind, arts))
    return plans


def _is_done(truth_dir: Path, slide_path: Path, plan: SlidePlan, params: dict) -> bool:
    meta_path = truth_dir / f"{plan.slide_id}.json"
    if not (slide_path.exists() and meta_path.exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in params.items()) and all(
        (truth_dir / f"{plan.slide_id}{s}").exists()
        for s in ("_tissue.png", "_tumour.png", "_tissue.geojson", "_tumour.geojson"))


def generate_cohort(out: Path, *, n_slides: int, seed: int, size: int = 8192, fmt: str = "svs",
                    tumour: str = "small", positive_fraction: float = 0.5, artefacts: bool = False,
                    mpp: float = 0.25) -> Cohort:
    """Write a cohort: ``OUT/slides/<id>.svs|.tiff``, ``OUT/truth/<id>.*`` and ``OUT/labels.csv``.

    Rerunning with the same settings skips finished slides; an interrupted slide is redone. Same
    arguments, byte-identical files.

    Parameters
    ----------
    out : Path
        Cohort directory.
    n_slides : int
        Number of slides (at least 1).
    seed : int
        Random seed.
    size : int
        Width and height of every slide, level-0 px.
    fmt : {'svs', 'tiff'}
        Aperio SVS or generic pyramidal TIFF.
    tumour : {'micro', 'small', 'large', 'mixed'}
        Tumour size on positive slides.
    positive_fraction : float
        Share of tumour slides, in [0, 1].
    artefacts : bool
        Add pen marks, blur and folds to some slides.
    mpp : float
        Level-0 microns per pixel.

    Returns
    -------
    Cohort
        Paths of the slides, the ground truth (masks, GeoJSON in level-0 px) and ``labels.csv``.

    Raises
    ------
    WsiMilError
        Naming the argument, when one is out of range.
    """
    out = Path(out)
    if int(n_slides) < 1:
        raise WsiMilError(f"{out}: cannot generate {n_slides} slides; ask for at least 1 (e.g. --slides 8).")
    if tumour != "mixed" and tumour not in TUMOUR_KINDS:
        raise WsiMilError(f"{out}: unknown tumour size {tumour!r}; use micro, small, large or mixed.")
    if not 0.0 <= float(positive_fraction) <= 1.0 or math.isnan(float(positive_fraction)):
        raise WsiMilError(f"{out}: positive fraction {positive_fraction} must lie in [0, 1] (e.g. --positive-fraction 0.5).")
    _check_slide_args(size, size, mpp, fmt, None, (), str(out))
    slides_dir, truth_dir = out / "slides", out / "truth"
    slides_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    clean_partials(slides_dir)
    clean_partials(truth_dir)
    plans = plan_cohort(int(n_slides), int(seed), tumour, float(positive_fraction), bool(artefacts))
    for i, plan in enumerate(tqdm(plans, desc="synth", unit="slide", disable=None), 1):
        slide_path = slides_dir / f"{plan.slide_id}{FORMATS[fmt]}"
        params = {"seed": plan.seed, "width": size, "height": size, "mpp": float(mpp), "format": fmt,
                  "tumour": plan.tumour, "artefacts": list(plan.artefacts), "truth_version": TRUTH_VERSION}
        if _is_done(truth_dir, slide_path, plan, params):
            log.info("%s: already generated, skipped", slide_path)
            continue
        truth = write_slide(slide_path, width=size, height=size, seed=plan.seed, mpp=mpp, fmt=fmt,
                            tumour=plan.tumour, artefacts=plan.artefacts, slide_id=plan.slide_id)
        save_truth(truth_dir, truth, seed=plan.seed, format=fmt, tumour=plan.tumour,
                   artefacts=list(plan.artefacts), patient_id=plan.patient_id)
        log.info("synth: slide %d of %d written (%s)", i, len(plans), slide_path.name)  # progress where no bar shows
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label", "patient_id"])
    for plan in plans:
        writer.writerow([plan.slide_id, "tumor" if plan.tumour else "normal", plan.patient_id])
    labels_csv = out / "labels.csv"
    write_text_atomic(labels_csv, buf.getvalue())
    return Cohort(root=out, slides_dir=slides_dir, truth_dir=truth_dir, labels_csv=labels_csv,
                  slide_ids=[p.slide_id for p in plans])
