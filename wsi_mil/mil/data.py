"""Labels and feature bags for MIL training.

- :func:`read_labels` parses and validates the labels CSV (``slide_id,label[,patient_id][,split]``)
  and maps label names to class indices; :func:`load_labels` does so from ``training.*``.
- :func:`match_bags` pairs labelled slides with their HDF5 bags and :func:`match_slides` with the
  files of a slide folder; both report every mismatch at once (count and the first ids).
- :class:`BagStore` reads bags lazily and keeps them in RAM when the cohort fits the budget;
  :class:`BagList` is the sequence of :class:`~wsi_mil.mil.base.BagItem` a method iterates over.

Class order (index 1 is the positive class of a binary task):
1. ``training.classes`` when given (every label must be one of them);
2. otherwise integer-like labels sort numerically (``0``/``1`` keep their meaning);
3. otherwise, for two names where exactly one is a usual negative word (normal, negative, benign,
   healthy, control...), that one is class 0; else names sort alphabetically (LUAD=0, LUSC=1).

Labels that differ only by case or surrounding spaces (``tumor``, ``Tumor ``) are an error listing
each spelling and its count, unless ``training.merge_label_variants`` merges them into the spelling
of ``training.classes`` or, without it, the most frequent one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from wsi_mil.config import Config, TrainingConfig
from wsi_mil.encoders import encoder_key
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import PLAIN_NAMES, Layout, tiling_key, unsafe_name_reason
from wsi_mil.mil.base import BagItem
from wsi_mil.stores import PARTIAL_TAG, read_bag, read_bag_attrs

log = logging.getLogger(__name__)

NEGATIVE_NAMES = {"normal", "negative", "neg", "benign", "healthy", "control", "no", "false", "absent"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def _show(items: Sequence[str], limit: int = 10) -> str:
    items = [str(i) for i in items]
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ------------------------------------------------------------------------------------------ labels
@dataclass
class LabelTable:
    """The validated labels: one row per slide with ``slide_id, patient_id, label, y`` (+ ``split``)."""

    df: pd.DataFrame
    classes: list[str]
    source: Path | None = None

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def slide_ids(self) -> list[str]:
        """Slide ids in table order."""
        return self.df["slide_id"].tolist()

    def subset(self, slide_ids: Sequence[str]) -> LabelTable:
        """Only the given slides (order of the table kept)."""
        keep = self.df["slide_id"].isin(set(slide_ids))
        return LabelTable(self.df[keep].reset_index(drop=True), list(self.classes), self.source)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def infer_classes(names: Sequence[str]) -> list[str]:
    """Class order for label names when ``training.classes`` is not given (see the module doc)."""
    unique = sorted(set(names))
    if all(_is_int(n) for n in unique):
        return sorted(unique, key=int)
    if len(unique) == 2:
        negatives = [n for n in unique if n.strip().lower() in NEGATIVE_NAMES]
        if len(negatives) == 1:
            return [negatives[0]] + [n for n in unique if n != negatives[0]]
    return unique


def label_variants(raw: Sequence[str]) -> dict[str, dict[str, int]]:
    """Spellings of the labels that differ only by case or surrounding spaces.

    Returns ``{normalised label: {spelling as written: count}}`` for each label written in more than
    one way (``{"tumor": {"tumor": 10, "Tumor ": 3}}``); empty when every label has one spelling.
    """
    counts = pd.Series(list(raw), dtype=str).value_counts(sort=False)
    groups: dict[str, dict[str, int]] = {}
    for spelling, n in counts.items():
        if spelling.strip():
            groups.setdefault(spelling.strip().casefold(), {})[spelling] = int(n)
    return {key: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))) for key, v in groups.items() if len(v) > 1}


def _merge_variants(labels: pd.Series, variants: dict[str, dict[str, int]], classes: list[str] | None) -> pd.Series:
    """Map each variant spelling to one: the matching ``training.classes`` name, else the most frequent."""
    by_key = {c.casefold(): c for c in classes or []}
    mapping: dict[str, str] = {}
    for key, spellings in variants.items():
        target = by_key.get(key, next(iter(spellings)).strip())
        for spelling, n in spellings.items():
            if spelling.strip() != target:
                mapping[spelling.strip()] = target
                log.warning("label %r (%d slide(s)) merged into %r (training.merge_label_variants)", spelling, n, target)
    return labels.replace(mapping)


def _show_variants(variants: dict[str, dict[str, int]]) -> str:
    return "; ".join(", ".join(f"{s!r} ({n})" for s, n in spellings.items()) for spellings in variants.values())


def read_labels(path: Path, classes: list[str] | None = None, *, merge_variants: bool = False) -> LabelTable:
    """Read and validate a labels CSV; every problem is reported in one :class:`WsiMilError`.

    Parameters
    ----------
    path : Path
        CSV with a header ``slide_id,label`` and optional ``patient_id`` (default: the slide id) and
        ``split`` (train/val/test). A ``.h5`` suffix on slide ids is dropped.
    classes : list of str, optional
        Class names in class-index order (``training.classes``); default see the module doc.
    merge_variants : bool
        Merge labels that differ only by case or surrounding spaces instead of refusing them.

    Raises
    ------
    WsiMilError
        Missing or unreadable file, missing columns, blank, duplicate or unsafe slide ids (path
        separators, ``..``, absolute paths, control characters), blank labels,
        label spelling variants (unless merged), labels outside ``classes``, unknown split values,
        or a single class.
    """
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"labels file {path} does not exist; pass a CSV with columns slide_id,label via --labels.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise WsiMilError(f"labels file {path} is empty; it needs a header slide_id,label and one row per slide.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise WsiMilError(f"labels file {path} is not a readable CSV ({exc}); save it as comma-separated UTF-8.") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("slide_id", "label") if c not in df.columns]
    if missing:
        raise WsiMilError(
            f"labels file {path} lacks column(s) {', '.join(missing)} (found: {', '.join(df.columns) or 'none'}); "
            "the header must contain slide_id,label (optional patient_id, split)."
        )
    if df.empty:
        raise WsiMilError(f"labels file {path} has a header but no rows; add one row per slide.")
    variants = label_variants(df["label"].astype(str))
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()
    df["slide_id"] = df["slide_id"].map(lambda s: s[:-3] if s.endswith(".h5") else s)
    problems: list[str] = []
    if variants and merge_variants:
        df["label"] = _merge_variants(df["label"], variants, classes)
    elif variants:
        problems.append(f"labels that differ only by case or surrounding spaces: {_show_variants(variants)} "
                        "(make each label's spelling identical, or set training.merge_label_variants=true)")
    blank_ids = (df["slide_id"] == "").sum()
    if blank_ids:
        problems.append(f"{blank_ids} row(s) without slide_id")
    unsafe = [f"{s!r} ({why})" for s in df.loc[df["slide_id"] != "", "slide_id"]
              if (why := unsafe_name_reason(s)) is not None]
    if unsafe:
        problems.append(f"slide_id(s) that cannot name a file: {_show(unsafe)} (ids are slide file names without "
                        f"extension: {PLAIN_NAMES})")
    dup = sorted(df.loc[df["slide_id"].duplicated(keep=False) & (df["slide_id"] != ""), "slide_id"].unique())
    if dup:
        problems.append(f"duplicate slide_id(s): {_show(dup)}")
    blank_labels = df.loc[df["label"] == "", "slide_id"].tolist()
    if blank_labels:
        problems.append(f"slide(s) without a label: {_show(blank_labels)}")
    labelled = df[df["label"] != ""]
    if classes is not None:
        classes = [str(c) for c in classes]
        unknown = sorted(set(labelled["label"]) - set(classes))
        if unknown:
            problems.append(f"label(s) {_show(unknown)} not in training.classes [{', '.join(classes)}]")
    if "patient_id" not in df.columns:
        df["patient_id"] = df["slide_id"]
    else:
        df["patient_id"] = df["patient_id"].where(df["patient_id"] != "", df["slide_id"])
    if "split" in df.columns:
        raw = df["split"].str.lower()
        bad = sorted(set(raw) - set(SPLIT_NAMES))
        if bad:
            problems.append(f"split value(s) {_show(bad)} (allowed: train, val, test)")
        df["split"] = raw.map(SPLIT_NAMES)
    if problems:
        raise WsiMilError(f"labels file {path}: " + "; ".join(problems) + ". Fix these rows and rerun.")
    if classes is None:
        classes = infer_classes(df["label"].tolist())
    if len(classes) < 2:
        raise WsiMilError(
            f"labels file {path} has a single class ({_show(classes)}); MIL training needs at least two classes."
        )
    index = {name: i for i, name in enumerate(classes)}
    df["y"] = df["label"].map(index).astype(int)
    cols = ["slide_id", "patient_id", "label", "y"] + (["split"] if "split" in df.columns else [])
    return LabelTable(df[cols].reset_index(drop=True), list(classes), path)


def load_labels(cfg: TrainingConfig) -> LabelTable:
    """:func:`read_labels` of ``training.labels_csv`` with ``training.classes`` and ``training.merge_label_variants``."""
    if cfg.labels_csv is None:
        raise WsiMilError("no labels file given; pass --labels CSV (columns slide_id,label) or set training.labels_csv.")
    return read_labels(cfg.labels_csv, cfg.classes, merge_variants=cfg.merge_label_variants)


def id_mismatch(labelled: Sequence[str], found: Iterable[str], what: str) -> list[str]:
    """Sentences listing labelled slides without a ``what`` and ``what``s without a label (count + first ids)."""
    found = set(found)
    known = set(labelled)
    missing = [s for s in labelled if s not in found]
    extra = sorted(found - known)
    out = []
    if missing:
        out.append(f"{len(missing)} labelled slide(s) have no {what} ({_show(missing)})")
    if extra:
        out.append(f"{len(extra)} {what}(s) have no label ({_show(extra)})")
    return out


def match_slides(labels: LabelTable, slide_ids: Sequence[str], slides_dir: Path) -> LabelTable:
    """The labels of the slides found in ``slides_dir``; mismatches either way are listed in a warning.

    Raises
    ------
    WsiMilError
        When no labelled slide is in the folder (usually ids that are not the file names).
    """
    problems = id_mismatch(labels.slide_ids, slide_ids, "slide file")
    present = set(slide_ids)
    keep = [s for s in labels.slide_ids if s in present]
    if not keep:
        raise WsiMilError(
            f"none of the {len(labels.slide_ids)} slides of {labels.source or 'the labels'} is in {slides_dir} "
            f"(labels: {_show(labels.slide_ids, 3)}; files: {_show(sorted(slide_ids), 3)}); slide_id must be the "
            "slide file's name without extension."
        )
    if problems:
        log.warning("%s vs %s: %s; training uses the %d labelled slides present.", labels.source or "labels",
                    slides_dir, "; ".join(problems), len(keep))
    return labels.subset(keep)


# ------------------------------------------------------------------------------------------- bags
def resolve_features_dir(out: Path, cfg: Config) -> Path:
    """``training.features_dir``, or ``OUT/features/<tiling key>/<encoder key>`` derived from the config.

    Raises
    ------
    WsiMilError
        When the derived directory does not exist: the message lists the bag folders that do exist for
        this tiling (e.g. ``resnet50_trunc-random`` after ``extract --weights random``) and how to pick one.
    """
    if cfg.training.features_dir is not None:
        return Path(cfg.training.features_dir)
    features_dir = Layout(out).features_dir(tiling_key(cfg), encoder_key(cfg.features))
    if not features_dir.is_dir():
        raise WsiMilError(f"features directory {features_dir} does not exist; "
                          f"{_bag_folders_hint(features_dir, cfg)}")
    if not _count_bags(features_dir) and _bag_folders(features_dir.parent):
        raise WsiMilError(f"features directory {features_dir} holds no bags; {_bag_folders_hint(features_dir, cfg)}")
    return features_dir


def list_bags(features_dir: Path) -> dict[str, Path]:
    """slide_id -> bag path for every finished ``*.h5`` in a directory (partial writes ignored)."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise WsiMilError(
            f"features directory {features_dir} does not exist; run `wsi-mil extract` first "
            "or set training.features_dir."
        )
    return {p.stem: p for p in sorted(features_dir.glob("*.h5")) if PARTIAL_TAG not in p.name}


