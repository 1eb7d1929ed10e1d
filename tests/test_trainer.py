"""Cross-validated training end to end: early stopping, MLflow runs/metrics/artifacts, evaluate, baselines."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import servers
from helpers.milcore import write_cohort

from wsi_mil import cli
from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.base import BagItem, FoldContext, Prediction
from wsi_mil.mil.checkpoints import load_checkpoint, load_fold_method, load_run_splits
from wsi_mil.mil.cv import train_cohort
from wsi_mil.mil.evaluation import evaluate_run
from wsi_mil.mil.fit import fit
from wsi_mil.mil.methods import BagMethod
from wsi_mil.mil.models import build_model
from wsi_mil.tracking import Tracker


@pytest.fixture(autouse=True)
def _one_thread():
    """One-bag steps are tiny: a single torch thread avoids oversubscription on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- early stopping
class ScriptedMethod:
    """A real MILMethod whose validation scores follow a script (epoch -> positive-class scores)."""

    def __init__(self, script: list[list[float]]) -> None:
        self.script = script
        self.epoch = -1

    def setup(self, fold: FoldContext) -> None:
        pass

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        self.epoch = epoch
        return {"loss": 1.0 / (epoch + 1), "mask_ratio": 0.5}

    def predict(self, bag: BagItem) -> Prediction:
        scores = self.script[min(self.epoch, len(self.script) - 1)]
        p = scores[int(bag.slide_id)]
        return Prediction(np.array([1 - p, p]), np.zeros(1))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]


def _val_bags() -> list[BagItem]:
    return [BagItem(str(i), torch.zeros(1, 2), label) for i, label in enumerate([0, 0, 1, 1])]


SCRIPT = [
    [0.5, 0.5, 0.5, 0.5],  # AUC 0.5
    [0.2, 0.6, 0.5, 0.7],  # 0.75
    [0.45, 0.48, 0.52, 0.55],  # 1.0 (high loss)
    [0.1, 0.2, 0.8, 0.9],  # 1.0 with lower loss -> best by tie-break
    [0.2, 0.6, 0.5, 0.7],  # 0.75 from here on: a plateau below the best
]


@pytest.mark.parametrize(("min_epochs", "patience", "runs"), [(2, 3, 6), (9, 3, 9), (0, 10, 13)])
def test_early_stopping_keeps_best_and_stops_on_plateau(min_epochs, patience, runs):
    cfg = Config().with_overrides({"training.epochs": 50, "training.min_epochs": min_epochs,
                                   "training.patience": patience})
    ctx = FoldContext(0, 0, [], _val_bags(), 2, 2, torch.device("cpu"))
    method = ScriptedMethod(SCRIPT)
    logged: list[tuple[int, dict]] = []
    result = fit(method, ctx, cfg.training, log_epoch=lambda row, step: logged.append((step, row)), progress=False)
    assert result.epochs_run == runs and result.stopped_early
    assert result.best_epoch == 3 and method.epoch == 3  # best checkpoint reloaded
    assert result.best_val_auc == 1.0
    assert result.history["val/auc"][:4] == [0.5, 0.75, 1.0, 1.0]
    assert [s for s, _ in logged] == list(range(runs))
    assert set(logged[0][1]) == {"train/loss", "train/mask_ratio", "val/auc", "val/loss"}


# ------------------------------------------------------------------------------------ full training
def _cfg(bags: Path, labels: Path, **extra: Any) -> Config:
    overrides = {
        "training.features_dir": str(bags), "training.labels_csv": str(labels), "training.folds": 3,
        "training.epochs": 30, "training.min_epochs": 10, "training.patience": 5, "training.lr": 1e-3,
        "training.val_fraction": 0.25, "training.bootstrap": 200, "training.threads": 1,
        "model.hidden_dim": 32, "model.attention_dim": 16, "model.name": "abmil",
    }
    overrides.update(extra)
    return Config().with_overrides(overrides)


FOLD_ARTIFACTS = {"checkpoint.pt", "config.yaml", "split.csv", "predictions.csv", "val_predictions.csv",
                  "roc.png", "confusion_matrix.png", "training_curves.png"}
PARENT_ARTIFACTS = {"config.yaml", "splits.csv", "split_counts.csv", "labels.csv", "predictions.csv", "summary.csv", "per_fold.csv",
                    "roc_pooled.png", "confusion_pooled.png"}


