"""Typed, validated settings for every stage.

This module is the one place where defaults live. A YAML experiment file holds any subset of the
sections below; it is merged over the defaults, single keys can be overridden from the command line
(``--set training.epochs=20``), and the result is validated. Unknown keys, wrong types and
out-of-range values raise :class:`~wsi_mil.errors.ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wsi_mil.errors import ConfigError
from wsi_mil.registry import model_names, model_spec


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------- slides
class SlidesConfig(Section):
    """How slides are found and how their physical resolution is known."""

    extensions: list[str] = Field(
        default=[".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm",
                 ".png", ".jpg", ".jpeg"],
        description="File extensions taken as slides when scanning a directory (.png/.jpg: image regions of "
        "interest, which usually need slides.default_mpp or an override).",
    )
    recursive: bool = Field(default=False, description="Scan sub-directories too.")
    mpp_override_csv: Path | None = Field(
        default=None, description="CSV with columns slide_id,mpp overriding the slide's own level-0 MPP."
    )
    default_mpp: float | None = Field(
        default=None, gt=0,
        description="Level-0 MPP for slides that declare none or an implausible one (None: such slides fail).",
    )
    mpp_range: tuple[float, float] = Field(
        default=(0.05, 20.0),
        description="Plausible level-0 MPP of a microscope scan (um/px, min and max). A slide's MPP outside it, or "
        "a writer's default (72/96/300 dpi, 1 px/cm), counts as no MPP; overrides and default_mpp must lie in it.",
    )
    reader: Literal["auto", "jpeg-tiles", "openslide", "tifffile", "pillow"] = Field(
        default="auto",
        description="Slide reader: auto (OpenSlide where it can, tifffile for other TIFF/OME-TIFF, Pillow for "
        "PNG/JPEG) or one reader for every slide.",
    )
    fast_jpeg: bool = Field(
        default=True,
        description="With reader auto, decode the tiled JPEG pages of Aperio SVS and generic pyramidal TIFF "
        "directly (libjpeg-turbo through Pillow, at 1/2, 1/4 or 1/8 scale when patches are reduced by that "
        "factor; OpenSlide still gives the metadata); false: OpenSlide decodes them.",
    )

    @model_validator(mode="after")
    def _mpp_in_range(self) -> SlidesConfig:
        low, high = self.mpp_range
        if not 0 < low < high:
            raise ValueError(f"slides.mpp_range {list(self.mpp_range)} must be two increasing positive numbers")
        if self.default_mpp is not None and not low <= self.default_mpp <= high:
            raise ValueError(f"slides.default_mpp {self.default_mpp} lies outside slides.mpp_range "
                             f"{list(self.mpp_range)}; give microns per pixel, e.g. 0.25 (40x) or 0.5 (20x)")
        return self


# --------------------------------------------------------------------------------------------- tissue
TISSUE_PRESETS: dict[str, dict[str, Any]] = {
    # H&E at usual staining strength
    "default": {"median_blur": 7, "saturation_threshold": None, "otsu_scale": 1.0, "min_saturation": 15.0,
                "remove_pen": True, "closing_um": 16.0, "min_tissue_area_um2": 10_000.0,
                "max_hole_area_um2": 5_000.0},
    # pale / faint staining, small biopsies: lower floor, softer Otsu, keep smaller pieces
    "faint": {"median_blur": 7, "saturation_threshold": None, "otsu_scale": 0.5, "min_saturation": 6.0,
              "remove_pen": True, "closing_um": 32.0, "min_tissue_area_um2": 5_000.0,
              "max_hole_area_um2": 10_000.0},
    # dirty slides (dust, faint smears): higher floor, bigger minimum piece, less hole filling
    "strict": {"median_blur": 9, "saturation_threshold": None, "otsu_scale": 1.1, "min_saturation": 25.0,
               "remove_pen": True, "closing_um": 8.0, "min_tissue_area_um2": 50_000.0,
               "max_hole_area_um2": 2_000.0},
}


class TissueConfig(Section):
    """Tissue segmentation on a low-resolution thumbnail.

    ``preset`` selects a parameter set (see ``TISSUE_PRESETS``); each key below left at ``None`` takes
    the preset's value, a key given explicitly overrides it. :meth:`resolved` gives the values used.
    """

    preset: Literal["default", "faint", "strict"] = Field(
        default="default", description="Parameter set (default | faint | strict); explicit keys below override it."
    )
    thumbnail_mpp: float = Field(default=8.0, gt=0, description="Resolution of the segmentation thumbnail (um/px).")
    thumbnail_min_size: int = Field(
        default=512, ge=64,
        description="Small slides get a finer thumbnail so its longer side has at least this many pixels.",
    )
    median_blur: int | None = Field(default=None, ge=1, description="Median filter size in thumbnail pixels (odd); None = preset.")
    saturation_threshold: float | None = Field(
        default=None, ge=0, le=255, description="Fixed HSV-saturation threshold (0-255); None = preset (Otsu per slide)."
    )
    otsu_scale: float | None = Field(
        default=None, gt=0, le=2, description="Multiplier of the per-slide Otsu threshold; None = preset."
    )
    min_saturation: float | None = Field(
        default=None, ge=0, le=255, description="Floor under the Otsu threshold (0-255); None = preset."
    )
    remove_pen: bool | None = Field(default=None, description="Remove marker ink (red, blue, green, black); None = preset.")
    closing_um: float | None = Field(default=None, ge=0, description="Morphological closing radius (um); None = preset.")
    min_tissue_area_um2: float | None = Field(
        default=None, ge=0, description="Smallest tissue piece kept (um^2); None = preset."
    )
    max_hole_area_um2: float | None = Field(
        default=None, ge=0, description="Holes smaller than this are filled (um^2); None = preset."
    )

    def resolved(self) -> dict[str, Any]:
        """The effective parameters: the preset's values with explicit keys laid over them."""
        values = dict(TISSUE_PRESETS[self.preset])
        for key in values:
            explicit = getattr(self, key)
            if explicit is not None:
                values[key] = explicit
        values["thumbnail_mpp"] = self.thumbnail_mpp
        values["thumbnail_min_size"] = self.thumbnail_min_size
        values["preset"] = self.preset
        return values


