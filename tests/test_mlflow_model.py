"""MLflow as model store and review desk: the logged fold ensemble, the registry, descriptions, names.

Everything runs against a real MLflow store (SQLite here, a real `mlflow server` in the slow test);
the logged model is loaded by a fresh Python process with `mlflow.pyfunc.load_model`.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import servers
from helpers.milcore import write_cohort
from wsi_mil.workflows.heatmap import heatmap_artifact_name

from wsi_mil import cli
from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.cv import TrainResult, train_cohort
from wsi_mil.mil.ensemble import FoldEnsemble, load_ensemble
from wsi_mil.mil.fit import epoch_metric_name
from wsi_mil.tracking import DESCRIPTION_TAG, RunRecord, Tracker

NAME = "wsimil-test"


# ------------------------------------------------------------------------------------------ names
def test_epoch_metrics_are_named_by_split_so_the_ui_groups_the_curves():
    assert [epoch_metric_name(k) for k in ("loss", "lr", "train_ce", "val_auc_max_pool", "mask_ratio_high", "a/b")] == \
        ["train/loss", "train/lr", "train/ce", "val/auc_max_pool", "train/mask_ratio_high", "a/b"]


def test_heatmap_artifact_names_carry_label_and_probability():
    assert heatmap_artifact_name("s_01", "tumor", 0.9349, Path("/x/s_01.png")) == "tumor/s_01__p0.93.png"
    assert heatmap_artifact_name("s_01", "tumor", 1.0, Path("/x/s_01_topk.png")) == "tumor/s_01__p1.00_topk.png"
    assert heatmap_artifact_name("s_01", "LUAD/x y", 0.05, Path("/x/s_01.geojson")) == "LUAD_x_y/s_01__p0.05.geojson"


def test_run_record_reads_metrics_logged_before_the_slash_names():
    record = RunRecord("r", "n", "FINISHED", "0", {}, {"test_auc_mean": 0.8, "test/f1_mean": 0.7}, {})
    assert record.metric("test/auc_mean") == 0.8 and record.metric("test/f1_mean") == 0.7
    assert np.isnan(record.metric("test/accuracy_mean"))


# ------------------------------------------------------------------------------- a registry store
def _labels_with_split(labels: Path, val: list[int], test: list[int], dst: Path) -> Path:
    frame = pd.read_csv(labels)
    frame["split"] = "train"
    frame.loc[val, "split"] = "val"
    frame.loc[test, "split"] = "test"
    frame.to_csv(dst, index=False)
    return dst


def _cfg(bags: Path, labels: Path, **extra: Any) -> Config:
    overrides = {
        "training.features_dir": str(bags), "training.labels_csv": str(labels), "training.fixed_splits": True,
        "training.seeds": [0, 1], "training.epochs": 8, "training.min_epochs": 2, "training.patience": 3,
        "training.lr": 2e-3, "training.bootstrap": 20, "training.threads": 1, "model.name": "abmil",
        "model.hidden_dim": 16, "model.attention_dim": 8, "tracking.experiment": "registry",
        "tracking.register_as": NAME,
    }
    overrides.update(extra)
    return Config().with_overrides(overrides)


class Store:
    """Two trainings on one SQLite store: both splits fixed, the second with a one-class validation split."""

    def __init__(self, root: Path) -> None:
        self.bags, labels = write_cohort(root / "data", n_slides=16, shift=5.0)
        self.out = root / "out"
        self.test_ids = [f"slide_{i:03d}" for i in range(4)]
        self.first_labels = _labels_with_split(labels, [4, 5, 6, 7], [0, 1, 2, 3], root / "data" / "labels.csv")
        self.first: TrainResult = train_cohort(self.out, _cfg(self.bags, self.first_labels))
        one_class = _labels_with_split(labels, [4, 6], [0, 1, 2, 3], root / "data" / "one_class_val.csv")
        self.second: TrainResult = train_cohort(self.out, _cfg(self.bags, one_class))
        self.uri = f"sqlite:///{self.out / 'mlflow.db'}"
        self.tracker = Tracker(self.uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("registry"))


LOAD_SCRIPT = """
import json, sys
import h5py, mlflow, numpy as np
job = json.loads(sys.argv[1])
out = {}
for uri in job["uris"]:
    model = mlflow.pyfunc.load_model(uri)
    rows = {}
    for sid, path in job["bags"].items():
        with h5py.File(path) as f:
            x = f["features"][:].astype(np.float32)
        rows[sid] = {"probs": model.predict(x).tolist(), "label": model.predict(x, params={"output": "label"}).tolist(),
                     "scores": len(model.predict(x, params={"output": "instance_scores"})),
                     "n": len(x), "seed1": model.predict(x, params={"seed": 1, "fold": 0}).tolist()}
    out[uri] = {"rows": rows, "metadata": model.metadata.metadata, "run_id": model.metadata.run_id}
