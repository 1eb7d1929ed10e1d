"""Patient-level cross-validation splits.

The split table has one row per (seed, fold, slide): ``seed, fold, slide_id, patient_id, y, role``
with ``role`` in train / val / test. For each seed, patients are dealt to ``training.folds`` test
folds stratified by their label (a patient's label is its most frequent slide label), and a
validation share of each fold's training patients is held out, again stratified by label. A patient's
slides therefore never sit in two roles of one fold and never in two test folds of one seed.
With ``training.fixed_splits`` the CSV's ``split`` column is used instead (one fold per seed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_mil.config import TrainingConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.data import LabelTable

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")
COLUMNS = ["seed", "fold", "slide_id", "patient_id", "y", "role"]


def patient_table(labels: LabelTable) -> pd.DataFrame:
    """One row per patient: ``patient_id, stratum, n_slides`` (stratum = most frequent label, ties -> higher)."""
    rows = []
    for pid, group in labels.df.groupby("patient_id", sort=True):
        counts = group["y"].value_counts()
        top = counts.max()
        rows.append((pid, int(max(counts[counts == top].index)), len(group)))
    return pd.DataFrame(rows, columns=["patient_id", "stratum", "n_slides"])


def _deal_folds(patients: pd.DataFrame, folds: int, rng: np.random.Generator) -> dict[str, int]:
    """Assign patients to folds, balancing each stratum and then the slide count."""
    per_stratum = np.zeros((folds, int(patients["stratum"].max()) + 1), dtype=int)
    slides = np.zeros(folds, dtype=int)
    out: dict[str, int] = {}
    for stratum in sorted(patients["stratum"].unique()):
        group = patients[patients["stratum"] == stratum]
        order = rng.permutation(len(group))
        group = group.iloc[order]
        group = group.iloc[np.argsort(-group["n_slides"].to_numpy(), kind="stable")]
        for pid, n in zip(group["patient_id"], group["n_slides"], strict=True):
            tie = rng.random(folds)
            fold = min(range(folds), key=lambda f: (per_stratum[f, stratum], slides[f], tie[f]))
            out[pid] = fold
            per_stratum[fold, stratum] += 1
            slides[fold] += n
    return out


def _carve_val(patients: pd.DataFrame, fraction: float, rng: np.random.Generator) -> set[str]:
    """Pick the validation patients among training patients, stratified (>= 1 per stratum when possible)."""
    val: set[str] = set()
    for _, group in patients.groupby("stratum", sort=True):
        n = len(group)
        if n < 2:
            continue
        k = min(n - 1, max(1, int(round(fraction * n))))
        chosen = rng.choice(group["patient_id"].to_numpy(), size=k, replace=False)
        val.update(str(p) for p in chosen)
    return val


def kfold_splits(labels: LabelTable, cfg: TrainingConfig) -> pd.DataFrame:
    """Stratified patient-level k-fold with a validation carve-out, repeated for each seed."""
    patients = patient_table(labels)
    folds = cfg.folds
    counts = patients["stratum"].value_counts()
    short = {labels.classes[int(s)]: int(counts.get(s, 0)) for s in range(labels.n_classes) if counts.get(s, 0) < folds}
    if short:
        listing = ", ".join(f"{name}: {n}" for name, n in short.items())
        raise WsiMilError(
            f"{labels.source or 'labels'}: too few patients per class for {folds} folds ({listing}); "
            "lower training.folds or add slides."
        )
    slide_rows = labels.df[["slide_id", "patient_id", "y"]]
    frames = []
    for seed in cfg.seeds:
        rng = np.random.default_rng(seed)
        assignment = _deal_folds(patients, folds, rng)
        for fold in range(folds):
            train_pat = patients[patients["patient_id"].map(assignment) != fold]
            val = _carve_val(train_pat, cfg.val_fraction, rng)
            if train_pat.groupby("stratum").size().min() < 2 or len(set(train_pat["stratum"])) < labels.n_classes:
                log.warning("seed %d fold %d: a class has fewer than 2 training patients; its validation split "
                            "lacks that class", seed, fold)
            role = np.where(
                slide_rows["patient_id"].map(assignment).to_numpy() == fold,
                "test",
                np.where(slide_rows["patient_id"].isin(val).to_numpy(), "val", "train"),
            )
            frame = slide_rows.assign(seed=seed, fold=fold, role=role)
            frames.append(frame[COLUMNS])
    return pd.concat(frames, ignore_index=True)


def fixed_splits(labels: LabelTable, cfg: TrainingConfig) -> pd.DataFrame:
    """Splits from the labels CSV's ``split`` column (one fold, repeated for each seed)."""
    df = labels.df
    if "split" not in df.columns:
        raise WsiMilError(
            f"{labels.source or 'labels'} has no 'split' column but training.fixed_splits is true; "
            "add a split column (train/val/test) or set training.fixed_splits=false."
        )
    missing = [r for r in ROLES if not (df["split"] == r).any()]
    if missing:
        raise WsiMilError(f"{labels.source or 'labels'}: the split column has no {', '.join(missing)} slides; "
                          "each of train, val and test needs at least one.")
    roles_per_patient = df.groupby("patient_id")["split"].nunique()
    leaking = sorted(roles_per_patient[roles_per_patient > 1].index)
    if leaking:
        raise WsiMilError(
            f"{labels.source or 'labels'}: patient(s) {', '.join(map(str, leaking[:10]))} have slides in "
            "more than one split; put all slides of a patient in the same split."
        )
    base = df[["slide_id", "patient_id", "y"]].assign(fold=0, role=df["split"].to_numpy())
    frames = [base.assign(seed=seed)[COLUMNS] for seed in cfg.seeds]
    return pd.concat(frames, ignore_index=True)


