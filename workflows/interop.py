"""Files of the field: `wsi-mil annotations` and `wsi-mil export clam|trident`.

`wsi-mil annotations FILE` says what an annotation file holds; `wsi-mil export clam|trident OUT` links
the bags into the folder layout CLAM or TRIDENT reads.

Layouts written (``DEST`` = ``--to``, default ``OUT/export/<tool>``):

CLAM (``extract_features_fp.py`` output, read by its ``Generic_MIL_Dataset`` and heatmap scripts)::

    DEST/h5_files/<slide>.h5    link to the bag (``features`` [N, D], ``coords`` with patch_size/patch_level/name)
    DEST/pt_files/<slide>.pt    link to the bag's .pt (features.export_pt), else written: float32 tensor [N, D]

TRIDENT (job directory of ``run_batch_of_slides.py``; TITAN reads its feature files)::

    DEST/<mag>x_<patch>px_<overlap>px_overlap/patches/<slide>_patches.h5   written: coords in TRIDENT's meaning
    DEST/<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/<slide>.h5  link to the bag

Links are relative, so OUT can be moved with its export folder; each is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_mil.annotations import UNCLASSIFIED, read_annotations
from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout, path_component, slide_file
from wsi_mil.mil.data import list_bags, resolve_features_dir
from wsi_mil.stores import (
    atomic_output,
    peer_coords_attrs,
    read_bag,
    read_bag_attrs,
    read_bag_coords,
    write_trident_coords,
)

log = logging.getLogger(__name__)

Tool = Literal["clam", "trident"]


# ------------------------------------------------------------------------------------------ annotations
def format_annotation_summary(summary: dict[str, Any], unclassified: str) -> str:
    """The text report of :meth:`wsi_mil.annotations.AnnotationSet.summary`."""
    n = summary["objects"]
    kept = n["tumour"] + n["exclusion"] + n["other"]
    lines = [f"{summary['file']} ({'ASAP XML' if summary['format'] == 'asap' else 'GeoJSON'}): {kept} area "
             f"object(s) kept ({n['tumour']} tumour, {n['exclusion']} exclusion, {n['other']} other), "
             f"{n['ignored']} ignored",
             f"unclassified areas: {unclassified} (training.annotations.unclassified); class 'other' = neither "
             "tumour nor exclusion, not used as truth"]
    if summary["classes"]:
        unit = "area (um^2)" if summary["mpp"] else "area (level-0 px^2; --slide or --mpp gives um^2)"
        width = max(len(UNCLASSIFIED), *(len(r["class"]) for r in summary["classes"]))
        lines.append(f"  {'class':<{width}}  {'role':<9}  {'objects':>7}  {'polygons':>8}  {unit}")
        for row in summary["classes"]:
            area = row["area_um2"] if summary["mpp"] else row["area_px"]
            lines.append(f"  {row['class']:<{width}}  {row['role']:<9}  {row['objects']:>7}  {row['polygons']:>8}  "
                         f"{area:,.1f}")
    for obj in summary["ignored"]:
        label = f" '{obj['name']}'" if obj["name"] else ""
        label += f" [{obj['class']}]" if obj["class"] else ""
        lines.append(f"  ignored #{obj['index']}{label} {obj['geometry']}: {obj['reason']}")
    return "\n".join(lines)


def cli_annotations(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil annotations FILE [--slide SLIDE | --mpp UM] [--json]`: what the file holds under the config."""
    mpp, size = args.mpp, None
    if args.slide is not None:
        from wsi_mil.slides import inspect_slide

        info = inspect_slide(args.slide, cfg.slides)
        mpp, size = info.mpp, (info.width, info.height)
    summary = read_annotations(args.file, cfg.training.annotations).summary(mpp)
    bounds = summary["bounds_px"]
    if size is not None and bounds is not None and (bounds[0] < 0 or bounds[1] < 0 or bounds[2] > size[0]
                                                    or bounds[3] > size[1]):
        summary["warning"] = (f"areas reach x {bounds[0]:.0f}..{bounds[2]:.0f}, y {bounds[1]:.0f}..{bounds[3]:.0f} "
                              f"but the slide is {size[0]} x {size[1]} level-0 px: another slide's annotations, "
                              "or coordinates not in level-0 pixels")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_annotation_summary(summary, cfg.training.annotations.unclassified))
    if "warning" in summary:
        log.warning("%s: %s", args.file, summary["warning"])
    return 0


# ----------------------------------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What :func:`export_layout` wrote into ``dest``."""

    tool: Tool
    dest: Path
    linked: int = 0
    written: int = 0
    unchanged: int = 0
    folders: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the terminal: the folders made, links and files written, warnings."""
        folders = ", ".join(str(f.relative_to(self.dest)) + "/" for f in self.folders)
        text = (f"{self.tool.upper()} layout in {self.dest}: {folders} ({self.linked} links made, {self.written} "
                f"files written, {self.unchanged} up to date)")
        return "\n".join([text, *self.warnings])


def _link(target: Path, link: Path) -> bool:
    """Point ``link`` at ``target`` (relative); False when it already did. Replaces atomically."""
    relative = os.path.relpath(Path(target).resolve(), Path(link).parent.resolve())
    if link.is_symlink() and os.readlink(link) == relative:
        return False
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(relative, tmp)
    os.replace(tmp, link)
    return True


def _tally(report: ExportReport, changed: bool, kind: Literal["linked", "written"]) -> None:
    if changed:
        setattr(report, kind, getattr(report, kind) + 1)
    else:
        report.unchanged += 1


def _up_to_date(path: Path, source: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_mtime_ns >= source.stat().st_mtime_ns


def trident_config_dir(attrs: dict[str, Any]) -> str:
    """TRIDENT's per-settings folder name, ``<mag>x_<patch>px_<overlap>px_overlap`` (mag = 10 / target MPP)."""
    mag = peer_coords_attrs(attrs)["target_magnification"]
    return f"{mag:g}x_{int(attrs['target_patch_size'])}px_{int(attrs.get('overlap', 0))}px_overlap"