print("RESULT " + json.dumps(out))
"""


def load_in_fresh_python(tracking_uri: str, uris: list[str], bags: dict[str, Path], cwd: Path) -> dict[str, Any]:
    """Load MLflow models with mlflow.pyfunc in a new Python process (the installed wsi_mil only) and predict."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_ALLOW_PICKLE")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH="")
    job = json.dumps({"uris": uris, "bags": {k: str(v) for k, v in bags.items()}})
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, job], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_parent_run_logs_a_model_and_registering_makes_version_1_then_2(store):
    tracker = store.tracker
    first, second = store.first.parent_run_id, store.second.parent_run_id
    assert store.first.model_id and tracker.run_model_id(first) == store.first.model_id
    assert tracker.client.get_run(first).outputs.model_outputs[0].model_id == store.first.model_id
    assert (store.first.model_version, store.second.model_version) == (1, 2)
    versions = tracker.model_versions(NAME)
    assert [(v.version, v.run_id) for v in versions] == [(1, first), (2, second)]
    run = tracker.get_run(first)
    assert versions[0].tags == {
        "model": "abmil", "encoder": "synthetic", "tiling_key": run.tags["wsi_mil.tiling"], "classes": "0,1",
        "folds": "1", "seeds": "0,1", "test_auc_mean": f"{run.metrics['test/auc_mean']:.4f}", "run_id": first}
    version = tracker.client.get_model_version(NAME, "1")
    assert version.description == run.tags[DESCRIPTION_TAG]
    # the model's page lists the parent's test metrics
    model = tracker.client.get_logged_model(store.first.model_id)
    assert {m.key for m in model.metrics} >= {"test/auc_mean", "test/f1_std"}


def test_fresh_python_loads_the_registered_model_and_reproduces_the_test_fold_probabilities(store, tmp_path):
    first = store.first.parent_run_id
    bags = {sid: store.bags / f"{sid}.h5" for sid in store.test_ids}
    got = load_in_fresh_python(store.uri, [f"models:/{NAME}/1", f"runs:/{first}/model"], bags, tmp_path)
    preds = store.first.predictions
    assert sorted(preds["slide_id"].unique()) == store.test_ids and sorted(preds["seed"].unique()) == [0, 1]
    mean = preds.groupby("slide_id")["prob_1"].mean()  # each test slide is scored by seed 0's and seed 1's model
    seed1 = preds[preds["seed"] == 1].set_index("slide_id")["prob_1"]
    meta = got[f"models:/{NAME}/1"]["metadata"]
    threshold = float(np.median(store.first.per_fold["threshold"]))
    assert meta["classes"] == ["0", "1"] and meta["threshold"] == pytest.approx(threshold)
    assert [(f["seed"], f["fold"]) for f in meta["folds"]] == [(0, 0), (1, 0)]
    assert meta["tiling_key"] == store.tracker.get_run(first).tags["wsi_mil.tiling"]
    for uri, answer in got.items():
        assert answer["run_id"] == first, uri
        for sid, row in answer["rows"].items():
            assert row["probs"][1] == pytest.approx(mean[sid], abs=1e-5), (uri, sid)
            assert sum(row["probs"]) == pytest.approx(1.0)
            assert row["seed1"][1] == pytest.approx(seed1[sid], abs=1e-5)  # one fold's model, as in training
            assert row["label"] == [str(int(mean[sid] >= threshold))]
            assert row["scores"] == row["n"]


def test_the_ensemble_in_process_equals_the_logged_one_and_takes_float32_bags_only(store):
    ensemble, run_id = load_ensemble(store.tracker, f"models:/{NAME}/2")
    assert run_id == store.second.parent_run_id and isinstance(ensemble, FoldEnsemble)
    from_run = FoldEnsemble.from_run(store.tracker, store.second.parent_run_id)  # from the fold runs' checkpoints
    x = np.random.default_rng(0).normal(size=(7, 32)).astype(np.float32)
    np.testing.assert_allclose(ensemble.predict(x).probs, from_run.predict(x).probs, atol=1e-7)
    with pytest.raises(WsiMilError, match=r"features must be \[N, 32\]"):
        ensemble.predict(x[:, :5])
    with pytest.raises(WsiMilError, match="output='odds'"):
        ensemble.predict_pyfunc(x, {"output": "odds"})
    with pytest.raises(WsiMilError, match="no fold model with seed=7"):
        ensemble.predict_pyfunc(x, {"seed": 7})


def test_unknown_models_are_one_sentence_errors(store):
    with pytest.raises(WsiMilError, match=f"MLflow model models:/{NAME}/9 not found in sqlite"):
        store.tracker.load_model(f"models:/{NAME}/9")
    fold_run = store.tracker.fold_runs(store.first.parent_run_id)[0].run_id
    with pytest.raises(WsiMilError, match=f"runs:/{fold_run}/model not found"):
        store.tracker.load_model(f"runs:/{fold_run}/model")


