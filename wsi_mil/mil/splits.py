"""Patient-level cross-validation splits.

The split table has one row per (seed, fold, slide): ``seed, fold, slide_id, patient_id, y, role``
with ``role`` in train / val / test.

For each seed, scikit-learn's ``StratifiedGroupKFold`` (shuffled with the seed) deals patients to
``training.folds`` test folds so that the folds' *slide* label distributions are as even as possible
while every patient stays whole; a patient may hold slides of several labels (a tumour and a normal
slide, as TCGA's -01/-11 samples). Inside each fold's training patients the validation patients are
carved out the same way: the first inner fold of ``StratifiedGroupKFold`` with
``round(1 / training.val_fraction)`` splits that holds every class and leaves every class in training
(with few patients, fewer and larger inner folds until one does).
A patient's slides therefore never sit in two roles of one fold and never in two test folds of one
seed. With ``training.fixed_splits`` the CSV's ``split`` column is used instead (one fold per seed).

:func:`check_feasible` says before any work whether the labels allow the folds (each class needs
slides on at least ``folds`` patients, one per test fold); :func:`split_counts` is the per-fold
table of patients, slides and slides per class of each role that is logged beside the splits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from wsi_mil.config import TrainingConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.data import LabelTable

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")
COLUMNS = ["seed", "fold", "slide_id", "patient_id", "y", "role"]


def _source(labels: LabelTable) -> str:
    return str(labels.source or "labels")


# ------------------------------------------------------------------------------------ feasibility
def class_support(labels: LabelTable) -> pd.DataFrame:
    """Per class: ``slides`` and ``patients`` holding at least one slide of it (index = class name)."""
    df = labels.df
    rows = [{"class": name, "slides": int((df["y"] == c).sum()),
             "patients": int(df.loc[df["y"] == c, "patient_id"].nunique())}
            for c, name in enumerate(labels.classes)]
    return pd.DataFrame(rows).set_index("class")


def check_feasible(labels: LabelTable, cfg: TrainingConfig) -> None:
    """Raise :class:`WsiMilError` naming what is short when ``cfg.folds`` patient-level folds cannot be made.

    Every test fold must hold a slide of every class, and a patient sits in one test fold only, so
    each class needs slides on at least ``folds`` different patients (a patient with a tumour and a
    normal slide counts for both classes). Fixed splits are checked by :func:`fixed_splits` instead.
    """
    if cfg.fixed_splits:
        return
    folds = cfg.folds
    support = class_support(labels)
    n_patients = labels.df["patient_id"].nunique()
    short = support[support["patients"] < folds]
    if n_patients >= folds and short.empty:
        return
    problems = []
    if n_patients < folds:
        problems.append(f"{n_patients} patient(s) in all")
    problems += [f"'{name}' has {row.slides} slide(s) on {row.patients} patient(s)" for name, row in short.iterrows()]
    most = int(min(n_patients, support["patients"].min()))
    fix = "add patients" if short.empty else "add patients with slides of the short class(es)"
    fix = f"Lower training.folds to {most} (--set training.folds={most}), or {fix}" if most >= 2 else fix[0].upper() + fix[1:]
    raise WsiMilError(
        f"{_source(labels)}: {folds} folds need slides of every class on at least {folds} patients (one per "
        f"test fold; a patient's slides stay in one fold): {'; '.join(problems)}. {fix}."
    )


# ----------------------------------------------------------------------------------------- k-fold
def _group_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """Row indices of each test fold of ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)``."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only k members": checked by us
        warnings.simplefilter("ignore", UserWarning)
        return [test for _, test in splitter.split(np.zeros(len(y)), y, groups)]


def _carve_val(rows: pd.DataFrame, fraction: float, seed: int) -> set[str]:
    """Validation patients among a fold's training rows (``patient_id``, ``y``), grouped and stratified.

    The first inner ``StratifiedGroupKFold`` fold with ``round(1 / fraction)`` splits that holds every
    training class while leaving every class in training; when none does (few patients), fewer and
    larger inner folds are tried; failing that, the inner fold with the most classes.
    """
    y, groups = rows["y"].to_numpy(), rows["patient_id"].to_numpy()
    classes = set(y)
    most = min(max(2, round(1 / fraction)), len(set(groups)), int(rows["y"].value_counts().max()))
    best, best_key = None, None
    for n_splits in range(most, 1, -1):
        for test in _group_folds(y, groups, n_splits, seed):
            kept = np.ones(len(y), dtype=bool)
            kept[test] = False
            key = (set(y[kept]) == classes, len(set(y[test])))
            if key == (True, len(classes)):
                return set(groups[test])
            if best_key is None or key > best_key:
                best, best_key = test, key
    return set() if best is None else set(groups[best])


def kfold_splits(labels: LabelTable, cfg: TrainingConfig) -> pd.DataFrame:
    """Patient-grouped, slide-label-stratified k-fold with a grouped validation carve-out, per seed.

    Raises
    ------
    WsiMilError
        When the folds cannot give every class to every test fold and training part; the message names
        the largest ``training.folds`` that would.
    """
    check_feasible(labels, cfg)
    table = _split_table(labels, cfg)
    short = _missing_classes(table, labels, warn=True)
    if short:
        raise WsiMilError(
            f"{_source(labels)}: the patient-level folds could not give every class to every fold ("
            + "; ".join(short[:10]) + f"). {_fewer_folds_fix(labels, cfg)}"
        )
    return table