def _check_logged_runs(client: Any, experiment_name: str, parent_id: str, n_folds: int, test_ids: set[str]) -> None:
    """Read a training run back through the MLflow client and check what it must hold."""
    exp = client.get_experiment_by_name(experiment_name)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], "")
    parent = client.get_run(parent_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == n_folds
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    params = parent.data.params
    assert params["model.name"] == "abmil" and params["training.folds"] == "3" and params["training.lr"] == "0.001"
    assert len(params) > 100  # the whole flattened config
    tags = parent.data.tags
    for key in ("wsi_mil.encoder", "wsi_mil.tiling", "wsi_mil.data_fingerprint", "wsi_mil.code_version",
                "wsi_mil.model"):
        assert tags.get(key), key
    assert tags["wsi_mil.encoder"] == "synthetic"
    for key in ("test/auc_mean", "test/auc_std", "test/accuracy_mean", "test/f1_mean", "test/balanced_accuracy_std",
                "fit/val_auc_mean"):
        assert key in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent_id)} >= PARENT_ARTIFACTS
    seen_test: set[str] = set()
    for child in children:
        m = child.data.metrics
        for key in ("test/auc", "test/auc_ci_low", "test/auc_ci_high", "test/accuracy", "test/f1",
                    "test/balanced_accuracy", "fit/threshold", "fit/best_epoch", "fit/val_auc"):
            assert key in m, key
            assert [h.step for h in client.get_metric_history(child.info.run_id, key)] == [0], key  # a bar, not a dot
        assert m["test/auc_ci_low"] <= m["test/auc"] <= m["test/auc_ci_high"]
        history = client.get_metric_history(child.info.run_id, "val/auc")
        n_epochs = int(m["fit/epochs_run"])
        assert sorted(h.step for h in history) == list(range(n_epochs))
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == n_epochs
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= FOLD_ARTIFACTS
        assert child.data.params["fold"] == child.data.tags["wsi_mil.fold"]
        local = client.download_artifacts(child.info.run_id, "split.csv")
        split = pd.read_csv(local, dtype={"slide_id": str})
        seen_test |= set(split.loc[split.role == "test", "slide_id"])
    assert seen_test == test_ids