def titan_grid_collisions(coords: np.ndarray, patch_size_level0: int) -> int:
    """Patches that share a cell of TITAN's grid (0 = one cell each).

    TITAN floor-divides level-0 coordinates [N, 2] by ``patch_size_level0`` (the ``coords`` attribute)
    after subtracting their minimum.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if not len(coords):
        return 0
    cells = (coords - coords.min(axis=0)) // int(patch_size_level0)
    return len(coords) - len(np.unique(cells, axis=0))


def export_layout(tool: Tool, out: Path, cfg: Config, dest: Path | None = None,
                  encoder_name: str | None = None) -> ExportReport:
    """Link the bags of ``out`` (for ``cfg``'s tiling and encoder) into CLAM's or TRIDENT's folder layout.

    Parameters
    ----------
    tool:
        ``clam`` or ``trident`` (layouts: see the module docstring).
    out, cfg:
        Output directory of `wsi-mil extract` and the config naming its bags (``training.features_dir``,
        else ``OUT/features/<tiling key>/<encoder key>``).
    dest:
        Export folder; default ``OUT/export/<tool>``.
    encoder_name:
        TRIDENT only: the ``features_<encoder_name>`` folder (default: the bags' encoder key). TRIDENT's
        slide encoders look for their patch encoder's name there (e.g. ``conch_v15`` for TITAN).

    Raises
    ------
    WsiMilError
        No bags for these settings (the message lists the bag folders that exist).
    """
    bags = list_bags(resolve_features_dir(Path(out), cfg))
    if not bags:
        raise WsiMilError(f"no feature bags for these settings under {Path(out)}; run `wsi-mil extract` first.")
    report = ExportReport(tool, Path(dest) if dest is not None else Layout(out).export_dir(tool))
    if tool == "clam":
        _export_clam(bags, report)
    else:
        _export_trident(bags, report, encoder_name)
    return report


def _export_clam(bags: dict[str, Path], report: ExportReport) -> None:
    import torch

    h5_dir, pt_dir = report.dest / "h5_files", report.dest / "pt_files"
    for folder in (h5_dir, pt_dir):
        folder.mkdir(parents=True, exist_ok=True)
        report.folders.append(folder)
    for sid, bag in bags.items():
        _tally(report, _link(bag, slide_file(h5_dir, sid, ".h5")), "linked")
        pt = bag.with_suffix(".pt")
        pt_file = slide_file(pt_dir, sid, ".pt")
        if pt.is_file():
            _tally(report, _link(pt, pt_file), "linked")
        elif _up_to_date(pt_file, bag):
            report.unchanged += 1
        else:
            features = np.asarray(read_bag(bag).features, dtype=np.float32)
            with atomic_output(pt_file) as tmp, open(tmp, "wb") as fh:
                torch.save(torch.from_numpy(features), fh)
            report.written += 1


def _export_trident(bags: dict[str, Path], report: ExportReport, encoder_name: str | None) -> None:
    first = read_bag_attrs(next(iter(bags.values())))
    config_dir = report.dest / trident_config_dir(first)
    patches_dir = config_dir / "patches"
    name = path_component(encoder_name or first.get("encoder_key") or first.get("encoder"), "encoder name")
    features_dir = config_dir / f"features_{name}"
    for folder in (patches_dir, features_dir):
        folder.mkdir(parents=True, exist_ok=True)
        report.folders.append(folder)
    crowded = {}
    for sid, bag in bags.items():
        coords, attrs = read_bag_coords(bag), read_bag_attrs(bag)
        coords_file = slide_file(patches_dir, sid, "_patches.h5")
        if _up_to_date(coords_file, bag):
            report.unchanged += 1
        else:
            write_trident_coords(coords_file, coords, attrs)
            report.written += 1
        _tally(report, _link(bag, slide_file(features_dir, sid, ".h5")), "linked")
        shared = titan_grid_collisions(coords, peer_coords_attrs(attrs)["patch_size_level0"])
        if shared:
            crowded[sid] = (shared, len(coords))
    if crowded:
        sid, (shared, n) = next(iter(crowded.items()))
        report.warnings.append(
            f"warning: in {len(crowded)} slide(s) TITAN would put several patches in one cell of its grid "
            f"(coordinates floor-divided by patch_size_level0), e.g. {sid}: {shared} of {n} patches; TITAN "
            "expects non-overlapping patches (tiling.overlap=0).")


def cli_export(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil export clam|trident OUT [--to DEST] [--encoder-name NAME]`."""
    report = export_layout(args.tool, args.out, cfg, args.to, getattr(args, "encoder_name", None))
    print(report.summary())
    return 0