def _split_table(labels: LabelTable, cfg: TrainingConfig) -> pd.DataFrame:
    slides = labels.df[["slide_id", "patient_id", "y"]].reset_index(drop=True)
    y, groups = slides["y"].to_numpy(), slides["patient_id"].to_numpy()
    frames = []
    for seed in cfg.seeds:
        draws = np.random.default_rng(seed).integers(0, 2**31 - 1, size=cfg.folds + 1)
        tests = _group_folds(y, groups, cfg.folds, int(draws[0]))
        for fold, test in enumerate(tests):
            role = np.full(len(slides), "train", dtype=object)
            role[test] = "test"
            train_rows = slides[role == "train"]
            val = _carve_val(train_rows, cfg.val_fraction, int(draws[fold + 1]))
            role[(role == "train") & slides["patient_id"].isin(val).to_numpy()] = "val"
            frames.append(slides.assign(seed=seed, fold=fold, role=role)[COLUMNS])
    return pd.concat(frames, ignore_index=True)


def _missing_classes(table: pd.DataFrame, labels: LabelTable, *, warn: bool) -> list[str]:
    """Test folds or training parts lacking a class; with ``warn``, a warning per validation part lacking one."""
    wanted = set(range(labels.n_classes))
    short: list[str] = []
    for (seed, fold), group in table.groupby(["seed", "fold"], sort=True):
        for role in ROLES:
            missing = wanted - set(group.loc[group["role"] == role, "y"])
            names = ", ".join(f"'{labels.classes[c]}'" for c in sorted(missing))
            if missing and role == "val":
                if warn:
                    log.warning("seed %s fold %s: the validation patients hold no %s slide (too few training "
                                "patients of that class); early stopping and the threshold see fewer classes",
                                seed, fold, names)
            elif missing:
                short.append(f"seed {seed} fold {fold} {role} has no {names} slide")
    return short


def _fewer_folds_fix(labels: LabelTable, cfg: TrainingConfig) -> str:
    """The fix for folds short of a class: the largest fold count below ``cfg.folds`` that works, if any."""
    for folds in range(cfg.folds - 1, 1, -1):
        if not _missing_classes(_split_table(labels, cfg.model_copy(update={"folds": folds})), labels, warn=False):
            return (f"Lower training.folds to {folds} (--set training.folds={folds}: the most that gives every "
                    "class to every fold here), or add patients of those classes.")
    return "Add patients of those classes: no number of folds from 2 up gives every class to every fold."


# ------------------------------------------------------------------------------------------ fixed
def fixed_splits(labels: LabelTable, cfg: TrainingConfig) -> pd.DataFrame:
    """Splits from the labels CSV's ``split`` column (one fold, repeated for each seed)."""
    df = labels.df
    if "split" not in df.columns:
        raise WsiMilError(
            f"{_source(labels)} has no 'split' column but training.fixed_splits is true; "
            "add a split column (train/val/test) or set training.fixed_splits=false."
        )
    missing = [r for r in ROLES if not (df["split"] == r).any()]
    if missing:
        raise WsiMilError(f"{_source(labels)}: the split column has no {', '.join(missing)} slides; "
                          "each of train, val and test needs at least one.")
    roles_per_patient = df.groupby("patient_id")["split"].nunique()
    leaking = sorted(roles_per_patient[roles_per_patient > 1].index)
    if leaking:
        raise WsiMilError(
            f"{_source(labels)}: patient(s) {', '.join(map(str, leaking[:10]))} have slides in "
            "more than one split; put all slides of a patient in the same split."
        )
    base = df[["slide_id", "patient_id", "y"]].assign(fold=0, role=df["split"].to_numpy())
    frames = [base.assign(seed=seed)[COLUMNS] for seed in cfg.seeds]
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------- the table
def make_splits(labels: LabelTable, cfg: TrainingConfig) -> pd.DataFrame:
    """The split table for these labels and settings (checked with :func:`check_splits`).

    Raises
    ------
    WsiMilError
        When the folds are infeasible (:func:`check_feasible`), a fold's test or training part lacks
        a class, or fixed splits are malformed.
    """
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


def split_counts(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per (seed, fold): patients, slides and slides of each class in train, val and test.

    Columns ``seed, fold``, then for each role ``<role>_patients, <role>_slides, <role>_<class>...``
    (e.g. ``test_normal``), so a fold's balance reads along one row.
    """
    rows = []
    for (seed, fold), group in table.groupby(["seed", "fold"], sort=True):
        row: dict[str, int] = {"seed": int(seed), "fold": int(fold)}
        for role in ROLES:
            part = group[group["role"] == role]
            row[f"{role}_patients"] = int(part["patient_id"].nunique())
            row[f"{role}_slides"] = len(part)
            counts = part["y"].value_counts()
            row.update({f"{role}_{name}": int(counts.get(c, 0)) for c, name in enumerate(classes)})
        rows.append(row)
    return pd.DataFrame(rows)


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
