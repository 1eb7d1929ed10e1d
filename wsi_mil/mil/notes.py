"""Run descriptions (MLflow's run note, Markdown) of a cross-validated training.

The parent run's description says what was trained on what (cohort, classes, model, encoder,
tiling, folds x seeds) and, once finished, the test metrics (mean +- std over folds and seeds), the
decision threshold and where the model is; a fold run's says its split, the kept epoch and threshold,
and why ``val/auc`` is missing when its validation split holds one class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from wsi_mil.mil.data import LabelTable


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _class_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.items())


def single_class_note(val_labels: Sequence[int], classes: Sequence[str]) -> str | None:
    """Why a fold has no validation AUC (its validation split holds one class or none), else None."""
    present = sorted(set(int(y) for y in val_labels))
    if len(present) >= 2:
        return None
    fallback = ", and the decision threshold fell back to 0.5" if len(classes) == 2 else ""
    if not present:
        return f"no validation slides: val/auc is undefined, every epoch ran (no early stopping){fallback}"
    return (f"the validation split holds one class ({classes[present[0]]}): val/auc is undefined, so early stopping "
            f"and the kept epoch followed val/loss{fallback}")


def cohort_note(*, model: str, labels: LabelTable, source: str, encoder: str, tiling: str, n_folds: int,
                seeds: Sequence[int], in_dim: int) -> str:
    """The parent run's description while it trains: what is trained on what."""
    df = labels.df
    counts = {name: int((df["y"] == c).sum()) for c, name in enumerate(labels.classes)}
    return "\n".join([
        f"**{model}**, cross-validated on **{len(df)} slides of {df['patient_id'].nunique()} patients** "
        f"from `{source}`.",
        "",
        f"- classes: {_class_counts(counts)}",
        f"- features: encoder `{encoder}` ({in_dim}-d), tiling `{tiling}`",
        f"- {n_folds} fold(s) x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): patient-level splits, validation "
        "patients inside each training fold for early stopping, checkpoint and threshold; each test fold scored once",
    ])


def summary_note(head: str, summary: pd.DataFrame, *, threshold: float | None, threshold_rule: str,
                 single_class: Sequence[str] = (), model_uri: str | None = None) -> str:
    """The parent run's description when finished: ``head`` plus the test metrics table and the model."""
    lines = [head, "", "| test metric | mean | std | n |", "|---|---|---|---|"]
    lines += [f"| {name} | {_num(row['mean'])} | {_num(row['std'])} | {int(row['n'])} |"
              for name, row in summary.iterrows()]
    lines.append("")
    if threshold is not None:
        lines.append(f"Decision threshold: each fold's, chosen on its validation split ({threshold_rule}); the "
                     f"folds together (the logged model, `wsi-mil predict`) use their median, {threshold:.3f}.")
    for line in single_class:
        lines.append(f"- {line}")
    if model_uri:
        lines.append(f"Model: `{model_uri}` (`wsi-mil predict SLIDES --model {model_uri}`).")
    return "\n".join(lines)


def fold_note(name: str, counts: dict[str, int], classes: Sequence[str], *, best_epoch: int, epochs_run: int,
              stopped_early: bool, threshold: float | None, threshold_rule: str, val_auc: float | None,
              test: dict[str, float], single_class: str | None) -> str:
    """A fold run's description: its split counts, the kept epoch, threshold and test AUC.

    ``counts`` is the fold's row of :func:`wsi_mil.mil.splits.split_counts`.
    """
    rows = ["| role | patients | slides | " + " | ".join(classes) + " |", "|---" * (3 + len(classes)) + "|"]
    for role in ("train", "val", "test"):
        per_class = " | ".join(str(counts.get(f"{role}_{c}", 0)) for c in classes)
        rows.append(f"| {role} | {counts.get(f'{role}_patients', 0)} | {counts.get(f'{role}_slides', 0)} | {per_class} |")
    stop = "stopped early" if stopped_early else "no early stop"
    lines = [f"**{name}**", "", *rows, "",
             f"Kept epoch {best_epoch} of {epochs_run} run ({stop}); validation AUC there {_num(val_auc)}."]
    if threshold is not None:
        lines.append(f"Decision threshold {threshold:.3f} ({threshold_rule}, on the validation split).")
    if "auc" in test:
        ci = (test.get("auc_ci_low"), test.get("auc_ci_high"))
        interval = f" [{_num(ci[0])}, {_num(ci[1])}]" if None not in ci else ""
        lines.append(f"Test AUC {_num(test['auc'])}{interval}.")
    if single_class:
        lines.append(f"Note: {single_class}.")
    return "\n".join(lines)
