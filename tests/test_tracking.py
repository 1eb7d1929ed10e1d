"""The MLflow wrapper on a real embedded SQLite store."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest
import torch

from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.checkpoints import load_checkpoint, load_run_splits, log_checkpoint
from wsi_mil.tracking import (
    Tracker,
    default_uri,
    experiment_name,
    open_tracker,
    quiet_mlflow,
    run_guard,
)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    out = tmp_path_factory.mktemp("track")
    return open_tracker(out, Config()), out


def test_embedded_store_lives_in_out(tracker):
    tr, out = tracker
    assert tr.uri == f"sqlite:///{(out / 'mlflow.db').resolve()}"
    exp = tr.experiment("cohort A/1")
    assert tr.experiment("cohort A/1") == exp  # get, not create twice
    location = tr.client.get_experiment(exp).artifact_location
    assert location.startswith("file://") and str(out / "mlartifacts" / "cohort_A_1") in location
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and os.environ["DO_NOT_TRACK"] == "true"


def test_params_batched_and_truncated(tracker):
    tr, _ = tracker
    exp = tr.experiment("params")
    run = tr.start_run(exp, "p")
    params = {f"k{i}": i for i in range(250)}
    params["long"] = "x" * 7000
    params["list"] = [".svs", ".tif"]
    params["none"] = None
    tr.log_params(run, params)
    got = tr.get_run(run).params
    assert len(got) == 253 and got["k249"] == "249"
    assert len(got["long"]) == 6000
    assert got["list"] == '[".svs", ".tif"]' and got["none"] == "null"


def test_metrics_history_and_nan_skipped(tracker):
    tr, _ = tracker
    run = tr.start_run(tr.experiment("metrics"), "m")
    for step in range(3):
        tr.log_metrics(run, {"val_auc": 0.5 + step / 10, "bad": float("nan"), "inf": float("inf")}, step)
    assert tr.metric_history(run, "val_auc") == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert "bad" not in tr.get_run(run).metrics and "inf" not in tr.get_run(run).metrics


def test_checkpoint_roundtrip_weights_only(tracker, tmp_path):
    tr, out = tracker
    run = tr.start_run(tr.experiment("ckpt"), "c")
    state = collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3))
    ckpt = {"format": "wsi-mil-checkpoint", "state": {"model": state, "model_name": "abmil"}, "threshold": None,
            "classes": ["a", "b"]}
    log_checkpoint(tr, run, ckpt)
    back = load_checkpoint(tr, run)
    assert torch.equal(back["state"]["model"]["w"], state["w"]) and back["classes"] == ["a", "b"]
    assert back["threshold"] is None
    # anything beyond tensors and plain values is refused (no pickle execution)
    log_checkpoint(tr, run, {"obj": Path("/etc")}, "unsafe/checkpoint.pt")
    with pytest.raises(WsiMilError, match="cannot be loaded as plain weights"):
        load_checkpoint(tr, run, "unsafe/checkpoint.pt")
    log_checkpoint(tr, run, {"format": "someone-else"}, "other/checkpoint.pt")
    with pytest.raises(WsiMilError, match="is not a wsi-mil checkpoint"):
        load_checkpoint(tr, run, "other/checkpoint.pt")
    with pytest.raises(WsiMilError, match="has no artifact 'missing.pt'"):
        load_checkpoint(tr, run, "missing.pt")


def test_artifacts_and_config_roundtrip(tracker, tmp_path):
    tr, out = tracker
    run = tr.start_run(tr.experiment("art"), "a")
    cfg = Config().with_overrides({"model.name": "transmil", "training.seeds": [1, 2]})
    from wsi_mil.config import dump_config

    tr.log_text(run, dump_config(cfg), "config.yaml")
    assert tr.load_config(run) == cfg
    heat = tmp_path / "maps"
    heat.mkdir()
    (heat / "s1.png").write_bytes(b"png")
    (heat / "s1.geojson").write_text("{}")
    tr.log_artifact(run, heat, "heatmaps")
    tr.log_artifact(run, heat / "s1.png")
    assert sorted(tr.list_artifacts(run)) == ["config.yaml", "heatmaps/s1.geojson", "heatmaps/s1.png", "s1.png"]


def test_find_runs_fold_runs_and_guard(tracker):
    tr, _ = tracker
    exp_name = "find"
    exp = tr.experiment(exp_name)
    parent = tr.start_run(exp, "cv", tags={"wsi_mil.role": "cv"})
    tr.log_text(parent, "seed,fold,slide_id,patient_id,y,role\n0,0,a,a,0,test\n0,0,b,b,1,train\n"
                "0,1,a,a,0,train\n0,1,b,b,1,test\n", "splits.csv")
    kids = [tr.start_run(exp, f"f{f}", parent_id=parent,
                         tags={"wsi_mil.role": "fold", "wsi_mil.fold": f, "wsi_mil.seed": 0}) for f in (1, 0)]
    folds = tr.fold_runs(parent)
    assert [(f.fold, f.seed, f.run_id) for f in folds] == [(0, 0, kids[1]), (1, 0, kids[0])]
    assert [f.run_id for f in tr.fold_runs(kids[0])] == [kids[0]]  # a fold run id works too
    assert tr.parent_of(kids[0]) == parent and tr.parent_of(parent) == parent
    assert load_run_splits(tr, parent)["slide_id"].tolist() == ["a", "b", "a", "b"]
    assert [r.run_id for r in tr.find_runs(exp_name)] == [parent]
    assert len(tr.find_runs(exp_name, role=None)) == 3
    assert tr.child_runs(parent)[0].parent_id == parent
    with pytest.raises(ValueError), run_guard(tr, kids[0]):
        raise ValueError("boom")
    assert tr.get_run(kids[0]).status == "FAILED"
    with run_guard(tr, parent):
        pass
    assert tr.get_run(parent).status == "FINISHED"
    with pytest.raises(WsiMilError, match="run 0+ not found in sqlite"):
        tr.get_run("0" * 32)


def test_unreachable_server_is_not_reported_as_a_missing_run(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tr = Tracker("http://127.0.0.1:9")  # the discard port: nothing listens
    for call in (lambda: tr.get_run("0" * 32), lambda: tr.find_runs("e"), lambda: tr.experiment("e"),
                 lambda: tr.list_artifacts("0" * 32)):
        with pytest.raises(WsiMilError, match="MLflow at http://127.0.0.1:9 failed while .*check that the tracking "
                                              "server is running") as caught:
            call()
        assert "not found" not in str(caught.value)


def test_names_and_uris(tmp_path):
    cfg = Config()
    assert experiment_name(cfg) == "wsi-mil"
    labels = tmp_path / "camelyon16" / "labels.csv"
    labels.parent.mkdir()
    labels.write_text("slide_id,label\n")
    assert experiment_name(cfg.with_overrides({"training.labels_csv": str(labels)})) == "camelyon16_labels"
    other = tmp_path / "tcga_nsclc.csv"
    other.write_text("x")
    assert experiment_name(cfg.with_overrides({"training.labels_csv": str(other)})) == "tcga_nsclc"
    assert experiment_name(cfg.with_overrides({"tracking.experiment": "E"})) == "E"
    assert default_uri(tmp_path, cfg).startswith("sqlite:///")
    assert default_uri(tmp_path, cfg.with_overrides({"tracking.uri": "http://h:5000"})) == "http://h:5000"
    assert Tracker("http://127.0.0.1:9").artifact_root is None


def test_only_tracking_imports_mlflow():
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for folder in ("wsi_mil", "workflows"):
        for path in (root / folder).rglob("*.py"):
            if path.name == "tracking.py" and path.parent.name == "wsi_mil":
                continue
            if re.search(r"^\s*(import mlflow|from mlflow)", path.read_text(), re.M):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
    quiet_mlflow()