def test_train_and_evaluate_embedded_sqlite(tmp_path, capsys):
    bags, labels = write_cohort(tmp_path / "data", shift=5.0)
    out = tmp_path / "out"
    cfg = _cfg(bags, labels)
    result = train_cohort(out, cfg)
    assert (out / "mlflow.db").is_file() and (out / "mlartifacts").is_dir()
    assert len(result.folds) == 3
    # the model learns the easy synthetic bags
    assert result.summary.loc["auc", "mean"] >= 0.9
    assert result.summary.loc["accuracy", "mean"] >= 0.75
    assert any(f.epochs_run < 30 for f in result.folds)  # early stopping on the validation plateau
    preds = result.predictions
    assert list(preds.columns[:7]) == ["slide_id", "patient_id", "seed", "fold", "split", "label", "label_name"]
    assert {"prob_0", "prob_1", "pred", "threshold"} <= set(preds.columns)
    assert sorted(preds.slide_id) == sorted(f"slide_{i:03d}" for i in range(24))

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    _check_logged_runs(client, "data_labels", result.parent_run_id, 3, set(preds.slide_id))
    art_root = Path(client.get_experiment_by_name("data_labels").artifact_location.replace("file://", ""))
    assert out / "mlartifacts" in art_root.parents

    # evaluate re-scores the saved checkpoints on the recorded test folds: same metrics
    ev = evaluate_run(result.parent_run_id, out, Config())
    assert ev.matches_training
    for r in result.folds:
        row = ev.per_fold[(ev.per_fold.seed == r.seed) & (ev.per_fold.fold == r.fold)].iloc[0]
        for k, v in r.test_metrics.items():
            assert row[f"test_{k}"] == pytest.approx(v, abs=1e-9), k
    pd.testing.assert_frame_equal(
        ev.predictions.sort_values("slide_id").reset_index(drop=True)[["slide_id", "prob_1", "pred"]],
        preds.sort_values("slide_id").reset_index(drop=True)[["slide_id", "prob_1", "pred"]], atol=1e-6)
    assert "evaluate/test_auc_mean" in client.get_run(result.parent_run_id).data.metrics

    # the CLI prints the same table
    code = cli.main(["-q", "evaluate", "--run", result.parent_run_id, "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "matches the metrics logged at training time" in text

    # a fold run rebuilds into a predicting method
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    folds = tracker.fold_runs(result.parent_run_id)
    assert [(f.seed, f.fold) for f in folds] == [(0, 0), (0, 1), (0, 2)]
    loaded = load_fold_method(tracker, folds[0].run_id)
    assert loaded.classes == ["0", "1"] and loaded.threshold == pytest.approx(result.folds[0].threshold)
    assert len(tracker.find_runs("data_labels")) == 1


def test_cli_train_and_bad_labels(tmp_path, capsys):
    bags, labels = write_cohort(tmp_path / "data", n_slides=12, shift=5.0)
    out = tmp_path / "out"
    args = ["-q", "train", str(out), "--labels", str(labels), "--model", "mean", "--folds", "2", "--epochs", "3",
            "--set", f"training.features_dir={bags}", "--set", "training.bootstrap=0",
            "--set", "tracking.experiment=cli-test", "--set", "model.hidden_dim=16"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert re.search(r"MLflow parent run: [0-9a-f]{32}", text) and "auc" in text
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label\nslide_000,0\nslide_000,1\nslide_999,1\n")
    args[4] = str(bad)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "duplicate slide_id(s): slide_000" in err and str(bad) in err
    bad.write_text("slide_id,label\n" + "".join(f"slide_{i:03d},{i % 2}\n" for i in range(11)) + "slide_999,1\n")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "have no bag (slide_999)" in err and "have no label (slide_011)" in err


def test_cli_train_reuses_a_finished_run_unless_forced(tmp_path, capsys):
    bags, labels = write_cohort(tmp_path / "data", n_slides=12, shift=5.0)
    out = tmp_path / "out"
    args = ["-q", "train", str(out), "--labels", str(labels), "--model", "mean", "--folds", "2", "--epochs", "2",
            "--set", f"training.features_dir={bags}", "--set", "training.bootstrap=0", "--set", "model.hidden_dim=16"]
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    run_id = re.search(r"MLflow parent run: ([0-9a-f]{32})", first).group(1)
    assert cli.main(args) == 0
    again = capsys.readouterr().out
    assert f"reusing finished MLflow run {run_id}" in again and f"MLflow parent run: {run_id}" in again
    assert again.split("\n", 1)[1] == first  # the same per-fold table and summary, read back from MLflow
    assert len(tracker.find_runs("data_labels", "tags.`wsi_mil.role` = 'cv'")) == 1
    assert cli.main([*args, "--force"]) == 0
    assert "reusing" not in capsys.readouterr().out
    assert len(tracker.find_runs("data_labels", "tags.`wsi_mil.role` = 'cv'")) == 2
    labels.write_text(labels.read_text().replace("slide_000,p000,0", "slide_000,p000,1"))  # relabelled: train again
    assert cli.main(args) == 0
    assert "reusing" not in capsys.readouterr().out


def test_tumour_and_normal_slide_per_patient_trains_5_folds(tmp_path):
    # TCGA-shaped: each of 16 patients has a normal (-11) and a tumour (-01) slide
    bags, labels = write_cohort(tmp_path / "data", n_slides=32, dim=16, n_min=8, n_max=16, shift=5.0,
                                slides_per_patient=2, label_names=["normal", "tumor"])
    out = tmp_path / "out"
    cfg = _cfg(bags, labels, **{"training.folds": 5, "training.epochs": 2, "training.min_epochs": 0,
                                "training.bootstrap": 50, "model.name": "mean", "model.hidden_dim": 16,
                                "tracking.log_checkpoints": False})
    result = train_cohort(out, cfg)
    assert len(result.folds) == 5 and result.classes == ["normal", "tumor"]
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    splits = load_run_splits(tracker, result.parent_run_id)
    assert (splits.groupby(["seed", "fold", "patient_id"])["role"].nunique() == 1).all()  # no patient crosses roles
    counts = pd.read_csv(io.StringIO(tracker.read_text(result.parent_run_id, "split_counts.csv")))
    assert list(counts["fold"]) == [0, 1, 2, 3, 4]
    for name in ("normal", "tumor"):
        assert ((counts[f"test_{name}"] - 16 / 5).abs() < 1).all()  # within one slide of ideal
        assert (counts[f"val_{name}"] >= 1).all()
    for fold in result.folds:
        assert fold.test_metrics["auc_ci_low"] <= fold.test_metrics["auc"] <= fold.test_metrics["auc_ci_high"]


def test_three_class_cohort_trains_with_macro_metrics(tmp_path):
    from sklearn.metrics import f1_score

    # every patient holds one slide of each of three classes
    bags, labels = write_cohort(tmp_path / "data", n_slides=27, dim=16, n_min=8, n_max=16, n_classes=3, shift=5.0,
                                slides_per_patient=3, label_names=["LUAD", "LUSC", "normal"])
    out = tmp_path / "out"
    cfg = _cfg(bags, labels, **{"training.folds": 3, "training.epochs": 3, "training.min_epochs": 0,
                                "training.bootstrap": 20, "model.name": "abmil", "model.hidden_dim": 16,
                                "tracking.log_checkpoints": False})
    result = train_cohort(out, cfg)
    assert result.classes == ["LUAD", "LUSC", "normal"] and len(result.folds) == 3
    preds = result.predictions
    assert {"prob_LUAD", "prob_LUSC", "prob_normal"} <= set(preds.columns) and preds["threshold"].isna().all()
    for fold in result.folds:
        part = preds[preds.fold == fold.fold]
        assert sorted(part["label"].value_counts()) == [3, 3, 3]
        assert fold.test_metrics["f1"] == pytest.approx(f1_score(part["label"], part["pred"], average="macro"))


class BaselineUser(BagMethod):
    """A method that gets its starting model from the trainer's baseline hooks (as MHIM does)."""

    def __init__(self, cfg: Config, ctx: FoldContext) -> None:
        super().__init__(build_model("mean", ctx.in_dim, ctx.n_classes, cfg.model), cfg, ctx, "mean")
        self.source = ""

    def setup(self, fold: FoldContext) -> None:
        super().setup(fold)
        assert fold.extras.config.model.hidden_dim == 16
        assert set(fold.extras.bag_paths) == set(fold.train.slide_ids) | set(fold.val.slide_ids)
        if fold.extras.load_baseline is not None:
            self.model = fold.extras.load_baseline(fold.fold, fold.seed)
            self.source = "loaded"
        else:
            self.model = fold.extras.train_baseline("mean")
            self.source = "trained"
        fold.extras.log_metrics({"baseline_source_" + self.source: 1.0}, 0)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)


def test_baseline_hooks_train_and_reload(tmp_path):
    bags, labels = write_cohort(tmp_path / "data", n_slides=12, shift=5.0)
    out = tmp_path / "out"
    cfg = _cfg(bags, labels, **{"training.folds": 2, "training.epochs": 4, "training.min_epochs": 0,
                                "model.hidden_dim": 16, "training.bootstrap": 0})
    first = train_cohort(out, cfg, method_factory=BaselineUser)
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    fold_runs = tracker.fold_runs(first.parent_run_id)
    run0 = tracker.get_run(fold_runs[0].run_id)
    assert "baseline/fit/best_epoch" in run0.metrics and "baseline_source_trained" in run0.metrics
    assert [s for s, _ in tracker.metric_history(run0.run_id, "baseline/val/auc")] == [0, 1, 2, 3]
    assert "baseline/checkpoint.pt" in tracker.list_artifacts(run0.run_id)
    base = load_checkpoint(tracker, run0.run_id, "baseline/checkpoint.pt")
    assert base["method"] == "bag" and base["model_name"] == "mean"

    second_cfg = cfg.with_overrides({"model.mhim.baseline_run": first.parent_run_id, "training.epochs": 1})
    captured: list[BaselineUser] = []

    def factory(c: Config, ctx: FoldContext) -> BaselineUser:
        captured.append(BaselineUser(c, ctx))
        return captured[-1]

    train_cohort(out, second_cfg, method_factory=factory)
    assert all(m.source == "loaded" for m in captured)

    # a baseline run with different folds is refused (its teacher could have seen the test fold)
    other = cfg.with_overrides({"model.mhim.baseline_run": first.parent_run_id, "training.seeds": [5]})
    with pytest.raises(WsiMilError, match="differs from this run's"):
        train_cohort(out, other, method_factory=BaselineUser)


# ------------------------------------------------------------------------------------ MLflow server
@pytest.fixture
def mlflow_server(tmp_path):
    with servers.mlflow_server(tmp_path / "mlflow") as url:
        yield url


@pytest.mark.slow
def test_train_and_evaluate_against_mlflow_server(tmp_path, mlflow_server):
    bags, labels = write_cohort(tmp_path / "data", shift=5.0)
    out = tmp_path / "out"
    cfg = _cfg(bags, labels, **{"tracking.uri": mlflow_server, "tracking.experiment": "c16-like"})
    result = train_cohort(out, cfg)
    assert not (out / "mlflow.db").exists()  # everything went to the server
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    _check_logged_runs(client, "c16-like", result.parent_run_id, 3, set(result.predictions.slide_id))
    assert result.summary.loc["auc", "mean"] >= 0.9
    ev = evaluate_run(result.parent_run_id, out, Config().with_overrides({"tracking.uri": mlflow_server}))
    assert ev.matches_training
    np.testing.assert_allclose(ev.per_fold["test_auc"], result.per_fold["test_auc"])


@pytest.mark.parametrize("name", ["camelyon16_abmil", "camelyon16_transmil", "tcga_nsclc_abmil", "tcga_nsclc_transmil"])
def test_presets_hold_published_baseline_hyperparameters(name):
    from wsi_mil.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml")
    t = cfg.training
    assert (t.optimizer, t.lr, t.weight_decay, t.scheduler, t.epochs) == ("adam", 2e-4, 1e-5, "cosine", 200)
    assert cfg.features.encoder == "resnet50_trunc" and cfg.tiling.target_mpp == 0.5 and cfg.tiling.patch_size == 256
    assert cfg.model.name == name.rsplit("_", 1)[1]
    assert t.classes == (["normal", "tumor"] if name.startswith("camelyon16") else ["LUAD", "LUSC"])
