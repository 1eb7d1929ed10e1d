"""Labels CSV parsing/validation and hygiene, bag and slide-folder matching, features-dir lookup, the bag cache."""

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
    load_labels,
    match_bags,
    match_slides,
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


def test_label_case_and_space_variants_are_an_error_listing_counts(tmp_path):
    rows = ["a,tumor", "b,tumor", "c,tumor", "d,Tumor ", "e,Tumor ", "f,TUMOR", "g,normal", "h, normal", "i,normal"]
    path = _csv(tmp_path, "slide_id,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(WsiMilError) as info:
        read_labels(path)
    msg = str(info.value)
    assert "differ only by case or surrounding spaces" in msg and str(path) in msg
    assert "'tumor' (3), 'Tumor ' (2), 'TUMOR' (1)" in msg
    assert "'normal' (2), ' normal' (1)" in msg
    assert "training.merge_label_variants=true" in msg
    # one spelling, padded the same way everywhere, is not a variant
    same = read_labels(_csv(tmp_path, "slide_id,label\na, tumor\nb, normal\n", "padded.csv"))
    assert same.classes == ["normal", "tumor"]


def test_label_variants_merge_when_configured(tmp_path, caplog):
    path = _csv(tmp_path, "slide_id,label\na,tumor\nb,tumor\nc,Tumor \nd,normal\ne,NORMAL\nf,normal\n")
    with caplog.at_level(logging.WARNING):
        table = load_labels(Config().with_overrides({"training.labels_csv": str(path),
                                                     "training.merge_label_variants": True}).training)
    assert table.classes == ["normal", "tumor"] and table.df["y"].tolist() == [1, 1, 1, 0, 0, 0]
    assert "'Tumor ' (1 slide(s)) merged into 'tumor'" in caplog.text
    named = read_labels(path, ["Normal", "Tumor"], merge_variants=True)  # the spelling of training.classes wins
    assert set(named.df["label"]) == {"Normal", "Tumor"} and named.df["y"].tolist() == [1, 1, 1, 0, 0, 0]


def test_match_slides_lists_both_directions_and_keeps_the_present(tmp_path, caplog):
    path = _csv(tmp_path, "slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(20)))
    found = [f"s{i}" for i in range(6, 20)] + ["x1", "x2"]
    with caplog.at_level(logging.WARNING):
        kept = match_slides(read_labels(path), found, tmp_path / "slides")
    assert kept.slide_ids == [f"s{i}" for i in range(6, 20)]
    assert "6 labelled slide(s) have no slide file (s0, s1, s2, s3, s4, s5)" in caplog.text
    assert "2 slide file(s) have no label (x1, x2)" in caplog.text and str(tmp_path / "slides") in caplog.text
    with pytest.raises(WsiMilError, match="none of the 20 slides .* slide_id must be the slide file's name"):
        match_slides(read_labels(path), ["TCGA-01.svs"], tmp_path / "slides")


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


def test_missing_features_dir_lists_the_bag_folders_of_this_tiling(tmp_path):
    from wsi_mil.layout import tiling_key

    out = tmp_path / "out"
    with pytest.raises(WsiMilError, match="run `wsi-mil extract` first"):
        resolve_features_dir(out, Config())
    tiling = out / "features" / tiling_key(Config())
    for name, n in (("resnet50_trunc-random", 3), ("resnet18-random", 1)):
        for i in range(n):
            write_bag(tiling / name / f"s{i}.h5", np.zeros((2, 4), np.float32), np.zeros((2, 2)))
    (tiling / "empty-folder").mkdir()
    with pytest.raises(WsiMilError) as info:
        resolve_features_dir(out, Config())  # default: resnet50_trunc-imagenet
    msg = str(info.value)
    assert "resnet50_trunc-imagenet does not exist" in msg
    assert "bag folders for this tiling: resnet18-random (1 bags), resnet50_trunc-random (3 bags)" in msg
    assert "features.weights=random" in msg and "empty-folder" not in msg
    found = resolve_features_dir(out, Config().with_overrides({"features.weights": "random"}))
    assert found == tiling / "resnet50_trunc-random"
    other = Config().with_overrides({"tiling.patch_size": 128})
    with pytest.raises(WsiMilError, match=f"bags exist for tiling\\(s\\) {tiling.name}"):
        resolve_features_dir(out, other)
