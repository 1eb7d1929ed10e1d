"""Labels CSV parsing/validation, bag matching and the bag cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers.milcore import write_cohort

from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.data import (
    BagStore,
    data_fingerprint,
    infer_classes,
    match_bags,
    read_labels,
    resolve_features_dir,
)
from wsi_mil.stores import write_bag


def _csv(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_labels_defaults_patient_to_slide(tmp_path):
    table = read_labels(_csv(tmp_path, "slide_id,label\na,tumor\nb,normal\nc.h5,tumor\n"))
    assert table.classes == ["normal", "tumor"]
    assert table.df["patient_id"].tolist() == ["a", "b", "c"]
    assert table.df["slide_id"].tolist() == ["a", "b", "c"]
    assert table.df["y"].tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["1", "0", "1"], ["0", "1"]),
        (["10", "2"], ["2", "10"]),
        (["cancer", "normal"], ["normal", "cancer"]),
        (["positive", "negative"], ["negative", "positive"]),
        (["LUSC", "LUAD"], ["LUAD", "LUSC"]),
        (["c", "a", "b"], ["a", "b", "c"]),
    ],
)
def test_infer_classes(names, expected):
    assert infer_classes(names) == expected


def test_classes_from_config_fix_order(tmp_path):
    table = read_labels(_csv(tmp_path, "slide_id,label,patient_id\na,x,P1\nb,y,P1\nc,z,\n"), ["z", "y", "x"])
    assert table.classes == ["z", "y", "x"]
    assert table.df["y"].tolist() == [2, 1, 0]
    assert table.df["patient_id"].tolist() == ["P1", "P1", "c"]


@pytest.mark.parametrize(
    ("text", "classes", "needle"),
    [
        ("", None, "is empty"),
        ("slide_id,label\n", None, "no rows"),
        ("slide,label\na,1\n", None, "lacks column(s) slide_id"),
        ("slide_id,diagnosis\na,1\n", None, "lacks column(s) label"),
        ("slide_id,label\na,1\nb,0\na,0\n", None, "duplicate slide_id(s): a"),
        ("slide_id,label\na,tumor\nb,fibrosis\n", ["normal", "tumor"], "label(s) fibrosis not in training.classes"),
        ("slide_id,label\na,1\nb,\n", None, "slide(s) without a label: b"),
        ("slide_id,label,split\na,1,train\nb,0,holdout\n", None, "split value(s) holdout"),
        ("slide_id,label\na,1\nb,1\n", None, "single class"),
    ],
)
def test_bad_labels_give_one_clear_error(tmp_path, text, classes, needle):
    path = _csv(tmp_path, text)
    with pytest.raises(WsiMilError) as info:
        read_labels(path, classes)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_labels_file(tmp_path):
    with pytest.raises(WsiMilError, match="does not exist"):
        read_labels(tmp_path / "nope.csv")


def test_match_bags_reports_every_mismatch(tmp_path, caplog):
    bags, labels_csv = write_cohort(tmp_path, n_slides=6, dim=8)
    (bags / "slide_001.h5").unlink()
    write_bag(bags / "stray.h5", np.zeros((3, 8), np.float32), np.zeros((3, 2)))
    write_bag(bags / "slide_002.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2)))
    (bags / "slide_003.h5.partial-1-abc").write_bytes(b"junk")
    table = read_labels(labels_csv)
    with pytest.raises(WsiMilError) as info:
        match_bags(table, bags, "error")
    msg = str(info.value)
    assert "have no bag (slide_001)" in msg
    assert "have no label (stray)" in msg
    assert "empty or unreadable (slide_002)" in msg
    assert "on_missing=exclude" in msg
    with caplog.at_level(logging.WARNING):
        kept, paths = match_bags(table, bags, "exclude")
    assert kept.slide_ids == ["slide_000", "slide_003", "slide_004", "slide_005"]
    assert set(paths) == set(kept.slide_ids)
    assert "excluding" in caplog.text


def test_missing_features_dir(tmp_path):
    _, labels_csv = write_cohort(tmp_path, n_slides=4, dim=8)
    with pytest.raises(WsiMilError, match="run `wsi-mil extract`"):
        match_bags(read_labels(labels_csv), tmp_path / "nothing", "error")


def test_bag_store_caches_and_lists_are_lazy(tmp_path):
    bags, labels_csv = write_cohort(tmp_path, n_slides=4, dim=8)
    table, paths = match_bags(read_labels(labels_csv), bags)
    store = BagStore(paths, cache=True)
    assert store.cached and store.dim == 8
    items = store.items(table.slide_ids, table.df["y"].tolist())
    assert len(store._cache) == 0  # nothing read until accessed
    first = items[0]
    assert isinstance(first.features, torch.Tensor) and first.features.dtype == torch.float32
    assert first.features.shape[1] == 8 and first.coords.shape == (first.features.shape[0], 2)
    assert items.labels == [0, 1, 0, 1]
    paths["slide_000"].unlink()  # cached: still readable
    assert torch.equal(items[0].features, first.features)
    uncached = BagStore({k: v for k, v in paths.items() if k != "slide_000"}, cache=False)
    bag_list = uncached.items(["slide_001"], [1])
    assert [b.slide_id for b in bag_list] == ["slide_001"]
    assert len(uncached._cache) == 0


def test_bag_store_rejects_mixed_dims(tmp_path):
    write_bag(tmp_path / "a.h5", np.zeros((3, 8), np.float32), np.zeros((3, 2)))
    write_bag(tmp_path / "b.h5", np.zeros((3, 16), np.float32), np.zeros((3, 2)))
    with pytest.raises(WsiMilError, match="different feature sizes"):
        BagStore({"a": tmp_path / "a.h5", "b": tmp_path / "b.h5"})


def test_fingerprint_tracks_bag_content(tmp_path):
    bags, _ = write_cohort(tmp_path, n_slides=3, dim=8)
    paths = {p.stem: p for p in bags.glob("*.h5")}
    before = data_fingerprint(paths)
    assert before == data_fingerprint(dict(reversed(list(paths.items()))))
    write_bag(paths["slide_000"], np.zeros((5, 8), np.float32), np.zeros((5, 2)))
    assert data_fingerprint(paths) != before


def test_features_dir_override(tmp_path):
    cfg = Config().with_overrides({"training.features_dir": str(tmp_path)})
    assert resolve_features_dir(tmp_path / "out", cfg) == tmp_path
    derived = resolve_features_dir(tmp_path / "out", Config())
    assert derived.parent.parent == tmp_path / "out" / "features"