def test_runs_carry_descriptions_the_labels_dataset_and_a_predictions_table(store):
    tracker = store.tracker
    parent = tracker.get_run(store.first.parent_run_id)
    note = parent.tags[DESCRIPTION_TAG]
    assert "**abmil**, cross-validated on **16 slides of 16 patients**" in note and "1 fold(s) x 2 seed(s)" in note
    auc = store.first.summary.loc["auc"]
    assert f"| auc | {auc['mean']:.3f} | {auc['std']:.3f} | 2 |" in note
    assert f"`runs:/{parent.run_id}/model`" in note
    for fold in tracker.fold_runs(parent.run_id):
        text = tracker.get_run(fold.run_id).tags[DESCRIPTION_TAG]
        assert f"**seed{fold.seed}-fold0**" in text and "| train | 8 | 8 | 4 | 4 |" in text
        assert "| val | 4 | 4 | 2 | 2 |" in text and "| test | 4 | 4 | 2 | 2 |" in text and "Kept epoch" in text
    inputs = tracker.client.get_run(parent.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.tags[0].value) for d in inputs] == [("data/labels.csv", "training")]
    assert json.loads(inputs[0].dataset.profile)["num_rows"] == 16
    table = json.loads(tracker.read_text(parent.run_id, "predictions.json"))
    frame = pd.DataFrame(table["data"], columns=table["columns"])
    assert sorted(frame["slide_id"]) == sorted(store.first.predictions["slide_id"])


def test_a_one_class_validation_split_says_why_val_auc_is_missing(store):
    tracker = store.tracker
    for fold in tracker.fold_runs(store.second.parent_run_id):
        run = tracker.get_run(fold.run_id)
        assert "val/auc" not in run.metrics and "val/loss" in run.metrics
        why = "the validation split holds one class (0): val/auc is undefined"
        assert run.tags["wsi_mil.val_auc"].startswith(f"undefined: {why}")
        assert why in run.tags[DESCRIPTION_TAG] and "fell back to 0.5" in run.tags[DESCRIPTION_TAG]
    assert "seed1-fold0: the validation split holds one class" in \
        tracker.get_run(store.second.parent_run_id).tags[DESCRIPTION_TAG]


def test_cli_train_registers_a_run_once_and_a_forced_retrain_as_the_next_version(tmp_path, capsys):
    bags, labels = write_cohort(tmp_path / "data", n_slides=12, shift=5.0)
    out = tmp_path / "out"
    args = ["-q", "train", str(out), "--labels", str(labels), "--model", "mean", "--folds", "2", "--epochs", "2",
            "--set", f"training.features_dir={bags}", "--set", "training.bootstrap=0", "--set", "model.hidden_dim=16",
            "--set", "training.threads=1", "--set", "tracking.register_as=cli-model"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    run_id = re.search(r"MLflow parent run: ([0-9a-f]{32})", first).group(1)
    assert "registered model: models:/cli-model/1" in first and f"model: runs:/{run_id}/model" in first
    assert cli.main(args) == 0  # reused: the same run, no second version of it
    again = capsys.readouterr().out
    assert f"reusing finished MLflow run {run_id}" in again and "registered model: models:/cli-model/1" in again
    assert cli.main([*args, "--force"]) == 0
    assert "registered model: models:/cli-model/2" in capsys.readouterr().out
    assert [v.version for v in Tracker(f"sqlite:///{out / 'mlflow.db'}").model_versions("cli-model")] == [1, 2]


# ------------------------------------------------------------------------------------- MLflow server
@pytest.mark.slow
def test_registered_model_on_a_real_mlflow_server(tmp_path):
    bags, labels = write_cohort(tmp_path / "data", n_slides=16, shift=5.0)
    labels = _labels_with_split(labels, [4, 5, 6, 7], [0, 1, 2, 3], tmp_path / "data" / "labels.csv")
    with servers.mlflow_server(tmp_path / "mlflow") as url:
        cfg = _cfg(bags, labels, **{"tracking.uri": url, "training.epochs": 4})
        first = train_cohort(tmp_path / "out", cfg)
        second = train_cohort(tmp_path / "out", cfg)
        assert (first.model_version, second.model_version) == (1, 2)
        assert not (tmp_path / "out" / "mlflow.db").exists()
        versions = servers.rest(url, "/api/2.0/mlflow/model-versions/search?filter=" + f"name%3D%27{NAME}%27")
        assert sorted((v["version"], v["run_id"]) for v in versions["model_versions"]) == \
            [("1", first.parent_run_id), ("2", second.parent_run_id)]
        ids = ["slide_000", "slide_001"]
        got = load_in_fresh_python(url, [f"models:/{NAME}/2"], {s: bags / f"{s}.h5" for s in ids}, tmp_path)
        mean = second.predictions.groupby("slide_id")["prob_1"].mean()
        for sid in ids:
            assert got[f"models:/{NAME}/2"]["rows"][sid]["probs"][1] == pytest.approx(mean[sid], abs=1e-5)
        # the run's predictions table arrived through the server's artifact proxy
        table = json.loads(servers.rest(url, f"/get-artifact?path=predictions.json&run_uuid={second.parent_run_id}",
                                        raw=True))
        assert len(pd.DataFrame(table["data"], columns=table["columns"])) == len(second.predictions)
        assert pd.read_csv(io.BytesIO(servers.rest(url, f"/get-artifact?path=predictions.csv&run_uuid="
                                                        f"{second.parent_run_id}", raw=True))).shape[0] == 8