# --------------------------------------------------------------------------------------------- tiling
class TilingConfig(Section):
    """Patch grid and patch store."""

    target_mpp: float = Field(default=0.5, gt=0, description="Patch resolution in um/px (0.5 ~ '20x').")
    patch_size: int = Field(default=256, ge=16, le=4096, description="Patch side in pixels at target_mpp.")
    overlap: int = Field(default=0, ge=0, description="Overlap between neighbouring patches (pixels at target_mpp).")
    tissue_threshold: float = Field(
        default=0.5, ge=0, le=1,
        description="Minimum tissue fraction of a patch for it to be kept (0.5: ~90% of the tissue covered with "
        "under 10% of the kept area on glass, see benchmarks/tissue.py; lower it for small or sparse tissue).",
    )
    chunk_patches: int = Field(default=64, ge=1, description="Patches per Zarr chunk and per Dask task.")
    codec: Literal["zstd", "lz4", "blosc-zstd", "none"] = Field(
        default="zstd", description="Compression of the patch array (chosen by benchmarks/tiling.py)."
    )
    compression_level: int = Field(
        default=1, ge=0, le=22,
        description="Codec level (zstd 1: about the size of level 3 at less than half the CPU; see benchmarks/tiling.py).",
    )
    write_from: Literal["workers", "client"] = Field(
        default="workers",
        description="Who writes patch chunks: 'workers' write straight into the store (needs a file system "
        "shared with the workers), 'client' receives the arrays and writes them.",
    )
    export_clam_h5: bool = Field(default=False, description="Also write CLAM-style coordinate HDF5 files.")
    max_patches_per_slide: int | None = Field(
        default=None, ge=1, description="Keep at most this many patches (evenly spaced); None keeps all."
    )
    max_grid_patches: int = Field(
        default=4_000_000, ge=1,
        description="Refuse a slide whose patch grid (before tissue selection) has more positions than this: "
        "it means a wrong MPP or settings, and would take hours and gigabytes.",
    )
    qc_images: bool = Field(default=True, description="Write the thumbnail, tissue mask and patch grid images to OUT/qc/.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> TilingConfig:
        if self.overlap >= self.patch_size:
            raise ValueError(f"tiling.overlap ({self.overlap}) must be smaller than tiling.patch_size ({self.patch_size})")
        return self


# ------------------------------------------------------------------------------------------- features
class FeaturesConfig(Section):
    """Patch encoder and the embedding stage."""

    encoder: str = Field(
        default="resnet50_trunc",
        description="Registry name (resnet50_trunc, resnet18, tiny_cnn) or any timm model, e.g. 'hf-hub:MahmoodLab/uni'.",
    )
    weights: str = Field(
        default="pretrained",
        description="'pretrained' (torchvision/timm download or cache), 'random', or a path to a local weights file.",
    )
    batch_size: int = Field(default=64, ge=1, description="Patches per forward pass.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="auto = cuda > mps > cpu.")
    num_workers: int = Field(
        default=2, ge=0,
        description="DataLoader worker processes reading the patch stores on a GPU/MPS device (0 = one background "
        "thread). On the CPU a background thread is always used: worker processes would only compete with the "
        "forward pass for the cores.",
    )
    prefetch: int = Field(default=4, ge=1, description="Blocks of patches read ahead of the forward pass (per reader).")
    precision: Literal["float32", "float16"] = Field(default="float32", description="Stored feature dtype.")
    amp: bool = Field(default=True, description="Mixed precision on GPU (bfloat16 where supported, else float16).")
    export_pt: bool = Field(default=False, description="Also write [N, D] float32 .pt tensors beside the bags.")
    encoder_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for timm.create_model (e.g. {init_values: 1.0e-5} for UNI).",
    )


# ---------------------------------------------------------------------------------------------- model
class MHIMConfig(Section):
    """Masked hard instance mining (Tang et al., ICCV 2023); see docs/MHIM-MIL.md for the reference values."""

    student: str = Field(
        default="abmil", description="Aggregator trained as teacher and student: a registered model with "
        "per-instance attention.", json_schema_extra={"choices": "students"},
    )
    cl_alpha: float = Field(default=0.1, ge=0, description="Weight of the teacher-student consistency loss.")
    mask_ratio_high: float = Field(default=0.01, ge=0, le=1, description="Initial high-attention mask ratio (decays to 0).")
    high_random_ratio: float = Field(default=0.5, gt=0, le=1, description="'hr': random fraction of the top-k actually masked.")
    mask_ratio_random: float = Field(default=0.5, ge=0, le=1, description="Uniformly random mask ratio.")
    mask_ratio_low: float = Field(default=0.0, ge=0, le=1, description="Low-attention mask ratio.")
    momentum: float = Field(default=0.9999, ge=0, le=1, description="Teacher EMA momentum.")
    momentum_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="Teacher EMA momentum: constant, or cosine from momentum up to 1.0."
    )
    teacher_eval: bool = Field(default=True, description="Run the teacher in eval mode (dropout off).")
    teacher_temperature: float = Field(
        default=0.1, gt=0, description="Softmax temperature of the teacher's bag embedding in the consistency loss."
    )
    student_temperature: float = Field(
        default=1.0, gt=0, description="Softmax temperature of the student's bag embedding in the consistency loss."
    )
    copy_embed: bool = Field(default=True, description="Student starts from the baseline's embedding layer.")
    baseline_run: str | None = Field(
        default=None, description="MLflow run id of a trained baseline (same folds); None trains one per fold."
    )
    baseline_min_epochs: int | None = Field(
        default=30, ge=0, description="training.min_epochs of the in-fold baseline (the stand-alone baseline "
        "presets' 30); None = training.min_epochs (the MHIM run's own, e.g. 130).",
    )
    baseline_patience: int | None = Field(
        default=20, ge=1, description="training.patience of the in-fold baseline; None = training.patience.",
    )

    @field_validator("student")
    @classmethod
    def _student_registered(cls, value: str) -> str:
        return _registered(value, student=True)


