"""End-to-end `wsi-mil run`, `heatmap`, `predict`: resumability, crash recovery, real servers."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.servers import dask_cluster, mlflow_server, rest
from sklearn.metrics import roc_auc_score

from wsi_mil import stores
from wsi_mil.annotations import load_instance_labels
from wsi_mil.cli import main
from wsi_mil.config import load_config
from wsi_mil.encoders import encoder_key
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.mil.checkpoints import load_run_splits
from wsi_mil.synth import generate_cohort
from wsi_mil.tracking import open_tracker

pytestmark = pytest.mark.slow

MODELS = "[abmil,mhim,ins]"


def fast_settings(truth_dir: Path, models: str = MODELS) -> list[str]:
    """A tiny encoder and short training so the whole workflow takes about a minute on 2 cores."""
    pairs = {
        "features.encoder": "tiny_cnn", "features.weights": "random", "features.num_workers": 0,
        "training.folds": 2, "training.epochs": 4, "training.min_epochs": 1, "training.bootstrap": 0,
        "training.annotations_dir": str(truth_dir), "model.ins.queue_size": 256, "run.models": models,
        "tracking.experiment": "e2e", "heatmap.top_k": 4,
    }
    out = []
    for key, value in pairs.items():
        out += ["--set", f"{key}={value}"]
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("cohort"), n_slides=8, seed=11, size=4096, tumour="large")


def run_args(cohort, out: Path, *extra: str, models: str = MODELS) -> list[str]:
    return ["run", str(cohort.slides_dir), "--labels", str(cohort.labels_csv), "--out", str(out),
            *fast_settings(cohort.truth_dir, models), *extra]


def outputs(out: Path, cohort) -> tuple[Path, Path]:
    cfg = load_config(None, [a for a in fast_settings(cohort.truth_dir) if a != "--set"])
    return Layout(out).tiles_dir(tiling_key(cfg)), Layout(out).features_dir(tiling_key(cfg), encoder_key(cfg.features))


def assert_same_stores(out_a: Path, out_b: Path, cohort) -> None:
    """Both output directories hold the same patch stores and (to float tolerance) the same bags."""
    (tiles_a, feats_a), (tiles_b, feats_b) = outputs(out_a, cohort), outputs(out_b, cohort)
    for a_dir, b_dir in ((tiles_a, tiles_b), (feats_a, feats_b)):
        assert sorted(p.name for p in a_dir.iterdir()) == sorted(p.name for p in b_dir.iterdir())
    assert len(list(tiles_a.glob("*.zarr"))) == len(cohort.slide_ids)
    for store in tiles_a.glob("*.zarr"):
        a, b = stores.open_patch_store(store), stores.open_patch_store(tiles_b / store.name)
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.patches[:], b.patches[:])
    for bag in feats_a.glob("*.h5"):
        np.testing.assert_allclose(stores.read_bag(bag).features, stores.read_bag(feats_b / bag.name).features,
                                   rtol=1e-5, atol=1e-6)


def heatmap_scores(tracker, run_id: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per slide, from the run's GeoJSON artifacts: patch scores, level-0 top-left corners, patch side."""
    out = {}
    for name in tracker.list_artifacts(run_id, "heatmaps"):
        if name.endswith(".geojson"):
            collection = json.loads(tracker.read_text(run_id, name))
            corners = [f["geometry"]["coordinates"][0][0] for f in collection["features"]]
            scores = [f["properties"]["score"] for f in collection["features"]]
            out[collection["properties"]["slide_id"]] = (np.asarray(scores), np.asarray(corners),
                                                          collection["properties"]["patch_size_level0"])
    return out


def oracle_instance_aucs(tracker, run_id: str, cohort) -> tuple[float, float]:
    """Pooled localisation AUC of the heatmaps, and the mean over folds of each test fold's pooled AUC,
    recomputed with scikit-learn from the logged heatmap scores and the cohort's tumour masks."""
    labels = pd.read_csv(cohort.labels_csv).set_index("slide_id")["label"]
    truth = {}
    scores = {}
    for sid, (s, corners, size0) in heatmap_scores(tracker, run_id).items():
        truth[sid] = load_instance_labels(cohort.truth_dir, sid, corners, size0, 0.5,
                                          normal_slide=labels[sid] == "normal")
        scores[sid] = s
    assert sorted(truth) == sorted(cohort.slide_ids)

    def pooled(ids) -> float:
        return roc_auc_score(np.concatenate([truth[s] for s in ids]), np.concatenate([scores[s] for s in ids]))

    splits = load_run_splits(tracker, run_id)
    tests = splits[splits["role"] == "test"].groupby(["seed", "fold"])["slide_id"].apply(list)
    return pooled(sorted(truth)), float(np.mean([pooled(ids) for ids in tests]))