def _count_bags(folder: Path) -> int:
    return sum(1 for p in folder.glob("*.h5") if PARTIAL_TAG not in p.name)


def _bag_folders(tiling: Path) -> list[tuple[Path, int]]:
    """The encoder folders of one tiling folder that hold bags, with their bag counts."""
    return [(p, n) for p in sorted(tiling.glob("*/")) if (n := _count_bags(p))]


def _flags_for(folder: Path, cfg: Config) -> str | None:
    """The ``--encoder``/``--weights`` flags that select ``folder`` (read from its first bag's attributes)."""
    try:
        attrs = read_bag_attrs(next(p for p in sorted(folder.glob("*.h5")) if PARTIAL_TAG not in p.name))
    except (OSError, StopIteration):
        return None
    flags = {}
    for flag in ("encoder", "weights"):
        value = attrs.get(flag)
        if isinstance(value, str) and value and value != getattr(cfg.features, flag):
            flags[flag] = value
    if not flags:
        return None
    shown = " ".join(f"--{k} {v}" for k, v in flags.items())
    sets = " ".join(f"--set features.{k}={v}" for k, v in flags.items())
    return f"bags in {folder.name} were made with {shown}: add {shown} (or {sets})"


def _bag_folders_hint(features_dir: Path, cfg: Config | None = None) -> str:
    """What exists next to a missing features directory, and how to point training at it.

    The layout is ``OUT/features/<tiling key>/<encoder key>``: list the encoder folders of this tiling
    with their bag counts and, when ``cfg`` is given, the exact ``--encoder``/``--weights`` flags that
    select each (from the bags' ``encoder``/``weights`` attributes); or (none there) the tiling folders
    that hold bags.
    """
    tiling = features_dir.parent
    folders = _bag_folders(tiling)
    if folders:
        listing = ", ".join(f"{p.name} ({n} bags)" for p, n in folders)
        flags = [f for p, _ in folders if cfg is not None and (f := _flags_for(p, cfg))]
        if flags:
            return f"bag folders for this tiling: {listing}. " + "; ".join(flags) + "."
        return (f"bag folders for this tiling: {listing}. Set features.encoder / features.weights so that the "
                f"folder name <encoder>-<weights> matches one (e.g. --set features.weights=random for "
                f"*-random), or set training.features_dir to it.")
    root = tiling.parent
    tilings = sorted(p.name for p in root.glob("*/") if p.is_dir() and any(_count_bags(q) for q in p.glob("*/")))
    if tilings:
        return (f"no bags for tiling {tiling.name}; bags exist for tiling(s) {_show(tilings, 5)} (other tiling/"
                "tissue settings): use the same settings as `wsi-mil extract`, or set training.features_dir.")
    return "run `wsi-mil extract` first or set training.features_dir."


