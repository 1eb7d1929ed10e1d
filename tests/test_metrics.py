"""Metrics against scikit-learn (also with sample weights), the validation threshold rule, bootstrap CIs
that resample patients. That the trainer takes the threshold from validation only is pinned in
test_protocol.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from wsi_mil.mil import metrics as M


def _binary(rng, n=80):
    y = rng.integers(0, 2, size=n)
    p1 = np.clip(0.35 * y + rng.normal(0.35, 0.2, size=n), 0, 1)
    return y, np.stack([1 - p1, p1], axis=1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_binary_metrics_match_sklearn(seed, threshold):
    y, probs = _binary(np.random.default_rng(seed))
    probs[:5, 1] = probs[5:10, 1]  # ties
    got = M.compute_metrics(y, probs, threshold)
    pred = (probs[:, 1] >= threshold).astype(int)
    assert got["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=90)
    logits = rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = M.compute_metrics(y, probs)
    pred = probs.argmax(1)
    assert got["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0))


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_weighted_metrics_match_sklearn_sample_weight(n_classes):
    """The bootstrap weighs slides by how often their unit was drawn: each weighted metric equals sklearn's."""
    rng = np.random.default_rng(n_classes)
    for _ in range(10):
        y = rng.integers(0, n_classes, size=60)
        probs = np.round(rng.random((60, n_classes)), 1) + 0.1  # rounded: many ties
        probs /= probs.sum(1, keepdims=True)
        w = rng.integers(0, 4, size=60).astype(float)
        pred = M.predict_labels(probs, 0.45)
        got = {k: v[0] for k, v in M._metric_rows(y, probs, pred, w[None]).items()}
        m = w > 0
        if n_classes == 2:
            auc = roc_auc_score(y, probs[:, 1], sample_weight=w)
            f1 = f1_score(y, pred, sample_weight=w, zero_division=0)
        else:
            auc = np.mean([roc_auc_score(y == c, probs[:, c], sample_weight=w) for c in range(n_classes)])
            f1 = f1_score(y[m], pred[m], average="macro", sample_weight=w[m], zero_division=0)
        assert got["auc"] == pytest.approx(auc)
        assert got["f1"] == pytest.approx(f1)
        assert got["accuracy"] == pytest.approx(accuracy_score(y, pred, sample_weight=w))
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[m], pred[m], sample_weight=w[m]))


def test_macro_f1_ignores_classes_absent_from_truth_and_prediction():
    y = np.array([0, 0, 1, 1, 0, 1])  # class 2 of 3 never occurs and is never predicted
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1],
                      [0.6, 0.3, 0.1]])
    got = M.compute_metrics(y, probs)["f1"]
    assert got == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))  # sklearn's labels: present ones
    assert got != pytest.approx(f1_score(y, probs.argmax(1), average="macro", labels=[0, 1, 2], zero_division=0))


def test_single_class_auc_is_nan():
    got = M.compute_metrics([1, 1, 1], np.array([0.2, 0.6, 0.9]), 0.5)
    assert math.isnan(got["auc"])
    assert got["accuracy"] == pytest.approx(2 / 3)


def test_youden_threshold_reproduces_validation_decisions_and_is_applied_unchanged():
    # validation: positives score >= 0.7, negatives <= 0.4 -> Youden threshold between them
    y_val = np.array([0, 0, 0, 1, 1, 1])
    s_val = np.array([0.1, 0.3, 0.4, 0.7, 0.8, 0.95])
    t = M.choose_threshold(y_val, s_val, "youden")
    assert 0.4 < t <= 0.7 and t == pytest.approx(0.55)
    assert M.compute_metrics(y_val, s_val, t)["accuracy"] == 1.0
    # predictions at a given threshold use exactly that cut, even where another cut would do better
    y_test = np.array([0, 0, 1, 1])
    s_test = np.array([0.2, 0.3, 0.45, 0.5])
    assert M.compute_metrics(y_test, s_test, t)["accuracy"] == 0.5
    assert M.compute_metrics(y_test, s_test, 0.4)["accuracy"] == 1.0


def test_f1_threshold_and_fallback():
    y = np.array([0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.9])
    t = M.choose_threshold(y, s, "f1")
    best = max(f1_score(y, (s >= c).astype(int)) for c in s)
    assert f1_score(y, (s >= t).astype(int)) == pytest.approx(best)
    assert M.choose_threshold([1, 1], [0.2, 0.3]) == 0.5


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    y, probs = _binary(np.random.default_rng(0), n=200)
    a = M.bootstrap_ci(y, probs, 0.5, n_boot=500, seed=3)
    b = M.bootstrap_ci(y, probs, 0.5, n_boot=500, seed=3)
    point = M.compute_metrics(y, probs, 0.5)
    assert a == b
    for k in M.METRICS:
        lo, hi = a[k]
        assert lo <= point[k] <= hi
        assert hi - lo < 0.3
    small = M.bootstrap_ci(y[:30], probs[:30], 0.5, n_boot=500, seed=3)
    assert small["auc"][1] - small["auc"][0] > a["auc"][1] - a["auc"][0]
    ev = M.evaluate(y, probs, 0.5, n_boot=100, seed=1)
    assert set(ev) >= {"auc", "auc_ci_low", "auc_ci_high", "f1_ci_high"}


