"""`wsi-mil train` run stage by stage after `extract`: picking the bag folder and finding ground truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.helpers.milcore import write_cohort
from wsi_mil.cli import main
from wsi_mil.config import Config
from wsi_mil.layout import tiling_key
from wsi_mil.stores import read_bag, write_bag

FAST = ["--model", "mean", "--epochs", "2", "--folds", "2"]


def _extracted(tmp_path: Path, weights: str = "random") -> tuple[Path, Path, Path]:
    """An OUT folder whose bags sit where `extract --weights WEIGHTS` puts them; (out, labels, bag folder)."""
    bags, labels = write_cohort(tmp_path / "src", n_slides=12, dim=8, n_min=8, n_max=16)
    out = tmp_path / "out"
    folder = out / "features" / tiling_key(Config()) / f"resnet50_trunc-{weights}"
    for src in sorted(bags.glob("*.h5")):
        bag = read_bag(src)
        write_bag(folder / src.name, bag.features, bag.coords,
                  {"encoder": "resnet50_trunc", "weights": weights, "patch_size": 256, "patch_level": 0,
                   "patch_size_level0": 256})
    return out, labels, folder


def test_train_error_names_the_weights_flag_of_the_existing_bags(tmp_path, capsys):
    out, labels, _ = _extracted(tmp_path)
    args = ["train", str(out), "--labels", str(labels), *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "resnet50_trunc-imagenet does not exist" in err
    assert "were made with --weights random: add --weights random (or --set features.weights=random)" in err
    # an empty folder left by an earlier failed extract does not hide the hint
    (out / "features" / tiling_key(Config()) / "resnet50_trunc-imagenet").mkdir()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "resnet50_trunc-imagenet holds no bags" in err and "add --weights random" in err
    assert "have no bag" not in err


def test_train_accepts_the_weights_flag_like_extract(tmp_path, capsys):
    out, labels, folder = _extracted(tmp_path)
    assert main(["train", str(out), "--labels", str(labels), "--weights", "random", *FAST]) == 0
    assert "MLflow parent run:" in capsys.readouterr().out
    assert main(["train", str(out), "--labels", str(labels), "--encoder", "resnet18", "--weights", "random",
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert "resnet18-random does not exist" in err and "add --encoder resnet50_trunc" in err


def _summary_metric(text: str, name: str) -> float:
    """A metric's mean from the summary `train` prints (NaN when it is not printed)."""
    line = next((x for x in text.splitlines() if x.strip().startswith(name + ":")), None)
    return float("nan") if line is None else float(line.split(":")[1].split("+-")[0])


def test_train_finds_the_truth_folder_beside_the_labels_file_like_run(tmp_path, capsys, caplog):
    out, labels, folder = _extracted(tmp_path)
    truth = labels.parent / "truth"
    truth.mkdir()
    square = [[0, 0], [768, 0], [768, 256], [0, 256], [0, 0]]  # the first three patches of a bag
    for i in range(1, 12, 2):  # the positive slides
        (truth / f"slide_{i:03d}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [square]}}]}))
    args = ["train", str(out), "--labels", str(labels), "--weights", "random", *FAST]
    with caplog.at_level("INFO", logger="wsi_mil"):
        assert main(args) == 0
    assert f"ground truth for 6 of 12 slides found in {truth.resolve()}" in caplog.text
    assert not math.isnan(_summary_metric(capsys.readouterr().out, "instance_auc"))
    # the user's folder wins over the lookup
    caplog.clear()
    with caplog.at_level("INFO", logger="wsi_mil"):
        assert main([*args, "--force", "--set", f"training.annotations_dir={folder}"]) == 0
    assert "ground truth for" not in caplog.text
    assert math.isnan(_summary_metric(capsys.readouterr().out, "instance_auc"))