@dataclass(frozen=True)
class BagInfo:
    """Shape and size of one bag file, read without loading the features."""

    n: int
    dim: int
    nbytes: int
    file_size: int
    encoder: str | None


def bag_info(path: Path) -> BagInfo:
    """Read a bag's shape and a few attributes; a clear error when the file is unreadable."""
    try:
        with h5py.File(path, "r") as f:
            shape = f["features"].shape
            encoder = f.attrs.get("encoder")
    except (OSError, KeyError) as exc:
        raise WsiMilError(f"feature bag {path} is unreadable ({exc}); delete it and rerun `wsi-mil extract`.") from None
    if isinstance(encoder, bytes):
        encoder = encoder.decode()
    n, dim = (int(shape[0]), int(shape[1])) if len(shape) == 2 else (0, 0)
    return BagInfo(n, dim, n * dim * 4, Path(path).stat().st_size, None if encoder is None else str(encoder))


def match_bags(labels: LabelTable, features_dir: Path, on_missing: str = "error") -> tuple[LabelTable, dict[str, Path]]:
    """Pair labelled slides with bags; report labels without bags and bags without labels.

    ``on_missing="error"`` raises one error listing every mismatch; ``"exclude"`` logs a warning and
    trains on the slides that have both. Empty or unreadable bags count as missing.
    """
    bags = list_bags(features_dir)
    empty = []
    for sid in labels.slide_ids:
        if sid in bags:
            try:
                if bag_info(bags[sid]).n == 0:
                    empty.append(sid)
            except WsiMilError:
                empty.append(sid)
    problems = id_mismatch(labels.slide_ids, bags, "bag")
    if empty:
        problems.append(f"{len(empty)} bag(s) are empty or unreadable ({_show(empty)})")
    if problems:
        text = f"{labels.source or 'labels'} vs {features_dir}: " + "; ".join(problems)
        if on_missing == "error":
            raise WsiMilError(
                text + ". Extract the missing bags, fix the labels file, or set training.on_missing=exclude."
            )
        log.warning("%s; excluding them (training.on_missing=exclude).", text)
    empty_set = set(empty)
    keep = [s for s in labels.slide_ids if s in bags and s not in empty_set]
    if not keep:
        raise WsiMilError(f"no labelled slide has a bag in {features_dir}; check the slide ids and the features directory.")
    table = labels.subset(keep)
    return table, {s: bags[s] for s in table.slide_ids}