def test_bootstrap_resamples_patients_when_they_hold_several_slides():
    rng = np.random.default_rng(7)
    y_pat = np.arange(12) % 2
    p1 = np.clip(0.15 * y_pat + rng.uniform(0.2, 0.8, size=12), 0, 1)  # a weak signal: AUC well inside (0, 1)
    p_pat = np.stack([1 - p1, p1], axis=1)
    y = np.repeat(y_pat, 6)  # six slides per patient, predicted alike (correlated, as slides of one patient are)
    probs = np.repeat(p_pat, 6, axis=0)
    patients = np.repeat([f"P{i}" for i in range(12)], 6)
    assert M.resampling_units(patients, 72)[1] == "patient"
    assert M.resampling_units(None, 72)[1] == "slide"
    assert M.resampling_units([f"P{i}" for i in range(72)], 72)[1] == "slide"
    by_patient = M.bootstrap_ci(y, probs, 0.5, n_boot=400, seed=2, groups=patients)
    # drawing patients is drawing the 12 independent units: the same draws give the same CIs
    per_patient = M.bootstrap_ci(y_pat, p_pat, 0.5, n_boot=400, seed=2)
    for k in M.METRICS:
        assert by_patient[k] == pytest.approx(per_patient[k])
    # treating the 72 slides as independent would claim a much narrower interval
    by_slide = M.bootstrap_ci(y, probs, 0.5, n_boot=400, seed=2)
    assert (by_slide["auc"][1] - by_slide["auc"][0]) < 0.7 * (by_patient["auc"][1] - by_patient["auc"][0])
    ev = M.evaluate(y, probs, 0.5, n_boot=400, seed=2, groups=patients)
    assert (ev["accuracy_ci_low"], ev["accuracy_ci_high"]) == pytest.approx(by_patient["accuracy"])


def test_nll_and_summary():
    assert M.nll([0, 1], np.array([[0.5, 0.5], [0.25, 0.75]])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    table = M.summarize([{"auc": 0.8, "accuracy": 0.7, "balanced_accuracy": 0.7, "f1": 0.6},
                         {"auc": 0.9, "accuracy": 0.9, "balanced_accuracy": 0.8, "f1": 0.8}])
    assert table.loc["auc", "mean"] == pytest.approx(0.85)
    assert table.loc["auc", "std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert table.loc["f1", "n"] == 2
    assert "auc" in M.format_summary(table)


# ------------------------------------------------------------------------------ the one ROC AUC
@pytest.mark.parametrize("seed", range(3))
def test_roc_auc_matches_sklearn_with_ties_and_ignores_non_finite_scores(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=60)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: many ties
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert M.roc_auc(y.astype(bool), s) == pytest.approx(roc_auc_score(y, s))
    s_nan = s.copy()
    s_nan[:7] = np.nan
    s_nan[7] = np.inf
    assert M.roc_auc(y, s_nan) == pytest.approx(roc_auc_score(y[8:], s[8:]))


def test_roc_auc_edges():
    labels = np.array([0, 0, 1, 1, 0, 1])
    assert M.roc_auc(labels, [0.1, 0.2, 0.8, 0.9, 0.3, 0.7]) == 1.0
    assert M.roc_auc(labels, [0.9, 0.8, 0.1, 0.2, 0.7, 0.3]) == 0.0
    assert math.isnan(M.roc_auc([1, 1], [0.1, 0.5]))  # one class
    assert math.isnan(M.roc_auc([], []))
    with pytest.raises(ValueError, match="binary"):
        M.roc_auc([0.3, 1.0], [0.1, 0.5])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        M.roc_auc([0, 1], [0.1, 0.5, 0.7])


def test_instance_auc_pools_over_slides() -> None:
    scores = {"a": np.array([0.9, 0.1, 0.2]), "b": np.array([0.8, 0.3]), "c": np.array([0.5])}
    labels = {"a": np.array([1, 0, 0]), "b": np.array([1, 0]), "c": None}
    assert M.instance_auc(scores, labels) == pytest.approx(1.0)
    labels["b"] = np.array([0, 1])  # negative 0.8 outranks positive 0.3: 5 of 6 pairs right
    assert M.instance_auc(scores, labels) == pytest.approx(5 / 6)
    assert np.isnan(M.instance_auc({"a": np.array([0.1, 0.2])}, {"a": np.array([0, 0])}))
    assert M.instance_auc([np.array([0.2, 0.7])], [np.array([0, 1])]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="slide a"):
        M.instance_auc({"a": np.array([0.1])}, {"a": np.array([0, 1])})
