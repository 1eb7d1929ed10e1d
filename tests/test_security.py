"""Nothing exposed, nothing leaked, nothing written outside OUT.

- servers the tool starts (the local Dask cluster in `wsi-mil tile`, `wsi-mil ui`) listen on 127.0.0.1
  only: every listening socket of the process tree is read with psutil while they run;
- a tracking URI with a password, and secrets in the environment, reach neither the MLflow store (the
  server's SQLite bytes, its artifacts) nor OUT nor the captured logs of a real `wsi-mil run` against
  a real `mlflow server` (which ignores the credentials the MLflow client sends);
- slide ids that could leave their directory (``../x``, ``/etc/x``, ``a/b``, ``..\\x``) are refused by
  `tile` (slide files, override CSVs), `heatmap --slides`, `predict`, labels CSVs and override CSVs, and
  no command writes anything outside OUT (a listing of the folder around OUT before and after).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from helpers.servers import free_port, listening, mlflow_server, rest

from wsi_mil.cli import main
from wsi_mil.config import Config, SlidesConfig
from wsi_mil.errors import ConfigError, SlideError, WsiMilError
from wsi_mil.layout import Layout, path_component, slide_file
from wsi_mil.mil.data import read_labels
from wsi_mil.redaction import RedactingFormatter, redact
from wsi_mil.slides.mpp import mpp_overrides
from wsi_mil.synth import generate_cohort
from wsi_mil.tracking import Tracker, open_tracker

BIN = Path(sys.executable).parent
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-slides"
CMU = REAL / "CMU-1-Small-Region.svs"
BAD_IDS = ["../x", "/etc/x", "a/b", "..\\x", "../../../../trav/evil", "..", "a\x00b", "a\nb", "C:x", ""]
TRAVERSING = ["../x", "/etc/x", "a/b", "..\\x", "../../../../trav/evil"]


def _real_slide() -> Path:
    if not CMU.is_file():
        pytest.fail(f"the real slide file is missing: expected {CMU} (../shared/data/real-slides beside the repository)")
    return CMU


def listing(root: Path, out: Path) -> set[str]:
    """Every path under ``root`` (with size and mtime), leaving out ``out`` and what is inside it."""
    seen = set()
    for base, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(base, d) != out]
        for name in dirs + files:
            path = Path(base, name)
            if path == out:
                continue
            stat = path.lstat()
            seen.add(f"{path.relative_to(root)} {stat.st_size} {stat.st_mtime_ns}")
    return seen


def run_sampling_sockets(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, set[tuple[str, int]]]:
    """Run ``command``; meanwhile read the listening sockets of its process tree every 50 ms."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    seen: set[tuple[str, int]] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.update(listening(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        done.set()
        sampler.join()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), seen


# ----------------------------------------------------------------------------------------- slide ids
@pytest.mark.parametrize("bad", BAD_IDS)
def test_path_component_refuses_ids_that_could_leave_their_directory(bad):
    with pytest.raises(SlideError, match="cannot name a file") as caught:
        path_component(bad)
    assert repr(bad) in str(caught.value)  # the message names the id


@pytest.mark.parametrize("good", ["S01", "case.12", "TCGA-AB-1234 (2)", "a..b", "slide_001", "ünïcode"])
def test_path_component_keeps_plain_ids_unchanged(good, tmp_path):
    assert path_component(good) == good
    assert slide_file(tmp_path, good, ".png") == tmp_path / f"{good}.png"


@pytest.mark.parametrize("bad", TRAVERSING)
def test_layout_refuses_unsafe_ids_in_every_path_it_composes(bad, tmp_path):
    layout = Layout(tmp_path)
    for compose in (lambda: layout.qc_image(bad, "thumb"), lambda: layout.patch_store("key", bad),
                    lambda: layout.clam_coords("key", bad), lambda: layout.bag("key", "enc", bad),
                    lambda: slide_file(tmp_path, bad, ".geojson")):
        with pytest.raises(SlideError, match="slide id"):
            compose()
    for compose in (lambda: layout.heatmaps_dir(bad), lambda: layout.predictions_dir(bad)):
        with pytest.raises(WsiMilError, match="run id"):
            compose()
    with pytest.raises(WsiMilError, match="tiling key"):
        layout.bag(bad, "enc", "S1")


