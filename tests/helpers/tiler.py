"""Small synthetic slides for the tiler tests (slides, tissue, tiling), written once per session.

Everything is a real file OpenSlide opens (or refuses): synthetic SVS/TIFF from wsi_mil.synth, a
blank slide through the same pyramid writer, a TIFF whose resolution tags were removed, a truncated
SVS and a text file named .svs.
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from wsi_mil.synth import SlideTruth, write_slide
from wsi_mil.synth.pyramid import write_pyramid

SIZE = 3072  # level-0 px (0.25 um/px): levels 1 and 4


@dataclass
class TilerSlides:
    """Paths of the session's slides and the ground truth of the synthetic ones."""

    root: Path
    good_dir: Path  # good.svs (tumour), pen.svs (pen mark), generic.tiff
    truth: dict[str, SlideTruth]
    blank: Path
    no_mpp: Path
    truncated: Path
    not_a_slide: Path


def _blank_render(x: int, y: int, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(x * 7919 + y)
    base = np.array([243, 241, 245], np.int16)
    return np.clip(base + rng.integers(-3, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def _strip_resolution(path: Path) -> None:
    """Make a generic TIFF declare no physical resolution (ResolutionUnit = none)."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            tag = page.tags.get("ResolutionUnit")
            if tag is not None:
                tag.overwrite(1)


def build_tiler_slides(root: Path) -> TilerSlides:
    """Write the slides once per session (about 30 s on one core); later calls reuse them."""
    root = Path(root)
    done = root / "slides.pickle"
    if done.is_file():
        return pickle.loads(done.read_bytes())
    good = root / "good"
    good.mkdir(parents=True, exist_ok=True)
    truth = {
        "good": write_slide(good / "good.svs", width=SIZE, height=SIZE, seed=11, tumour="small"),
        "pen": write_slide(good / "pen.svs", width=SIZE, height=SIZE, seed=2, artefacts=("pen",)),
        "generic": write_slide(good / "generic.tiff", width=SIZE, height=SIZE, seed=4, fmt="tiff"),
    }
    extra = root / "extra"
    extra.mkdir(exist_ok=True)
    blank = extra / "blank.svs"
    write_pyramid(blank, _blank_render, width=2048, height=2048, mpp=0.25, fmt="svs", name="blank")
    no_mpp = extra / "nompp.tiff"
    shutil.copyfile(good / "generic.tiff", no_mpp)
    _strip_resolution(no_mpp)
    truncated = extra / "truncated.svs"
    data = (good / "good.svs").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    not_a_slide = extra / "notes.svs"
    not_a_slide.write_text("this is a text file, not a slide\n")
    built = TilerSlides(root=root, good_dir=good, truth=truth, blank=blank, no_mpp=no_mpp,
                        truncated=truncated, not_a_slide=not_a_slide)
    done.write_bytes(pickle.dumps(built))
    return built


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of a predicted mask against a truth mask (prediction resized to the truth's grid)."""
    from PIL import Image

    resized = np.asarray(
        Image.fromarray(pred.astype(np.uint8) * 255).resize(truth.shape[::-1], Image.Resampling.NEAREST)
    ) > 127
    union = (resized | truth).sum()
    return float((resized & truth).sum() / union) if union else 1.0
