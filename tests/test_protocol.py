"""The evaluation protocol, proven by spying on every call the trainer makes.

A spy wraps each fold's training method and records every call (setup, epochs, predictions with their
outputs, state saves and loads); a spy on the bag store records every bag read. From that record,
for the trainer's plain methods, MHIM-MIL (whose baseline is trained inside the fold) and INS:
- no test slide is read or predicted before training, early stopping and the checkpoint choice are over,
  and nothing trains or reloads a state once the test fold is touched;
- the checkpoint is the best epoch by the validation predictions the spy saw;
- the logged threshold is the one chosen on the validation predictions of that checkpoint;
- every test slide is predicted exactly once per (seed, fold).
An adversarial scripted method (its validation and test scores peak at different epochs) shows that
the choices follow validation, not test.
"""

from __future__ import annotations

import io
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers.milcore import write_cohort

from wsi_mil.config import Config
from wsi_mil.mil import metrics as M
from wsi_mil.mil.base import BagItem, FoldContext, MILMethod, Prediction
from wsi_mil.mil.cv import TrainResult, train_cohort
from wsi_mil.mil.data import BagStore
from wsi_mil.mil.methods import build_method
from wsi_mil.tracking import Tracker


# ---------------------------------------------------------------------------------------------- spies
@dataclass
class FoldRecord:
    """Every call of one (seed, fold), in order: (kind, slide_id or epoch, label, probs)."""

    seed: int
    fold: int
    events: list[tuple[str, Any, int | None, np.ndarray | None]] = field(default_factory=list)


class Recorder:
    """Collects one :class:`FoldRecord` per method the trainer builds; bag reads go to the current one."""

    def __init__(self) -> None:
        self.folds: list[FoldRecord] = []

    def add(self, kind: str, key: Any = None, label: int | None = None, probs: np.ndarray | None = None) -> None:
        if self.folds:
            self.folds[-1].events.append((kind, key, label, probs))


class SpyMethod:
    """A MILMethod that forwards to a real one and records every call."""

    def __init__(self, inner: MILMethod, ctx: FoldContext, recorder: Recorder) -> None:
        self.inner, self.rec = inner, recorder
        recorder.folds.append(FoldRecord(ctx.seed, ctx.fold))

    def setup(self, fold: FoldContext) -> None:
        self.rec.add("setup_begin")
        self.inner.setup(fold)
        self.rec.add("setup_end")

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        self.rec.add("epoch_begin", epoch)
        out = self.inner.train_epoch(epoch, num_epochs)
        self.rec.add("epoch_end", epoch)
        return out

    def predict(self, bag: BagItem) -> Prediction:
        pred = self.inner.predict(bag)
        self.rec.add("predict", bag.slide_id, int(bag.label), np.asarray(pred.probs, dtype=np.float64).copy())
        return pred

    def state_dict(self) -> dict[str, Any]:
        self.rec.add("state_dict")
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rec.add("load_state")
        self.inner.load_state_dict(state)


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    """A recorder that also sees every bag the store hands out (features reach methods only this way)."""
    rec = Recorder()
    real_load = BagStore.load

    def load(self: BagStore, slide_id: str):
        rec.add("read", slide_id)
        return real_load(self, slide_id)

    monkeypatch.setattr(BagStore, "load", load)
    return rec


# ------------------------------------------------------------------------------------------ checking
def _roles(tracker: Tracker, run_id: str) -> dict[str, set[str]]:
    split = pd.read_csv(io.StringIO(tracker.read_text(run_id, "split.csv")), dtype={"slide_id": str})
    return {role: set(split.loc[split.role == role, "slide_id"]) for role in ("train", "val", "test")}


def _expected_best_epoch(epochs: list[tuple[float, float]]) -> int:
    """The trainer's rule on (val AUC, val loss) per epoch: highest AUC, ties to the lower loss, then earlier."""
    best = max(auc for auc, _ in epochs)
    return min((loss, e) for e, (auc, loss) in enumerate(epochs) if auc == best)[1]