def test_labels_csv_with_unsafe_ids_is_refused_naming_each(tmp_path):
    csv = tmp_path / "labels.csv"
    rows = [f'"{sid}",tumor' for sid in TRAVERSING] + ["S1,normal", "S2,tumor", "S3,normal"]
    csv.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(WsiMilError, match="cannot name a file") as caught:
        read_labels(csv)
    for sid in TRAVERSING:
        assert repr(sid) in str(caught.value)
    assert "S1" not in str(caught.value)


@pytest.mark.parametrize("bad", TRAVERSING)
def test_override_csv_with_an_unsafe_id_is_refused_naming_its_line(bad, tmp_path):
    csv = tmp_path / "mpp.csv"
    csv.write_text(f'slide_id,mpp\nS1,0.25\n"{bad}",0.5\n')
    with pytest.raises(ConfigError, match=r"line 3: slide_id .* cannot name a slide file"):
        mpp_overrides(SlidesConfig(mpp_override_csv=csv))


def test_extract_refuses_unsafe_slide_ids(tmp_path):
    from wsi_mil.extract.planning import discover_slides

    with pytest.raises(SlideError, match=r"'\.\./x'"):
        discover_slides(Layout(tmp_path), "key", ["S1", "../x"])


@pytest.mark.parametrize("bad", TRAVERSING)
def test_tile_refuses_an_override_csv_with_unsafe_ids_and_writes_nothing_outside_out(bad, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "S1.svs").symlink_to(_real_slide())
    csv = tmp_path / "mpp.csv"
    csv.write_text(f'slide_id,mpp\n"{bad}",0.5\n')
    out = tmp_path / "out"
    before = listing(tmp_path, out)
    assert main(["tile", str(slides), "--out", str(out), "--set", f"slides.mpp_override_csv={csv}"]) == 2
    err = capsys.readouterr().err
    assert f"line 2: slide_id {bad!r} cannot name a slide file" in err
    assert listing(tmp_path, out) == before


@pytest.mark.slow
def test_tile_listens_on_loopback_only_and_fails_slides_whose_names_cannot_be_ids(tmp_path):
    """`wsi-mil tile` as a user runs it: its local Dask cluster and the slide files named to traverse."""
    slides = tmp_path / "slides"
    slides.mkdir()
    names = {"CMU-1-Small-Region.svs": "done", "x\\..\\..\\evil.svs": "failed", "tab\tname.svs": "failed"}
    for name in names:
        (slides / name).symlink_to(_real_slide())
    out = tmp_path / "out"
    before = listing(tmp_path, out)
    done, sockets = run_sampling_sockets([str(BIN / "wsi-mil"), "tile", str(slides), "--out", str(out)], cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]  # two slides failed, and say so
    assert sockets, "no listening socket was seen: the sampler missed the cluster's HTTP endpoints"
    assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets
    rows = pd.read_csv(Layout(out).slides_csv, keep_default_na=False).set_index("slide_id")
    assert rows.loc["CMU-1-Small-Region", "status"] == "done"
    for name in ("x\\..\\..\\evil", "tab\tname"):
        assert rows.loc[name, "status"] == "failed"
        assert "cannot name an output file" in rows.loc[name, "reason"] and "rename the file" in rows.loc[name, "reason"]
    assert listing(tmp_path, out) == before


