"""Training on a real Dask cluster (`dask scheduler` + `dask worker` processes) with a real `mlflow server`."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from helpers.milcore import write_cohort
from helpers.servers import dask_processes, mlflow_server, rest
from wsi_mil.workflows.cohort import train_models

from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.tracking import Tracker

FOLD_METRICS = ("test/auc", "test/accuracy", "test/balanced_accuracy", "test/f1", "fit/threshold", "fit/best_epoch")


def _cfg(bags: Path, labels: Path) -> Config:
    return Config().with_overrides({
        "training.features_dir": str(bags), "training.labels_csv": str(labels), "training.folds": 2,
        "training.epochs": 3, "training.min_epochs": 0, "training.patience": 3, "training.lr": 1e-3,
        "training.val_fraction": 0.25, "training.bootstrap": 20, "training.threads": 1,
        "model.hidden_dim": 16, "model.attention_dim": 8, "model.mhim.student": "abmil",
        "run.models": ["abmil", "mhim"], "tracking.experiment": "cluster", "compute.connect_timeout": 5,
    })


def _fold_runs(url: str) -> list[dict]:
    """Every live fold run of the experiment as the MLflow server's REST API returns it."""
    experiment = rest(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=cluster")["experiment"]
    found = rest(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`wsi_mil.role` = 'fold'",
        "max_results": 1000})
    return found.get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _by_fold(tracker: Tracker, outcomes) -> dict[tuple[str, int, int], dict[str, float]]:
    """(model, seed, fold) -> the fold run's final metrics, read from the store."""
    table = {}
    for outcome in outcomes:
        for fold in tracker.fold_runs(outcome.run_id):
            metrics = tracker.get_run(fold.run_id).metrics
            table[(outcome.name, fold.seed, fold.fold)] = {k: metrics.get(k) for k in FOLD_METRICS}
    return table


def _gpu_workers(address: str) -> set[str]:
    from distributed import Client

    with Client(address, timeout=30) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    return {a for a, w in workers.items() if (w.get("resources") or {}).get("GPU")}


@pytest.mark.slow
def test_cluster_training_matches_local_tags_its_worker_and_resumes_after_a_killed_worker(tmp_path):
    bags, labels = write_cohort(tmp_path / "data", n_slides=12, dim=16, n_min=8, n_max=24, shift=5.0)
    cfg = _cfg(bags, labels)
    local = train_models(tmp_path / "local", cfg, heatmaps=False)  # the local default: no cluster
    expected = _by_fold(Tracker(f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}"), local)
    assert len(expected) == 4  # 2 models x 2 folds

    out = tmp_path / "out"
    with mlflow_server(tmp_path / "mlflow") as url, dask_processes(["GPU=1", None], log_dir=tmp_path) as cluster:
        first_gpu = _gpu_workers(cluster.address)
        assert len(first_gpu) == 1
        ccfg = cfg.with_overrides({"compute.scheduler": cluster.address, "tracking.uri": url})

        # first attempt: the GPU worker dies as soon as one fold run has finished
        stop = threading.Event()

        def kill_after_first_fold() -> None:
            while not stop.wait(0.1):
                if any(r["info"]["status"] == "FINISHED" for r in _fold_runs_or_none(url)):
                    cluster.kill_worker(cluster.workers[0])
                    return

        killer = threading.Thread(target=kill_after_first_fold)
        killer.start()
        with pytest.raises(WsiMilError, match="no Dask worker with a GPU resource is left") as failed:
            try:
                train_models(out, ccfg, heatmaps=False)
            finally:
                stop.set()
                killer.join()
        assert "the same command again trains only the failed ones" in str(failed.value)
        kept = {r["info"]["run_id"] for r in _fold_runs(url) if r["info"]["status"] == "FINISHED"}
        assert 1 <= len(kept) < 4
        assert f"{4 - len(kept)} fold training(s) failed" in str(failed.value)  # the finished ones are not listed

        # a new GPU worker joins; the same call again reuses the finished folds and trains the rest
        cluster.add_worker("GPU=1")
        cluster.wait_for_workers(2)
        second_gpu = _gpu_workers(cluster.address)
        outcomes = train_models(out, ccfg, heatmaps=False)
        tracker = Tracker(url)
        got = _by_fold(tracker, outcomes)
        runs = _fold_runs(url)
        parents = {o.run_id: (tracker.get_run(o.run_id).status, tracker.run_model_id(o.run_id)) for o in outcomes}

    assert not (out / "mlflow.db").exists()  # everything went to the server
    # the same metrics as the local run, fold by fold
    assert set(got) == set(expected)
    for key, metrics in expected.items():
        for name, value in metrics.items():
            assert got[key][name] == pytest.approx(value, abs=1e-6), (key, name)
    for outcome, reference in zip(outcomes, local, strict=True):
        assert outcome.summary["auc"][0] == pytest.approx(reference.summary["auc"][0], abs=1e-6)
        status, model_id = parents[outcome.run_id]
        assert status == "FINISHED" and model_id is not None  # summarised once all its folds were in
    # every fold run names the GPU worker that trained it; the folds of the first attempt were kept
    live = {r["info"]["run_id"] for r in runs}
    assert kept <= live and len(live) == 4
    for run in runs:
        tags = _tags(run)
        assert tags["wsi_mil.host"] == socket.gethostname()
        trained_by = first_gpu if run["info"]["run_id"] in kept else second_gpu - first_gpu
        assert tags["wsi_mil.worker"] in trained_by
    # each MHIM fold started after its own fold's baseline had finished
    by_pair = {(_tags(r)["wsi_mil.model"].split("(")[0].lower(), _tags(r)["wsi_mil.seed"], _tags(r)["wsi_mil.fold"]): r
               for r in runs}
    for (model, seed, fold), run in by_pair.items():
        if model == "mhim":
            baseline = by_pair[("abmil", seed, fold)]
            assert int(run["info"]["start_time"]) >= int(baseline["info"]["end_time"])
            assert _metrics(run)["fit/best_epoch"] >= 0


def _fold_runs_or_none(url: str) -> list[dict]:
    try:
        return _fold_runs(url)
    except Exception:  # the experiment does not exist yet
        return []


def test_train_with_an_unreachable_scheduler_is_one_error_line(tmp_path, capsys):
    from helpers.servers import free_port

    from wsi_mil import cli

    bags, labels = write_cohort(tmp_path / "data", n_slides=8, dim=8)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    code = cli.main(["-q", "train", str(tmp_path / "out"), "--labels", str(labels), "--model", "abmil",
                     "--scheduler", address, "--set", f"training.features_dir={bags}",
                     "--set", "compute.connect_timeout=1"])
    captured = capsys.readouterr()
    assert code == 2 and "MLflow parent run" not in captured.out
    assert f"cannot reach the Dask scheduler at {address}" in captured.err