def check_fold_protocol(record: FoldRecord, roles: dict[str, set[str]], metrics: dict[str, float]) -> dict[str, Any]:
    """Assert the protocol on one fold's record; return what was measured for further checks."""
    ev = record.events
    train, val, test = roles["train"], roles["val"], roles["test"]
    assert val and test and not (train & test) and not (val & test)
    touches = [i for i, (kind, key, _, _) in enumerate(ev) if kind in ("read", "predict") and key in test]
    assert touches, "the test fold was never scored"
    first_test = touches[0]
    fit_end = max(i for i, (kind, *_) in enumerate(ev) if kind in ("epoch_end", "load_state"))
    # nothing of the test fold before training, early stopping and the checkpoint choice are over ...
    assert first_test > fit_end, f"seed {record.seed} fold {record.fold}: a test slide was used during fit"
    seen_before = {key for kind, key, _, _ in ev[:first_test] if kind in ("read", "predict")}
    assert seen_before <= train | val, f"unknown slides used before the test fold: {seen_before - train - val}"
    # ... and nothing trains, sets up or reloads a state once it is touched
    assert not {kind for kind, *_ in ev[first_test:]} & {"setup_begin", "epoch_begin", "load_state"}
    # every test slide is predicted exactly once
    predicted = Counter(key for kind, key, _, _ in ev if kind == "predict" and key in test)
    assert predicted == Counter(test), f"test predictions per slide: {predicted}"
    # the checkpoint: the best epoch by the validation predictions made after each epoch
    per_epoch: list[tuple[float, float]] = []
    ends = [i for i, (kind, *_) in enumerate(ev) if kind == "epoch_end"]
    for n, start in enumerate(ends):
        stop = ends[n + 1] if n + 1 < len(ends) else fit_end
        preds = [(y, p) for kind, key, y, p in ev[start:stop] if kind == "predict" and key in val]
        assert len(preds) == len(val), "each epoch is scored on the whole validation split"
        y, probs = np.array([y for y, _ in preds]), np.stack([p for _, p in preds])
        per_epoch.append((M.compute_metrics(y, probs)["auc"], M.nll(y, probs)))
    assert metrics["fit/best_epoch"] == _expected_best_epoch(per_epoch)
    # the threshold: chosen on the validation predictions of that checkpoint, made before the test fold
    chosen = [(y, p) for kind, key, y, p in ev[fit_end:first_test] if kind == "predict" and key in val]
    assert len(chosen) == len(val)
    y_val, p_val = np.array([y for y, _ in chosen]), np.stack([p for _, p in chosen])
    threshold = M.choose_threshold(y_val, p_val[:, 1], "youden")
    assert metrics["fit/threshold"] == pytest.approx(threshold, abs=1e-12)
    test_preds = [(key, y, p) for kind, key, y, p in ev if kind == "predict" and key in test]
    return {"per_epoch": per_epoch, "threshold": threshold, "test": test_preds}


def check_run_protocol(result: TrainResult, out: Path, recorder: Recorder, n_folds: int,
                       seeds: list[int]) -> list[dict[str, Any]]:
    """Check every fold of a run; each (seed, fold) is trained and scored once."""
    assert sorted((r.seed, r.fold) for r in recorder.folds) == [(s, f) for s in seeds for f in range(n_folds)]
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    runs = {(f.seed, f.fold): f.run_id for f in tracker.fold_runs(result.parent_run_id)}
    measured = []
    for record in recorder.folds:
        run_id = runs[(record.seed, record.fold)]
        metrics = tracker.get_run(run_id).metrics
        measured.append(check_fold_protocol(record, _roles(tracker, run_id), metrics))
        logged = pd.read_csv(io.StringIO(tracker.read_text(run_id, "predictions.csv")), dtype={"slide_id": str})
        assert (logged["threshold"] == metrics["fit/threshold"]).all()
        assert sorted(logged["slide_id"]) == sorted(key for key, _, _ in measured[-1]["test"])
    return measured


# ------------------------------------------------------------------------------------ an adversary
def _base_score(slide_id: str) -> float:
    return 0.35 + 0.3 * (zlib.crc32(slide_id.encode()) % 1000) / 1000


class Adversary:
    """Scores that separate the classes on validation slides only at epoch 2 and on every other slide
    (the test fold) only from epoch 4: a trainer that peeks at the test fold picks another epoch."""

    VAL_QUALITY = [-1.0, -0.5, 1.0, -0.2, -0.2, -0.2, -0.2, -0.2]
    OTHER_QUALITY = [-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]

    def __init__(self, cfg: Config, ctx: FoldContext) -> None:
        self.val = set(ctx.val.slide_ids)
        self.epoch = 0

    def setup(self, fold: FoldContext) -> None:
        pass

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        self.epoch = epoch
        return {"loss": 1.0}

    def predict(self, bag: BagItem) -> Prediction:
        quality = (self.VAL_QUALITY if bag.slide_id in self.val else self.OTHER_QUALITY)[self.epoch]
        p = _base_score(bag.slide_id) + 0.3 * quality * (2 * bag.label - 1)
        return Prediction(np.array([1 - p, p]), np.zeros(1))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]