@pytest.mark.slow
def test_ui_listens_on_loopback_only(tmp_path):
    out = tmp_path / "out"
    tracker = open_tracker(out, Config())
    tracker.end_run(tracker.start_run(tracker.experiment("e"), "r"))
    port = free_port()
    proc = subprocess.Popen([str(BIN / "wsi-mil"), "ui", str(out), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            assert proc.poll() is None, "wsi-mil ui exited"
            time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not answer within 120 s")
        sockets = listening(proc.pid)
        assert ("127.0.0.1", port) in sockets
        assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ credentials
def test_redact_masks_uri_passwords_secret_query_values_and_environment_secrets(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-pass-4711")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a setting, not a secret: "false" stays readable
    assert redact("uri http://alice:s3cret@host:5000/x failed") == "uri http://alice:***@host:5000/x failed"
    assert redact("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert redact("https://h/api?token=abc123&run=1") == "https://h/api?token=***&run=1"
    assert redact("sent env-pass-4711 and hf_abcdefghijklmnop; parallel=false") == "sent *** and ***; parallel=false"
    for plain in ("tcp://127.0.0.1:8786", "http://alice@host:5000", "sqlite:////a/b/mlflow.db", "/data/S1:2.svs"):
        assert redact(plain) == plain


def test_tracker_masks_credentials_in_params_tags_text_run_names_and_errors(tmp_path, monkeypatch):
    uri = "http://alice:s3cret-pw@127.0.0.1:9"
    tracker = open_tracker(tmp_path, Config())
    run = tracker.start_run(tracker.experiment("e"), f"run {uri}", tags={"source": uri})
    tracker.log_params(run, {"tracking.uri": uri, "nested": {"uri": uri}})
    tracker.set_tags(run, {"remote": uri})
    tracker.log_text(run, f"tracking:\n  uri: {uri}\n", "config.yaml")
    tracker.end_run(run)
    record = tracker.get_run(run)
    assert record.params["tracking.uri"] == "http://alice:***@127.0.0.1:9"
    assert record.tags["source"] == record.tags["remote"] == "http://alice:***@127.0.0.1:9"
    assert "alice:***@" in tracker.read_text(run, "config.yaml")
    stored = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in stored)
    assert not [p for p in stored if b"s3cret-pw" in p.read_bytes()]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(WsiMilError, match=r"MLflow at http://alice:\*\*\*@127.0.0.1:9 failed") as caught:
        Tracker(uri).experiment("e")
    assert "s3cret-pw" not in str(caught.value)


def test_log_lines_are_masked_message_arguments_and_traceback(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789")
    formatter = RedactingFormatter("%(levelname)s %(message)s")
    try:
        raise OSError("cannot reach http://alice:s3cret-pw@h:5000")
    except OSError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "store %s with %s", ("http://bob:pw-42@h", "tok-0123456789"),
                                   sys.exc_info())
    line = formatter.format(record)
    assert "http://bob:***@h with ***" in line and "http://alice:***@h:5000" in line
    assert "s3cret-pw" not in line and "pw-42" not in line and "tok-0123456789" not in line


def test_cli_error_messages_mask_the_tracking_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = "http://alice:s3cret-pw@127.0.0.1:9"  # nothing listens: the error names the store
    assert main(["heatmap", "--run", "0" * 32, "--out", str(tmp_path), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "MLflow at http://alice:***@127.0.0.1:9 failed" in err and "s3cret-pw" not in err


def test_config_show_masks_credentials(capsys):
    assert main(["config", "show", "--set", "tracking.uri=http://alice:s3cret-pw@h:5000"]) == 0
    shown = capsys.readouterr().out
    assert "alice:***@h:5000" in shown and "s3cret-pw" not in shown


# ------------------------------------------------------------------------------- end to end, real servers
SETTINGS = {"features.encoder": "tiny_cnn", "features.weights": "random", "features.num_workers": 0,
            "training.folds": 2, "training.epochs": 3, "training.min_epochs": 1, "training.bootstrap": 0,
            "run.models": "[abmil]", "tracking.experiment": "sec", "heatmap.top_k": 2}
SETS = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
SECRETS = {"uri": "uri-secret-0815", "password": "env-password-4711", "token": "env-token-2342",
           "hf": "hf_notarealtoken0123456789"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `wsi-mil run` (abmil) against a real `mlflow server`, its URI carrying a password, secrets in the env.

    Yields (box, out, server root, url, uri, completed process, listing of box outside OUT before the run).
    """
    box = tmp_path_factory.mktemp("box")
    server_root = tmp_path_factory.mktemp("server")
    cohort = generate_cohort(box / "cohort", n_slides=8, seed=11, size=2048, tumour="large")
    out = box / "out"
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": "wsi-env-user", "MLFLOW_TRACKING_PASSWORD": SECRETS["password"],
           "MLFLOW_TRACKING_TOKEN": SECRETS["token"], "HF_TOKEN": SECRETS["hf"]}
    with mlflow_server(server_root) as url:
        uri = url.replace("http://", f"http://wsi-user:{SECRETS['uri']}@")
        before = listing(box, out)
        command = [str(BIN / "wsi-mil"), "run", str(cohort.slides_dir), "--labels", str(cohort.labels_csv),
                   "--out", str(out), "--tracking-uri", uri, *SETS]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=box, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        yield box, out, server_root, url, uri, done, before


def _cv_run(url: str) -> dict:
    experiment = rest(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=sec")["experiment"]
    return rest(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`wsi_mil.role` = 'cv'"})["runs"][0]


@pytest.mark.slow
def test_password_in_the_tracking_uri_and_env_secrets_reach_no_store_artifact_or_log(served):
    box, out, server_root, url, _, done, before = served
    run = _cv_run(url)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    masked = url.replace("http://", "http://wsi-user:***@")
    assert params["tracking.uri"] == masked  # logged, but masked
    config = rest(url, f"/get-artifact?path=config.yaml&run_uuid={run['info']['run_id']}", raw=True).decode()
    assert f"uri: {masked}" in config
    assert masked in done.stderr  # the log line naming the store shows the masked URI
    files = [p for root in (server_root, box) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".db" for p in files) and any(p.name == "config.yaml" for p in files)
    for secret in [*SECRETS.values(), "wsi-env-user"]:
        assert secret not in done.stdout and secret not in done.stderr, secret
        leaked = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, (secret, leaked)
    assert listing(box, out) == before  # nothing written outside OUT (not even an mlflow.db in the cwd)


@pytest.mark.slow
@pytest.mark.parametrize("bad", TRAVERSING)
def test_heatmap_refuses_unsafe_slides_and_writes_nothing_outside_out(served, bad, capsys):
    box, out, _, url, uri, _, _ = served
    run_id = _cv_run(url)["info"]["run_id"]
    before = listing(box, out)
    code = main(["heatmap", "--run", run_id, "--out", str(out), "--tracking-uri", uri, "--slides", "slide_000", bad])
    assert code == 2
    err = capsys.readouterr().err
    assert repr(bad) in err and "cannot name a file" in err and SECRETS["uri"] not in err
    assert listing(box, out) == before


@pytest.mark.slow
def test_predict_refuses_unsafe_ids_and_writes_nothing_outside_out(served, capsys):
    box, out, _, url, uri, _, _ = served
    run_id = _cv_run(url)["info"]["run_id"]
    new = box / "new_slides"
    new.mkdir(exist_ok=True)
    source = next((box / "cohort" / "slides").glob("*.svs"))
    for name in ("good.svs", "x\\..\\..\\evil.svs"):
        if not (new / name).exists():
            shutil.copy(source, new / name)
    before = listing(box, out)
    predict = ["predict", str(new), "--run", run_id, "--out", str(out), "--tracking-uri", uri]
    for bad in TRAVERSING:  # an override CSV naming a slide by an unsafe id: refused before any work
        overrides = box / "mpp.csv"
        overrides.write_text(f'slide_id,mpp\n"{bad}",0.5\n')
        assert main([*predict, "--set", f"slides.mpp_override_csv={overrides}"]) == 2
        assert f"slide_id {bad!r} cannot name a slide file" in capsys.readouterr().err
        overrides.unlink()
    assert listing(box, out) == before
    code = main(predict)
    assert code == 1, capsys.readouterr().err  # one slide failed, and says so
    frame = pd.read_csv(Layout(out).predictions_dir(run_id) / "predictions.csv")
    assert frame.loc[frame["slide_id"] == "good", "prob_tumor"].between(0, 1).all()
    assert "cannot name an output file" in frame.loc[frame["slide_id"] == "x\\..\\..\\evil", "error"].iloc[0]
    assert listing(box, out) == before


@pytest.mark.slow
def test_train_refuses_a_labels_csv_with_unsafe_ids(served, capsys):
    box, out, _, _, uri, _, _ = served
    labels = box / "cohort" / "labels.csv"
    bad = box / "bad_labels.csv"
    bad.write_text(labels.read_text() + '"../x",tumor\n"/etc/x",normal\n')
    before = listing(box, out)
    assert main(["train", str(out), "--labels", str(bad), "--tracking-uri", uri, *SETS]) == 2
    err = capsys.readouterr().err
    assert "'../x'" in err and "'/etc/x'" in err and "cannot name a file" in err
    assert listing(box, out) == before