def data_fingerprint(paths: dict[str, Path]) -> str:
    """Hash of the sorted slide ids with their bag sizes, shapes and encoders."""
    digest = hashlib.sha256()
    for sid in sorted(paths):
        info = bag_info(paths[sid])
        digest.update(f"{sid}|{info.file_size}|{info.n}|{info.dim}|{info.encoder}\n".encode())
    return digest.hexdigest()[:16]


class BagStore:
    """Lazy bag reader with a RAM cache (enabled when the whole cohort fits the budget)."""

    def __init__(self, paths: dict[str, Path], *, cache: bool = True, max_bytes: float = 8e9) -> None:
        self.paths = {str(k): Path(v) for k, v in paths.items()}
        self.info = {sid: bag_info(p) for sid, p in self.paths.items()}
        dims = {i.dim for i in self.info.values()}
        if len(dims) > 1:
            by_dim: dict[int, list[str]] = {}
            for sid, i in self.info.items():
                by_dim.setdefault(i.dim, []).append(sid)
            listing = "; ".join(f"{d}-d: {_show(ids, 3)}" for d, ids in sorted(by_dim.items()))
            raise WsiMilError(
                f"bags have different feature sizes ({listing}); extract all slides with the same encoder."
            )
        self.dim = dims.pop() if dims else 0
        total = sum(i.nbytes for i in self.info.values())
        budget = max_bytes
        try:
            import psutil

            budget = min(budget, psutil.virtual_memory().available / 2)
        except Exception:  # pragma: no cover - psutil missing or restricted
            pass
        self.cached = bool(cache and total <= budget)
        if cache and not self.cached:
            log.info("bags need %.1f GB > cache budget %.1f GB: reading them from disk each epoch", total / 1e9, budget / 1e9)
        self._cache: dict[str, tuple[torch.Tensor, np.ndarray]] = {}

    def load(self, slide_id: str) -> tuple[torch.Tensor, np.ndarray]:
        """Features (float32 CPU tensor [N, D]) and coords [N, 2] of one slide."""
        hit = self._cache.get(slide_id)
        if hit is not None:
            return hit
        bag = read_bag(self.paths[slide_id])
        value = (torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32)), bag.coords)
        if self.cached:
            self._cache[slide_id] = value
        return value

    def attrs(self, slide_id: str) -> dict:
        """A bag's stored attributes."""
        return read_bag_attrs(self.paths[slide_id])

    def items(self, slide_ids: Sequence[str], labels: Sequence[int], device: torch.device | str = "cpu") -> BagList:
        """The bags of ``slide_ids`` as a lazy :class:`BagList`."""
        return BagList(self, list(slide_ids), [int(y) for y in labels], torch.device(device))


class BagList(Sequence[BagItem]):
    """A read-only sequence of :class:`BagItem`; features are read (or taken from the cache) on access.

    ``slide_ids`` and ``labels`` are available without loading any features. Shuffle indices, not
    the list itself.
    """

    def __init__(self, store: BagStore, slide_ids: list[str], labels: list[int], device: torch.device) -> None:
        self.store = store
        self.slide_ids = slide_ids
        self.labels = labels
        self.device = device

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        sid = self.slide_ids[index]
        features, coords = self.store.load(sid)
        return BagItem(sid, features.to(self.device, non_blocking=True), self.labels[index], coords)

    def __iter__(self) -> Iterator[BagItem]:
        for i in range(len(self)):
            yield self[i]