def make_splits(labels: LabelTable, cfg: TrainingConfig) -> pd.DataFrame:
    """The split table for these labels and settings (checked with :func:`check_splits`)."""
    table = fixed_splits(labels, cfg) if cfg.fixed_splits else kfold_splits(labels, cfg)
    check_splits(table, kfold=not cfg.fixed_splits)
    return table


def check_splits(table: pd.DataFrame, *, kfold: bool = True) -> None:
    """Raise ``WsiMilError`` if a split leaks: a patient in two roles of a fold, a slide twice in a fold,
    (k-fold) a slide not tested exactly once per seed, or an empty train/test set."""
    for (seed, fold), group in table.groupby(["seed", "fold"]):
        if group["slide_id"].duplicated().any():
            raise WsiMilError(f"split seed {seed} fold {fold}: a slide appears twice.")
        roles = group.groupby("patient_id")["role"].nunique()
        if (roles > 1).any():
            bad = ", ".join(map(str, roles[roles > 1].index[:5]))
            raise WsiMilError(f"split seed {seed} fold {fold}: patient(s) {bad} in more than one role.")
        for role in ("train", "test"):
            if not (group["role"] == role).any():
                raise WsiMilError(f"split seed {seed} fold {fold}: no {role} slides.")
    if kfold:
        for seed, group in table.groupby("seed"):
            tested = group[group["role"] == "test"]["slide_id"].value_counts()
            if (tested != 1).any() or set(tested.index) != set(group["slide_id"]):
                raise WsiMilError(f"split seed {seed}: each slide must be in exactly one test fold.")
            test_folds = group[group["role"] == "test"].groupby("patient_id")["fold"].nunique()
            if (test_folds > 1).any():
                raise WsiMilError(f"split seed {seed}: a patient's slides are in two test folds.")


def fold_ids(table: pd.DataFrame, seed: int, fold: int, role: str) -> list[str]:
    """Slide ids of one role in one (seed, fold), in table order."""
    sel = (table["seed"] == seed) & (table["fold"] == fold) & (table["role"] == role)
    return table.loc[sel, "slide_id"].tolist()


def save_splits(table: pd.DataFrame, path: Path) -> Path:
    """Write the split table as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def load_splits(path: Path) -> pd.DataFrame:
    """Read a split table written by :func:`save_splits`."""
    return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "role": str})