class INSConfig(Section):
    """Prototype-contrastive instance classifier (Qu et al., TCSVT); see docs/INS.md."""

    variant: Literal["features", "patches"] = Field(
        default="features", description="features: an MLP on the frozen bag features; patches: a CNN trained end "
        "to end on the RGB patches of the patch stores (GPU advised).",
    )
    backbone: str = Field(
        default="resnet18", description="CNN for the 'patches' variant: tiny_cnn, resnet18, resnet34, resnet50."
    )
    batch_size: int = Field(default=64, ge=2, description="Instances per SGD step (sampled across bags).")
    lr: float = Field(default=0.01, gt=0, description="SGD learning rate.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="constant = the reference's fixed lr; cosine = annealed to 0 over the epochs "
        "(torch CosineAnnealingLR).",
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(default=1e-3, ge=0, description="SGD weight decay (reference: 1e-3 CAMELYON16, 1e-5 TCGA).")
    queue_size: int = Field(default=8192, ge=1, description="Keys (with their class probabilities) kept in the queue.")
    proto_momentum: float = Field(default=0.9, ge=0, le=1, description="EMA momentum of the class prototypes.")
    ema: float = Field(default=0.999, ge=0, le=1, description="Key-encoder momentum.")
    contrastive_weight: float = Field(default=0.5, ge=0, description="Weight of the contrastive loss.")
    temperature: float = Field(default=0.07, gt=0, description="Temperature of the contrastive losses.")
    proto_start: int = Field(
        default=1, ge=0, description="Epoch from which PPLG and SupCon are used; the epochs before it are warm-up.",
    )
    warmup_contrastive_from: int = Field(
        default=0, ge=0, description="Warm-up epochs before this one are classifier-only (no contrastive pass; "
        "the reference's TCGA schedule has 1).",
    )
    checkpoint_from_proto_start: bool = Field(
        default=True, description="Early stopping and checkpoint choice consider epochs >= proto_start only (no "
        "checkpoint from before pseudo-labelling); False = every epoch.",
    )
    phi_start: float = Field(
        default=0.95, ge=0, le=1, description="PPLG: weight of the old soft target at the first epoch (linear to phi_end)."
    )
    phi_end: float = Field(default=0.8, ge=0, le=1, description="PPLG: weight of the old soft target at the last epoch.")
    embed_dim: int = Field(default=128, ge=2, description="Width of the L2-normalised contrastive embedding.")
    feature_dropout: float = Field(default=0.1, ge=0, lt=1, description="Feature-view augmentation: dropout.")
    feature_noise: float = Field(default=0.05, ge=0, description="Feature-view augmentation: Gaussian noise std.")
    bag_aggregator: Literal["auto", "mean", "max"] = Field(
        default="auto", description="auto = choose mean or max on the validation split."
    )
    pretrain_epochs: int = Field(
        default=1, ge=0, description="Warm-up epochs that end with a classifier-only pass over all instances where "
        "each instance takes its bag label (the reference's train_bag).",
    )
    pretrain_target: float | None = Field(
        default=None, gt=0.5, le=1,
        description="p(positive) target of positive-bag instances in the pretrain epochs; None = auto "
        "((0.5 + min(1, 0.5 / q)) / 2 with q the share of training instances in positive bags, 0.75 for balanced "
        "cohorts) so that the classifier's 0.5 boundary falls between negative- and positive-looking instances "
        "of positive bags when positives are rare; 1.0 = the reference's hard bag label.",
    )
    initial_positive_conf: float | None = Field(
        default=None, ge=0.5, lt=1,
        description="Initial soft target p(positive) of positive-bag instances; None = auto (same value as the "
        "auto pretrain target); 0.5 = the reference's uniform [0.5, 0.5], which collapses to all-negative "
        "pseudo labels when positives are rare.",
    )
    novelty_quantile: float | None = Field(
        default=0.99, gt=0, lt=1,
        description="Feature variant: the pretrain and initial soft targets of positive-bag instances come from "
        "novelty against negative bags (the distance to the k-th nearest negative-bag instance, standardised "
        "features): positive when it exceeds this quantile of the same distance of negative-bag instances to "
        "other negative bags, negative otherwise; None = the slide label (pretrain_target, initial_positive_conf; "
        "the reference). Folds with fewer than 5 negative training slides, and the patches variant (no features "
        "before training), start from the slide label.",
    )
    negative_quantile: float | None = Field(
        default=0.99, gt=0, le=1,
        description="Negative-bag guard on pseudo labels: a positive-bag instance may be pseudo-labelled positive "
        "(prototype update, contrastive labels, PPLG target) only when its p(positive) exceeds this quantile of the "
        "p(positive) of the negative-bag instances seen in the previous epoch (negative bags guarantee those are "
        "negative); None = the reference (argmax of the classifier, prototype argmax for PPLG).",
    )
    max_instances_per_epoch: int | None = Field(
        default=None, ge=1, description="Subsample instances per epoch (None = all)."
    )
    width: int = Field(default=512, ge=8, description="Feature variant: width of the MLP backbone (D -> width).")
    standardize: bool = Field(
        default=True, description="Feature variant: standardise features with the training split's mean/std."
    )
    backbone_weights: str | None = Field(
        default=None, description="Patches variant: local state-dict file for the CNN (None = random init)."
    )
    crop_scale: float = Field(default=0.5, gt=0, le=1, description="Patches variant: smallest random-resized-crop area.")
    color_jitter: float = Field(default=0.4, ge=0, le=1, description="Patches variant: colour-jitter strength.")
    shuffle_chunks: int = Field(
        default=8, ge=1, description="Patches variant: store chunks mixed per shuffle window (and kept decoded)."
    )


def _registered(name: str, *, student: bool = False) -> str:
    """``name`` when the model registry holds it (as an MHIM-capable student), else a ValueError."""
    try:
        spec = model_spec(name)
    except ConfigError as exc:
        raise ValueError(str(exc).rstrip(".")) from None
    if student and not (spec.kind == "aggregator" and spec.student):
        raise ValueError(f"{name!r} cannot be MHIM's student; choose one of: {', '.join(model_names(student=True))}")
    return name


class ModelConfig(Section):
    """Which MIL model to train and its architecture."""

    name: str = Field(
        default="abmil", description="The model to train: a registered aggregator or training method.",
        json_schema_extra={"choices": "models"},
    )
    hidden_dim: int = Field(default=512, ge=8, description="Embedding width after the input projection.")
    dropout: float = Field(default=0.25, ge=0, lt=1, description="Dropout after the input projection.")
    attention_dim: int = Field(default=128, ge=4, description="ABMIL attention width.")
    heads: int = Field(
        default=8, ge=1, description="TransMIL attention heads (also for a TransMIL MHIM student); must divide "
        "hidden_dim.",
    )
    mhim: MHIMConfig = Field(default_factory=MHIMConfig)
    ins: INSConfig = Field(default_factory=INSConfig)

    @field_validator("name")
    @classmethod
    def _name_registered(cls, value: str) -> str:
        return _registered(value)


# ---------------------------------------------------------------------------------------- annotations
class AnnotationsConfig(Section):
    """How annotation files (QuPath GeoJSON, ASAP XML) become tumour truth.

    QuPath's model is followed: an object's class is its classification (name and colour), never its
    ``name``; class names match case-insensitively, a derived class ``Tumor: Positive`` also matches by
    its base class ``Tumor``. A class in neither list keeps its name with the role ``other`` (read and
    reported, not used as truth); points and lines are ignored and reported.
    """

    unclassified: Literal["tumour", "exclusion", "ignore"] = Field(
        default="tumour",
        description="Role of area annotations without a class: tumour (exports that hold only tumour outlines), "
        "exclusion (cut out of tumour) or ignore.",
    )
    tumour_classes: list[str] = Field(
        default=["tumor", "tumour", "tumor region", "tumour region", "tumor_region", "cancer", "carcinoma",
                 "metastasis", "metastases", "_0", "_1", "tumor_0", "tumor_1"],
        description="Class names (QuPath classification, ASAP group; any case) whose areas are tumour. "
        "Defaults cover CAMELYON16 ASAP XML (_0, _1, Tumor) and common QuPath names.",
    )
    exclusion_classes: list[str] = Field(
        default=["exclusion", "exclude", "excluded", "ignore", "ignore*", "_2", "normal", "non-tumor",
                 "non-tumour", "not tumor", "not tumour"],
        description="Class names (any case) whose areas are cut out of tumour (CAMELYON16 _2, QuPath Ignore*).",
    )
    object_types: list[Literal["annotation", "detection", "cell", "tile", "tma_core"]] = Field(
        default=["annotation"],
        description="QuPath object types read; others (e.g. detections, cells) are ignored and reported. "
        "Files without object types (ASAP XML, plain GeoJSON) count as annotations.",
    )

    @field_validator("tumour_classes", "exclusion_classes")
    @classmethod
    def _normalised(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(str(v).strip().lower() for v in value if str(v).strip()))

    @model_validator(mode="after")
    def _disjoint(self) -> AnnotationsConfig:
        both = sorted(set(self.tumour_classes) & set(self.exclusion_classes))
        if both:
            raise ValueError(f"class name(s) {', '.join(both)} are in both tumour_classes and exclusion_classes; "
                             "keep each in one list")
        return self


# ------------------------------------------------------------------------------------------- training
class TrainingConfig(Section):
    """Cross-validation, optimisation and evaluation."""

    labels_csv: Path | None = Field(default=None, description="CSV with slide_id,label[,patient_id][,split].")
    classes: list[str] | None = Field(default=None, description="Label names in class-index order (None: sorted).")
    merge_label_variants: bool = Field(
        default=False,
        description="Labels that differ only by case or surrounding spaces ('tumor', 'Tumor '): False = an error "
        "listing each spelling and its count; True = merge them (into the training.classes spelling, else the "
        "most frequent one).",
    )
    on_missing: Literal["error", "exclude"] = Field(
        default="error", description="Slides with a label but no bag (or vice versa): error, or warn and exclude."
    )
    folds: int = Field(default=5, ge=2, description="Outer (test) folds, stratified at patient level.")
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of each training fold held out for validation.")
    seeds: list[int] = Field(default=[0], min_length=1, description="Repeat the cross-validation with these seeds.")
    fixed_splits: bool = Field(default=False, description="Use the CSV's 'split' column (train/val/test) instead of k-fold.")
    epochs: int = Field(default=200, ge=1, description="Maximum epochs per fold.")
    min_epochs: int = Field(default=10, ge=0, description="No early stop before this epoch.")
    patience: int = Field(default=20, ge=1, description="Epochs without validation-AUC gain before stopping.")
    optimizer: Literal["adam", "adamw"] = Field(default="adam", description="Optimiser of bag-level training and MHIM.")
    lr: float = Field(default=2e-4, gt=0, description="Learning rate of bag-level training and MHIM.")
    weight_decay: float = Field(default=1e-5, ge=0, description="Weight decay of bag-level training and MHIM.")
    scheduler: Literal["cosine", "none"] = Field(
        default="cosine", description="Learning-rate schedule over the epochs: cosine annealing to 0, or constant."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="auto = cuda > mps > cpu.")
    cache_bags: bool = Field(default=True, description="Keep bags in RAM when they fit.")
    bootstrap: int = Field(default=1000, ge=0, description="Bootstrap resamples for 95% CIs (0 = none).")
    instance_threshold: float = Field(
        default=0.5, gt=0, le=1, description="Tumour fraction above which a patch counts as positive (instance AUC)."
    )
    annotations_dir: Path | None = Field(
        default=None, description="Tumour annotations (GeoJSON / ASAP XML / masks) for instance-level evaluation."
    )
    annotations: AnnotationsConfig = Field(
        default_factory=AnnotationsConfig,
        description="How the files in annotations_dir are read (classes, unclassified areas, object types).",
    )
    features_dir: Path | None = Field(
        default=None,
        description="Directory of HDF5 bags to train on; None = OUT/features/<tiling key>/<encoder key>/.",
    )
    threshold: Literal["youden", "f1"] = Field(
        default="youden",
        description="Binary decision threshold chosen on the validation split: Youden's J or maximum F1.",
    )
    min_delta: float = Field(
        default=0.0, ge=0, description="Validation-AUC gain that counts as an improvement for early stopping."
    )
    cache_max_gb: float = Field(
        default=8.0, ge=0, description="RAM budget for caching bags (also capped at half the free memory)."
    )
    progress: bool = Field(default=True, description="Show a tqdm progress bar per fold (on terminals).")
    threads: int | None = Field(
        default=None, ge=1, description="torch CPU threads while training (None = torch's default; 1 is often "
        "fastest for one-bag steps on busy CPUs)."
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        twice = sorted({s for s in value if value.count(s) > 1})
        if twice:
            raise ValueError(f"training.seeds lists seed(s) {', '.join(map(str, twice))} more than once; each seed "
                             "repeats the cross-validation once, list it once")
        return value


# ------------------------------------------------------------------------------------------- heatmaps
class HeatmapConfig(Section):
    """Per-slide heatmaps."""

    normalize: Literal["auto", "absolute", "cohort", "raw", "rank", "percentile"] = Field(
        default="auto",
        description="Score scale. auto: absolute for instance-probability models (INS), cohort for attention. "
        "absolute: probabilities as they are, 0-1 (a normal slide stays cool); cohort: one scale for every slide "
        "drawn together (percentile_low..percentile_high of their pooled scores; softmax attention times the "
        "slide's patch count, 1 = uniform). Per slide (each slide gets a hottest patch; the legend says so): "
        "raw (min-max), rank (uniform over patches), percentile (clip, then min-max).",
    )
    percentile_low: float = Field(default=1.0, ge=0, lt=100, description="Lower clip percentile for 'percentile'.")
    percentile_high: float = Field(default=99.0, gt=0, le=100, description="Upper clip percentile for 'percentile'.")
    colormap: str = Field(default="jet", description="Matplotlib colour map name.")
    alpha: float = Field(default=0.45, ge=0, le=1, description="Overlay opacity.")
    top_k: int = Field(default=16, ge=0, description="Patches in the top-k montage (0 = no montage).")
    thumbnail_max_size: int = Field(
        default=1024, ge=64, le=16384, description="Longest side of the slide thumbnail the overlay is drawn on (px)."
    )
    geojson_object_type: Literal["tile", "detection", "annotation"] = Field(
        default="tile", description="QuPath object type of the patch polygons in the GeoJSON."
    )
    pyramidal_tiff: bool = Field(default=False, description="Also write a pyramidal TIFF heatmap for viewers.")
    tiff_scale: int = Field(
        default=2, ge=1, le=16,
        description="The TIFF heatmap is rasterised at thumbnail size times this factor (memory grows with its square).",
    )
    tiff_compression: Literal["jpeg", "deflate"] = Field(default="jpeg", description="TIFF tile compression.")
    tiff_overlay: bool = Field(
        default=True, description="TIFF shows the colour map blended over the thumbnail (False: colour map on white)."
    )

    @model_validator(mode="after")
    def _percentiles_ordered(self) -> HeatmapConfig:
        if self.percentile_low >= self.percentile_high:
            raise ValueError(
                f"heatmap.percentile_low ({self.percentile_low}) must be below heatmap.percentile_high "
                f"({self.percentile_high})"
            )
        return self

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, value: str) -> str:
        import matplotlib

        if value not in matplotlib.colormaps:
            raise ValueError(f"unknown colour map {value!r}; use a matplotlib name such as jet, viridis, inferno")
        return value


# ------------------------------------------------------------------------------------------- tracking
class TrackingConfig(Section):
    """MLflow."""

    uri: str | None = Field(default=None, description="Tracking URI; None = SQLite store inside the output directory.")
    experiment: str | None = Field(default=None, description="Experiment name; None = derived from the labels file.")
    run_name: str | None = Field(default=None, description="Name of the parent run; None = '<model> cv'.")
    log_checkpoints: bool = Field(default=True, description="Store each fold's best checkpoint as an artifact.")
    log_model: bool = Field(
        default=True, description="Log the fold models of a train as one MLflow Model (pyfunc) on its parent run "
        "(runs:/<run>/model; wsi-mil predict --model, mlflow.pyfunc.load_model).",
    )
    register_as: str | None = Field(
        default=None, description="Register each trained model as a new version of this MLflow registered model "
        "(models:/<name>/<version>); None = no registration.",
    )

    @field_validator("register_as")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("tracking.register_as must be letters, digits, '_', '.' or '-' (it becomes models:/<name>/<v>)")
        return value

    @model_validator(mode="after")
    def _registering_needs_a_model(self) -> TrackingConfig:
        if self.register_as is not None and not self.log_model:
            raise ValueError("tracking.register_as needs tracking.log_model=true (the registered version is that model)")
        return self


# -------------------------------------------------------------------------------------------- compute
class ComputeConfig(Section):
    """Dask cluster."""

    scheduler: str | None = Field(default=None, description="tcp://host:port of an existing cluster; None = local.")
    workers: int = Field(default=1, ge=1, description="Local Dask workers.")
    threads_per_worker: int = Field(default=2, ge=1, description="Threads per local worker (OpenSlide frees the GIL).")
    processes: bool = Field(
        default=False,
        description="Run local workers as separate processes; False keeps them as threads of this process "
        "(faster for OpenSlide reads on few cores, no pickling of patches).",
    )
    memory_limit: str = Field(default="auto", description="Per-worker memory limit of the local cluster.")
    host: str = Field(
        default="127.0.0.1", min_length=1,
        description="Interface every socket of the local cluster listens on (scheduler, workers, HTTP endpoints, "
        "dashboard); 127.0.0.1 keeps them on this machine, 0.0.0.0 or an address exposes them on purpose.",
    )
    dashboard: bool = Field(
        default=False, description="Serve the Dask dashboard of the local cluster on compute.host, a random port "
        "(its address is logged); False serves no dashboard.",
    )
    connect_timeout: float = Field(default=30.0, gt=0, description="Seconds to wait for an external scheduler.")
    claim_timeout_s: float = Field(
        default=3600.0, gt=0, description="Several commands on one OUT: a slide claimed by a process on another "
        "host whose heartbeat is older than this many seconds is taken over (on this host a dead process id is "
        "enough).",
    )

    @field_validator("scheduler")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("compute.scheduler must look like tcp://HOST:PORT")
        return value


# ------------------------------------------------------------------------------------------- workflow
class RunConfig(Section):
    """What `wsi-mil run` trains."""

    models: list[str] = Field(
        default=["abmil", "mhim", "ins"], min_length=1,
        description="Models trained in order (mhim after its student reuses that run as its baseline).",
        json_schema_extra={"choices": "models"},
    )

    @field_validator("models")
    @classmethod
    def _models_registered(cls, value: list[str]) -> list[str]:
        return [_registered(name) for name in value]


class Config(Section):
    """Every setting of a wsi-mil experiment."""

    slides: SlidesConfig = Field(default_factory=SlidesConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    heatmap: HeatmapConfig = Field(default_factory=HeatmapConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _model_fits_settings(self) -> Config:
        """Settings the model (and MHIM's student) can work with; `wsi-mil run` checks each of run.models too."""
        m = self.model
        parts = [(m.name, "model.name")] + ([(m.mhim.student, "model.mhim.student")] if m.name == "mhim" else [])
        for part, key in parts:
            if model_spec(part).uses_heads and m.hidden_dim % m.heads:
                raise ValueError(f"model.hidden_dim ({m.hidden_dim}) must be a multiple of model.heads ({m.heads}) "
                                 f"for {part} ({key}); e.g. model.heads=8 with model.hidden_dim=512")
        classes = self.training.classes
        if model_spec(m.name).binary_only and classes is not None and len(classes) != 2:
            raise ValueError(f"{m.name} (model.name) trains binary tasks only but training.classes lists "
                             f"{len(classes)} classes; choose another model or relabel to two classes")
        return self

    def for_model(self, name: str) -> Config:
        """A copy training model ``name`` instead (validated: ConfigError when the settings do not fit it)."""
        return self.with_overrides({"model.name": name})

    def flat(self) -> dict[str, Any]:
        """The whole config flattened to ``section.key`` -> JSON-friendly value (for MLflow params)."""
        return flatten(self.model_dump(mode="json"))

    def fingerprint(self, *sections: str) -> str:
        """Short stable hash of the given sections (all when none given)."""
        data = self.model_dump(mode="json")
        if sections:
            data = {name: data[name] for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A validated copy with ``section.key`` overrides applied."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value, source="override")
        return _validate(data, source="override")


# ------------------------------------------------------------------------------------------ load/save
def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, *, source: str) -> None:
    parts = dotted.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{source}: unknown config section '{where}' in '{dotted}'; see `wsi-mil config show`.")
        node = node[part]
    if parts[-1] not in node:
        allowed = ", ".join(sorted(node))
        raise ConfigError(f"{source}: unknown config key '{dotted}'; allowed keys here: {allowed}.")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value`` (value read as YAML, so numbers/lists/null work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. training.epochs=20.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__}).") from None
    return key.strip(), value


def _deep_merge(base: dict[str, Any], update: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in out:
            allowed = ", ".join(sorted(out))
            raise ConfigError(f"{source}: unknown config key '{name}'; allowed keys here: {allowed}.")
        if isinstance(out[key], dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{name}' must be a mapping of settings, got {type(value).__name__}.")
            out[key] = _deep_merge(out[key], value, source, f"{name}.")
        else:
            out[key] = value
    return out


def _validate(data: dict[str, Any], *, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            if isinstance(err.get("input"), dict):  # a check across keys: its message names them
                problems.append(msg)
            else:
                problems.append(f"'{loc}': {msg} (got {err.get('input')!r})" if loc else msg)
        raise ConfigError(f"{source}: invalid setting " + "; ".join(problems) + ".") from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load defaults, merge a YAML file over them, apply overrides, validate.

    Parameters
    ----------
    path : Path, optional
        A YAML experiment file holding any subset of the sections; relative paths inside it are
        resolved against its directory.
    overrides : list of str or dict, optional
        ``section.key=value`` strings (values read as YAML) or a ``{section.key: value}`` dict.

    Returns
    -------
    Config
        The validated settings (cross-field checks included, configured files exist).

    Raises
    ------
    ConfigError
        One sentence naming the file, the key and what is allowed: unknown key, wrong type,
        out-of-range value, settings the model cannot work with, a missing file.
    """
    data = Config().model_dump(mode="json")
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc}); fix the syntax.") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (slides, tiling, ...).")
        loaded = _resolve_relative_paths(loaded, path.parent)
        data = _deep_merge(data, loaded, source)
    if overrides:
        items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
        for key, value in items:
            _set_dotted(data, key, value, source="override" if path is None else f"override of {path}")
    if overrides:
        source = "overrides" if path is None else f"{path} with overrides"
    cfg = _validate(data, source=source)
    check_files(cfg)
    return cfg


_PATH_KEYS = {("slides", "mpp_override_csv"), ("training", "labels_csv"), ("training", "annotations_dir"),
              ("training", "features_dir")}


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    for section, key in _PATH_KEYS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            data[section][key] = str((base / value).resolve())
    return data


def check_files(cfg: Config) -> None:
    """Raise a ConfigError for any configured file that does not exist."""
    for section, key in sorted(_PATH_KEYS):
        value = getattr(getattr(cfg, section), key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{section}.{key}: file {value} does not exist; fix the path or remove the key.")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# -------------------------------------------------------------------------------------------- describe
def describe_config(cfg: Config | None = None) -> str:
    """Every key with its value, its default (where they differ), its allowed values and its meaning.

    The text of ``wsi-mil config show --describe``; model choices come from :mod:`wsi_mil.registry`.
    """
    cfg = cfg or Config()
    values, defaults = cfg.model_dump(mode="json"), Config().model_dump(mode="json")

    def at(data: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            data = data[part]
        return data

    lines: list[str] = []
    for section_name, section in Config.model_fields.items():
        section_cls = section.annotation
        lines.append(f"{section_name}:  {section_cls.__doc__.strip().splitlines()[0]}")
        for key, line in _describe_section(section_cls, f"{section_name}."):
            value, default = at(values, key), at(defaults, key)
            shown = f"{key} = {json.dumps(value)}"
            if value != default:
                shown += f"  (default {json.dumps(default)})"
            lines += [f"  {shown}", f"      {line}"]
    lines += ["", "Registered models (model.name, run.models; * = can be model.mhim.student):"]
    for name in model_names():
        spec = model_spec(name)
        lines.append(f"  {name}{'*' if spec.student else ''}  [{spec.kind}]  {spec.summary}")
    return "\n".join(lines) + "\n"


def _describe_section(cls: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _describe_section(field.annotation, f"{prefix}{name}.")
            continue
        text = field.description or ""
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        choices: tuple[Any, ...] = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal \
            else ()
        if extra.get("choices") == "models":
            choices = model_names()
        elif extra.get("choices") == "students":
            choices = model_names(student=True)
        if choices:
            text += f" One of: {', '.join(map(str, choices))}."
        out.append((f"{prefix}{name}", text))
    return out
