"""`wsi-mil train` run stage by stage after `extract`: picking the bag folder and finding ground truth."""

from __future__ import annotations

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
                  {"encoder": "resnet50_trunc", "weights": weights, "patch_size": 256, "patch_level": 0})
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