def _cfg(bags: Path, labels: Path, **extra: Any) -> Config:
    overrides = {
        "training.features_dir": str(bags), "training.labels_csv": str(labels), "training.folds": 3,
        "training.epochs": 3, "training.min_epochs": 0, "training.patience": 2, "training.val_fraction": 0.25,
        "training.bootstrap": 0, "training.threads": 1, "training.progress": False,
        "model.hidden_dim": 16, "model.attention_dim": 8, "tracking.log_checkpoints": False,
    }
    overrides.update(extra)
    return Config().with_overrides(overrides)


def test_checkpoint_and_threshold_follow_validation_even_when_test_would_pick_otherwise(tmp_path, recorder):
    # every patient holds a normal and a tumour slide
    bags, labels = write_cohort(tmp_path / "data", n_slides=24, dim=8, slides_per_patient=2,
                                label_names=["normal", "tumor"])
    out = tmp_path / "out"
    cfg = _cfg(bags, labels, **{"training.epochs": 8, "training.seeds": [0, 1], "model.name": "mean"})
    result = train_cohort(out, cfg, method_factory=lambda c, ctx: SpyMethod(Adversary(c, ctx), ctx, recorder))
    measured = check_run_protocol(result, out, recorder, 3, [0, 1])
    for fold, m in zip(result.folds, measured, strict=True):
        assert fold.best_epoch == 2 and fold.epochs_run == 5  # validation peaks at 2; patience 2 stops after 4
        # at the chosen epoch the test fold is scored inversely: AUC 0, which a test-peeking trainer avoids
        assert fold.test_metrics["auc"] == 0.0
        y = np.array([y for _, y, _ in m["test"]])
        p1 = np.array([p[1] for _, _, p in m["test"]])
        assert M.choose_threshold(y, p1) != pytest.approx(m["threshold"])  # test would have chosen another cut
        assert fold.threshold == pytest.approx(m["threshold"])


@pytest.mark.parametrize("model", ["abmil", "mhim", "ins"])
def test_no_test_slide_reaches_training_early_stopping_checkpoint_or_threshold(tmp_path, recorder, model):
    bags, labels = write_cohort(tmp_path / "data", n_slides=24, dim=16, n_min=8, n_max=24, shift=4.0,
                                slides_per_patient=2, label_names=["normal", "tumor"])
    out = tmp_path / "out"
    extra: dict[str, Any] = {"model.name": model}
    if model == "mhim":
        extra.update({"model.mhim.student": "abmil"})
    if model == "ins":
        extra.update({"model.ins.batch_size": 32, "model.ins.queue_size": 256, "model.ins.width": 32,
                      "model.ins.embed_dim": 16, "model.ins.lr": 0.05})
    cfg = _cfg(bags, labels, **extra)
    result = train_cohort(out, cfg, method_factory=lambda c, ctx: SpyMethod(build_method(c, ctx), ctx, recorder))
    check_run_protocol(result, out, recorder, 3, [0])
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    runs = {(f.seed, f.fold): f.run_id for f in tracker.fold_runs(result.parent_run_id)}
    for record in recorder.folds:
        roles = _roles(tracker, runs[(record.seed, record.fold)])
        ev = record.events
        begin = next(i for i, e in enumerate(ev) if e[0] == "setup_begin")
        end = next(i for i, e in enumerate(ev) if e[0] == "setup_end")
        in_setup = {key for kind, key, _, _ in ev[begin:end] if kind == "read"}
        if model == "mhim":
            # the in-fold baseline trains on the fold's training bags and stops early on its validation bags
            assert in_setup == roles["train"] | roles["val"]
            assert tracker.get_run(runs[(record.seed, record.fold)]).metrics["baseline/fit/best_epoch"] >= 0
        else:
            assert in_setup <= roles["train"]
        in_epochs = {key for kind, key, _, _ in ev[end:] if kind == "read"} - roles["test"]
        assert roles["train"] <= in_setup | in_epochs  # every training bag is used (INS keeps them from setup on)
