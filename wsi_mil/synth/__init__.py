"""Synthetic slide cohorts with ground truth: the offline stand-in for CAMELYON16.

Real pyramidal slides that OpenSlide opens (Aperio SVS by default, generic tiled TIFF as option),
H&E-like tissue rendered from low-resolution fields, tumour recognisable only by nuclear morphology,
ground-truth masks (PNG) and outlines (GeoJSON, level-0 px), and ``labels.csv`` with patients.
Same seed, byte-identical files.

Layout written by :func:`generate_cohort`::

    OUT/slides/<id>.svs|.tiff
    OUT/truth/<id>.json                 label, width, height, mpp, downsample, tumour_fraction, seed, artefacts
    OUT/truth/<id>_tissue.png, _tumour.png          uint8 0/255 masks at `downsample`
    OUT/truth/<id>_tissue.geojson, _tumour.geojson  Polygons in level-0 pixel coordinates
    OUT/labels.csv                      slide_id,label(tumor|normal),patient_id

Modules: ``noise`` (deterministic hashing, textures, interpolation), ``fields`` (low-resolution
tissue/tumour/artefact fields of one slide), ``render`` (level-0 pixels of any region, on demand),
``pyramid`` (streaming Aperio SVS / generic pyramidal TIFF writer), ``cohort`` (slides, truth files,
labels.csv).
"""

from wsi_mil.synth.cohort import (
    FORMATS,
    MIN_SIZE,
    Cohort,
    SlideTruth,
    generate_cohort,
    load_truth,
    mask_geojson,
    plan_cohort,
    save_truth,
    write_slide,
)
from wsi_mil.synth.fields import ARTEFACTS, TUMOUR_KINDS

__all__ = [
    "ARTEFACTS", "FORMATS", "MIN_SIZE", "TUMOUR_KINDS", "Cohort", "SlideTruth", "generate_cohort", "load_truth",
    "mask_geojson", "plan_cohort", "save_truth", "write_slide",
]