def oracle_test_auc_mean(predictions: pd.DataFrame) -> float:
    """Mean over folds of scikit-learn's AUC of each test fold's logged predictions."""
    return float(np.mean([roc_auc_score(f["label"], f["prob_tumor"]) for _, f in predictions.groupby(["seed", "fold"])]))


def stage_mtimes(out: Path, cohort) -> dict[str, int]:
    tiles, features = outputs(out, cohort)
    paths = list(tiles.glob("*.zarr")) + list(features.glob("*.h5"))
    return {p.name: p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def finished(cohort, tmp_path_factory):
    """One uninterrupted run on the embedded defaults (SQLite MLflow, local Dask)."""
    out = tmp_path_factory.mktemp("run")
    assert main(run_args(cohort, out)) == 0
    return out


def test_run_produces_every_output(finished, cohort):
    summary = Layout(finished).summary_md.read_text()
    for model in ("abmil", "mhim(abmil)", "ins"):  # as `wsi-mil runs` names them
        assert f"| {model} |" in summary
    listed = [line.rsplit("`", 2)[1] for line in summary.splitlines() if line.startswith("- ") and "heatmaps" in line]
    assert len(listed) == 3 and all(any(Path(folder).glob("*.png")) for folder in listed)  # the folders `run` drew
    tracker = open_tracker(finished, load_config())
    runs = tracker.find_runs("e2e")
    assert sorted(r.tags["wsi_mil.model"].split("(")[0].lower() for r in runs) == ["abmil", "ins", "mhim"]
    labels = pd.read_csv(cohort.labels_csv).set_index("slide_id")["label"]
    for run in runs:
        assert "test/auc_mean" in run.metrics
        assert tracker.run_model_id(run.run_id) is not None  # the Models column of the runs table
        predictions = pd.read_csv(io.StringIO(tracker.read_text(run.run_id, "predictions.csv")))
        # every slide was a test slide once: one heatmap each, logged to the run as <label>/<slide>__p<prob>.png
        prob = predictions.set_index("slide_id")["prob_tumor"]
        maps = tracker.list_artifacts(run.run_id, "heatmaps")
        pngs = sorted(a for a in maps if a.endswith(".png") and not a.endswith("_topk.png"))
        assert pngs == sorted(f"heatmaps/{labels[s]}/{s}__p{prob[s]:.2f}.png" for s in cohort.slide_ids)
        assert sum(a.endswith(".geojson") for a in maps) == len(cohort.slide_ids)
        # ground truth exists: the logged localisation AUCs are those of the heatmap scores against the masks
        heatmap_auc, fold_mean = oracle_instance_aucs(tracker, run.run_id, cohort)
        assert run.metrics["heatmap/localisation_auc"] == pytest.approx(heatmap_auc, rel=1e-6)
        assert run.metrics["test/instance_auc_mean"] == pytest.approx(fold_mean, rel=1e-6)
        assert run.metrics["test/auc_mean"] == pytest.approx(oracle_test_auc_mean(predictions), rel=1e-6)
    summaries = tracker.find_runs("e2e", role="summary")
    assert len(summaries) == 1 and "summary.md" in tracker.list_artifacts(summaries[0].run_id)
    summary = summaries[0]
    assert summary.tags["mlflow.note.content"].startswith("# wsi-mil run summary")
    assert summary.metrics and all(k.startswith("workflow/") for k in summary.metrics)  # after the test/ section
    auc = {r.tags["wsi_mil.model"]: r.metrics["test/auc_mean"] for r in runs}
    assert summary.metrics["workflow/abmil_auc_mean"] == pytest.approx(auc["abmil"])


def test_normal_slides_ins_heatmaps_are_cool_on_the_absolute_scale(finished, cohort):
    tracker = open_tracker(finished, load_config())
    run = next(r for r in tracker.find_runs("e2e") if r.tags["wsi_mil.model"] == "ins")
    folder = Layout(finished).heatmaps_dir(run.run_id, "ins")
    assert folder == finished / "heatmaps" / "ins" / run.run_id[:8]
    labels = pd.read_csv(cohort.labels_csv).set_index("slide_id")["label"]
    means: dict[str, list[float]] = {"normal": [], "tumor": []}
    for sid in cohort.slide_ids:
        collection = json.loads((folder / f"{sid}.geojson").read_text())
        assert collection["properties"]["normalize"] == "absolute"
        shown = [f["properties"]["measurements"]["score_absolute"] for f in collection["features"]]
        np.testing.assert_allclose(shown, [f["properties"]["score"] for f in collection["features"]])
        means[labels[sid]].append(float(np.mean(shown)))
    assert max(means["normal"]) < 0.5  # cool: no per-slide stretch makes a normal slide's map hot
    assert np.mean(means["normal"]) < np.mean(means["tumor"])
    # the per-slide results beside it, as the store holds them
    table = pd.read_csv(Layout(finished).model_predictions_csv("ins"))
    assert set(table["run_id"]) == {run.run_id} and sorted(table["slide_id"]) == sorted(cohort.slide_ids)


def test_attention_map_of_a_slide_drawn_alone_matches_the_cohorts_scale(finished, capsys):
    tracker = open_tracker(finished, load_config())
    run = next(r for r in tracker.find_runs("e2e") if r.tags["wsi_mil.model"] == "abmil")
    geojson = Layout(finished).heatmaps_dir(run.run_id, "abmil") / "slide_003.geojson"

    def shown() -> np.ndarray:
        collection = json.loads(geojson.read_text())
        assert collection["properties"]["normalize"] == "cohort"
        return np.array([f["properties"]["measurements"]["score_cohort"] for f in collection["features"]])

    with_cohort = shown()
    assert main(["heatmap", "--run", run.run_id, "--out", str(finished), "--slides", "slide_003"]) == 0
    np.testing.assert_allclose(shown(), with_cohort)  # the same colours drawn alone
    assert str(geojson.parent) in capsys.readouterr().out


def test_rerun_does_no_stage_twice(finished, cohort, capsys):
    before = stage_mtimes(finished, cohort)
    tracker = open_tracker(finished, load_config())
    cv_before = {r.run_id for r in tracker.find_runs("e2e")}
    assert main(run_args(cohort, finished)) == 0
    assert stage_mtimes(finished, cohort) == before  # no store or bag rewritten
    assert {r.run_id for r in tracker.find_runs("e2e")} == cv_before  # no model retrained
    printed = capsys.readouterr().out
    assert "slides: 0 tiled, 8 reused" in printed and "features: 0 embedded, 8 reused" in printed
    timing = printed.split("Where the time went:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in timing[:3]] == ["checks", "tiling", "embedding"] and "s CPU" in timing[0]


def test_killed_run_resumes_to_the_same_result(finished, cohort, tmp_path):
    out = tmp_path / "killed"
    command = [str(Path(sys.executable).parent / "wsi-mil"), *run_args(cohort, out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _, features = outputs(out, cohort)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list(features.glob("*.h5"))) < 3:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; make the cohort larger"
    os.killpg(proc.pid, signal.SIGKILL)  # a crash: nothing gets to clean up
    proc.wait()
    assert main(run_args(cohort, out)) == 0
    # same stores and bags as the uninterrupted run, and the same test metrics
    assert_same_stores(finished, out, cohort)
    ref = _metric_table(finished)
    new = _metric_table(out)
    pd.testing.assert_frame_equal(ref, new, rtol=1e-6)


def _metric_table(out: Path) -> pd.DataFrame:
    tracker = open_tracker(out, load_config())
    rows = [{"model": r.tags["wsi_mil.model"], "auc": r.metrics.get("test/auc_mean")} for r in tracker.find_runs("e2e")]
    return pd.DataFrame(rows).sort_values("model").reset_index(drop=True)


def test_heatmap_and_predict_commands(finished, cohort, tmp_path, capsys):
    tracker = open_tracker(finished, load_config())
    run = next(r for r in tracker.find_runs("e2e") if r.tags["wsi_mil.model"].lower().startswith("abmil"))
    assert main(["heatmap", "--run", run.run_id, "--out", str(finished), "--slides", "slide_001",
                 "--normalize", "percentile"]) == 0
    png = Layout(finished).heatmaps_dir(run.run_id, run.tags["wsi_mil.model"]) / "slide_001.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    new = tmp_path / "new_slides"
    new.mkdir()
    for sid in cohort.slide_ids[:2]:
        shutil.copy(cohort.slides_dir / f"{sid}.svs", new / f"new_{sid}.svs")
    (new / "broken.svs").write_bytes(b"not a slide")
    code = main(["predict", str(new), "--run", run.run_id, "--out", str(finished)])
    assert code == 1  # one slide failed, and says so
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "slide_id" in line)
    assert "threshold" in header.split() and "pred" in header.split()
    frame = pd.read_csv(Layout(Layout(finished).predictions_dir(run.run_id)).predictions_csv)
    ok = frame[frame["slide_id"].str.startswith("new_")]
    assert len(ok) == 2 and ok["prob_tumor"].between(0, 1).all()
    assert ok["threshold"].between(0, 1).all()  # the decision is readable from the table itself
    negative = next(c[len("prob_"):] for c in ok.columns if c.startswith("prob_") and c != "prob_tumor")
    assert (ok["pred"] == np.where(ok["prob_tumor"] >= ok["threshold"], "tumor", negative)).all()
    assert frame.loc[frame["slide_id"] == "broken", "error"].str.len().iloc[0] > 10
    assert "predictions/predictions.csv" in tracker.list_artifacts(run.run_id, "predictions")


def test_heatmap_finds_moved_slides_and_predict_uses_this_calls_slide_settings(finished, cohort, tmp_path, capsys):
    tracker = open_tracker(finished, load_config())
    run = next(r for r in tracker.find_runs("e2e") if r.tags["wsi_mil.model"].lower().startswith("abmil"))
    heatmap = ["heatmap", "--run", run.run_id, "--out", str(finished), "--slides", "slide_002"]
    moved = tmp_path / "moved"
    cohort.slides_dir.rename(moved)  # bags record the old absolute paths
    try:
        assert main(heatmap) == 2
        assert "slide 'slide_002' is not at" in capsys.readouterr().err
        assert main([*heatmap, "--slides-dir", str(moved)]) == 0
    finally:
        moved.rename(cohort.slides_dir)
    real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-slides"
    tcga = "TCGA-CR-7395-01A-01-TS1"  # a real slide that declares no MPP
    if not (real / f"{tcga}.svs").is_file():
        pytest.fail(f"the real slide files are missing: expected {real / (tcga + '.svs')}")
    new = tmp_path / "no_mpp"
    new.mkdir()
    (new / f"{tcga}.svs").symlink_to(real / f"{tcga}.svs")
    overrides = tmp_path / "mpp.csv"
    overrides.write_text(f"slide_id,mpp\n{tcga},0.25\n")
    code = main(["predict", "--slides-dir", str(new), "--run", run.run_id, "--out", str(finished),
                 "--set", f"slides.mpp_override_csv={overrides}"])
    assert code == 0, capsys.readouterr().err
    frame = pd.read_csv(finished / "predictions" / run.run_id / "predictions.csv")
    assert frame.loc[frame["slide_id"] == tcga, "prob_tumor"].between(0, 1).all()
    assert list(frame["slide_id"]) == [tcga]  # exactly this call's slides, not an earlier call's


def _fixed_split_labels(cohort, dst: Path) -> Path:
    """The cohort's labels with a split column: per class one single-class patient to test, one to val."""
    frame = pd.read_csv(cohort.labels_csv)
    classes = frame.groupby("patient_id")["label"].agg(frozenset)
    split: dict[str, str] = {}
    for label in ("tumor", "normal"):
        for role in ("test", "val"):
            split[next(p for p, held in classes.items() if held == {label} and p not in split)] = role
    frame["split"] = frame["patient_id"].map(split).fillna("train")
    assert set(frame.loc[frame["split"] == "train", "label"]) == {"tumor", "normal"}
    frame.to_csv(dst, index=False)
    return dst


def test_predict_with_a_registered_model_reproduces_its_test_fold_probabilities_from_slides(finished, cohort, tmp_path,
                                                                                           capsys):
    # fixed splits, two seeds: each test slide is scored by both seeds' models, as the registered ensemble scores it
    labels = _fixed_split_labels(cohort, tmp_path / "fixed.csv")
    train = ["train", str(finished), "--labels", str(labels), "--model", "abmil", *fast_settings(cohort.truth_dir),
             "--set", "training.fixed_splits=true", "--set", "training.seeds=[0,1]",
             "--set", "tracking.experiment=e2e-registry", "--set", "tracking.register_as=e2e-abmil"]
    assert main(train) == 0
    printed = capsys.readouterr().out
    assert "registered model: models:/e2e-abmil/1" in printed
    run_id = printed.split("MLflow parent run: ")[1].split()[0]
    tracker = open_tracker(finished, load_config())
    trained = pd.read_csv(io.StringIO(tracker.read_text(run_id, "predictions.csv")))
    test_ids = sorted(trained["slide_id"].unique())
    assert len(test_ids) == 2 and sorted(trained["seed"].unique()) == [0, 1]
    expected = trained.groupby("slide_id")["prob_tumor"].mean()
    new = tmp_path / "new_slides"
    new.mkdir()
    for sid in test_ids:
        shutil.copy(cohort.slides_dir / f"{sid}.svs", new / f"new_{sid}.svs")
    assert main(["predict", str(new), "--model", "models:/e2e-abmil/1", "--out", str(finished)]) == 0
    assert "predictions/e2e-abmil_1" in capsys.readouterr().out
    frame = pd.read_csv(Layout(Layout(finished).predictions_dir("e2e-abmil_1")).predictions_csv).set_index("slide_id")
    threshold = float(np.median(pd.read_csv(io.StringIO(tracker.read_text(run_id, "per_fold.csv")))["threshold"]))
    logged = tracker.list_artifacts(run_id, "predictions")
    for sid in test_ids:  # tiled and embedded anew with the model's own settings: the same probabilities
        assert frame.loc[f"new_{sid}", "prob_tumor"] == pytest.approx(expected[sid], abs=1e-5)
        label = "tumor" if expected[sid] >= threshold else "normal"
        assert frame.loc[f"new_{sid}", "pred"] == label
        assert f"predictions/heatmaps/{label}/new_{sid}__p{expected[sid]:.2f}.png" in logged


def test_run_against_real_dask_cluster_and_mlflow_server(finished, cohort, tmp_path):
    out = tmp_path / "served"
    with dask_cluster(2, log_dir=tmp_path) as scheduler, mlflow_server(tmp_path / "mlflow") as url:
        command = [str(Path(sys.executable).parent / "wsi-mil"),
                   *run_args(cohort, out, "--scheduler", scheduler, "--tracking-uri", url, models="[abmil,ins]")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        # the slides went through the cluster: its scheduler ran the tiling and embedding tasks ...
        from distributed import Client

        with Client(scheduler, timeout=30) as client:
            ran = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
        assert {"find_tissue_task", "extract_chunk_task", "extract"} <= ran  # extract: one task per slide
        assert "train" in ran  # and the folds trained there: one task per (model, seed, fold)
        experiment = rest(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=e2e")["experiment"]
        found = rest(url, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`wsi_mil.role` = 'cv'"})["runs"]
        assert len(found) == 2
        for run in found:
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            run_id = run["info"]["run_id"]
            predictions = pd.read_csv(io.BytesIO(rest(url, f"/get-artifact?path=predictions.csv&run_uuid={run_id}",
                                                      raw=True)))
            assert metrics["test/auc_mean"] == pytest.approx(oracle_test_auc_mean(predictions), rel=1e-6)
            assert "heatmap/localisation_auc" in metrics
            label = predictions.set_index("slide_id").loc["slide_000"]
            stem = f"heatmaps/{label['label_name']}/slide_000__p{label['prob_tumor']:.2f}"
            listing = rest(url, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=heatmaps/{label['label_name']}")
            names = [f["path"] for f in listing["files"]]
            assert f"{stem}.png" in names and f"{stem}.geojson" in names
            png = rest(url, f"/get-artifact?path={stem}.png&run_uuid={run_id}", raw=True)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            geo = json.loads(rest(url, f"/get-artifact?path={stem}.geojson&run_uuid={run_id}", raw=True))
            assert geo["type"] == "FeatureCollection" and "score" in geo["features"][0]["properties"]
    # ... and wrote what the local run wrote
    assert_same_stores(finished, out, cohort)
    assert set(pd.read_csv(Layout(out).slides_csv)["status"]) == {"done"}
    assert not (out / "mlflow.db").exists()  # nothing went to the embedded store
