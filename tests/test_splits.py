"""Patient-level splits: no patient crosses folds or roles, stratified on slide labels (patients may hold
several labels), infeasible folds explained, fixed splits respected."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wsi_mil.config import TrainingConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.data import read_labels
from wsi_mil.mil.splits import check_splits, fold_ids, load_splits, make_splits, save_splits, split_counts


def _cohort(tmp_path, rng, n_patients, n_classes, name="labels.csv"):
    rows = []
    for p in range(n_patients):
        label = p % n_classes if p < 5 * n_classes else int(rng.integers(n_classes))
        for s in range(int(rng.integers(1, 4))):
            # a few patients also have a slide of another class (e.g. tumour + normal slides)
            y = label if s == 0 or rng.random() > 0.2 else int(rng.integers(n_classes))
            rows.append({"slide_id": f"P{p}_S{s}", "patient_id": f"P{p}", "label": f"c{y}"})
    path = tmp_path / name
    pd.DataFrame(rows).sample(frac=1, random_state=int(rng.integers(1000))).to_csv(path, index=False)
    return read_labels(path)


@pytest.mark.parametrize("cohort_seed", range(6))
def test_random_cohorts_never_leak(tmp_path, cohort_seed):
    rng = np.random.default_rng(cohort_seed)
    n_classes = 2 + cohort_seed % 2
    folds = 3 + cohort_seed % 3
    labels = _cohort(tmp_path, rng, int(rng.integers(5 * n_classes, 60)), n_classes)
    cfg = TrainingConfig(folds=folds, seeds=[0, 1, 7], val_fraction=0.25)
    table = make_splits(labels, cfg)
    patient_of = dict(zip(labels.df["slide_id"], labels.df["patient_id"], strict=True))
    assert len(table) == len(labels.df) * folds * 3
    for seed in cfg.seeds:
        tested: list[str] = []
        test_fold_of_patient: dict[str, int] = {}
        for fold in range(folds):
            roles = {r: set(fold_ids(table, seed, fold, r)) for r in ("train", "val", "test")}
            assert roles["train"] and roles["val"] and roles["test"]
            assert not (roles["train"] & roles["val"]) and not (roles["train"] & roles["test"])
            assert not (roles["val"] & roles["test"])
            pats = {r: {patient_of[s] for s in ids} for r, ids in roles.items()}
            assert not (pats["train"] & pats["val"]), "validation leaks into training"
            assert not (pats["train"] & pats["test"]), "test leaks into training"
            assert not (pats["val"] & pats["test"]), "test leaks into validation"
            for p in pats["test"]:
                assert test_fold_of_patient.setdefault(p, fold) == fold, "patient in two test folds"
            tested.extend(roles["test"])
            # stratified: every test fold holds every class
            ys = table[(table.seed == seed) & (table.fold == fold) & (table.role == "test")]["y"]
            assert set(ys) == set(range(n_classes))
        assert sorted(tested) == sorted(labels.slide_ids)


def test_splits_are_reproducible_and_seed_dependent(tmp_path):
    labels = _cohort(tmp_path, np.random.default_rng(3), 40, 2)
    cfg = TrainingConfig(folds=4, seeds=[0, 1])
    a, b = make_splits(labels, cfg), make_splits(labels, cfg)
    assert a.equals(b)
    s0 = a[a.seed == 0].reset_index(drop=True)["role"]
    s1 = a[a.seed == 1].reset_index(drop=True)["role"]
    assert not s0.equals(s1)


def test_fold_sizes_balanced(tmp_path):
    labels = _cohort(tmp_path, np.random.default_rng(5), 50, 2)
    table = make_splits(labels, TrainingConfig(folds=5))
    counts = table[table.role == "test"].groupby("fold").size()
    assert counts.max() - counts.min() <= 4


def test_fixed_splits_respected(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,patient_id,split\na,0,P1,train\nb,1,P1,Train\nc,0,P2,val\nd,1,P3,validation\n"
                    "e,0,P4,test\nf,1,P5,test\n")
    table = make_splits(read_labels(path), TrainingConfig(fixed_splits=True, seeds=[0, 3]))
    assert sorted(table.seed.unique()) == [0, 3]
    for seed in (0, 3):
        assert fold_ids(table, seed, 0, "train") == ["a", "b"]
        assert fold_ids(table, seed, 0, "val") == ["c", "d"]
        assert fold_ids(table, seed, 0, "test") == ["e", "f"]


def test_fixed_splits_reject_patient_in_two_splits(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,patient_id,split\na,0,P1,train\nb,1,P1,test\nc,0,P2,val\nd,1,P3,test\n")
    with pytest.raises(WsiMilError, match="P1 have slides in more than one split"):
        make_splits(read_labels(path), TrainingConfig(fixed_splits=True))


def test_fixed_splits_need_column_and_roles(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,0\nb,1\n")
    with pytest.raises(WsiMilError, match="no 'split' column"):
        make_splits(read_labels(path), TrainingConfig(fixed_splits=True))
    path.write_text("slide_id,label,split\na,0,train\nb,1,test\n")
    with pytest.raises(WsiMilError, match="no val slides"):
        make_splits(read_labels(path), TrainingConfig(fixed_splits=True))


def test_too_few_patients_per_class_names_what_is_short(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,patient_id\n" + "".join(f"s{i},{int(i < 3)},P{i}\n" for i in range(20))
                    + "s20,1,P0\ns21,1,P1\n")  # five class-1 slides, on three patients
    with pytest.raises(WsiMilError) as info:
        make_splits(read_labels(path), TrainingConfig(folds=5))
    msg = str(info.value)
    assert "5 folds need slides of every class on at least 5 patients" in msg
    assert "'1' has 5 slide(s) on 3 patient(s)" in msg and "'0'" not in msg
    assert "lower training.folds to 3" in msg.lower() and str(path) in msg
    make_splits(read_labels(path), TrainingConfig(folds=3))  # what the message proposes works


def test_too_few_patients_in_all(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,patient_id\na,0,P1\nb,1,P1\nc,0,P1\n")
    with pytest.raises(WsiMilError, match=r"1 patient\(s\) in all; '0' has 2 slide\(s\) on 1 patient.*Add patients"):
        make_splits(read_labels(path), TrainingConfig(folds=2))


def _tumour_normal_pairs(tmp_path, n_patients=16):
    """A TCGA-shaped cohort: every patient has one tumour (-01) and one normal (-11) slide."""
    rows = [{"slide_id": f"TCGA-{p:02d}-{code}", "patient_id": f"TCGA-{p:02d}", "label": label}
            for p in range(n_patients) for code, label in (("01", "tumor"), ("11", "normal"))]
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return read_labels(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tumour_and_normal_slide_per_patient_makes_balanced_5_folds(tmp_path, seed):
    labels = _tumour_normal_pairs(tmp_path)
    table = make_splits(labels, TrainingConfig(folds=5, seeds=[seed]))
    counts = split_counts(table, labels.classes)
    assert len(counts) == 5
    ideal = 16 / 5
    for _, row in counts.iterrows():
        for name in ("tumor", "normal"):
            assert abs(row[f"test_{name}"] - ideal) < 1, row.to_dict()  # within one slide of ideal
            assert row[f"val_{name}"] >= 1 and row[f"train_{name}"] >= 1
        assert row["test_patients"] + row["val_patients"] + row["train_patients"] == 16
    for fold in range(5):
        roles = table[table.fold == fold].groupby("patient_id")["role"].nunique()
        assert (roles == 1).all(), "a patient's tumour and normal slide sit in different roles"
    assert counts["test_slides"].sum() == 32


def test_three_classes_with_multi_label_patients(tmp_path):
    rng = np.random.default_rng(11)
    rows = []
    for p in range(24):
        main = p % 3
        for s in range(int(rng.integers(1, 4))):
            y = main if s == 0 else int(rng.integers(3))  # some patients hold slides of two or three classes
            rows.append({"slide_id": f"P{p}_S{s}", "patient_id": f"P{p}", "label": ["LUAD", "LUSC", "normal"][y]})
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    labels = read_labels(path)
    assert labels.classes == ["LUAD", "LUSC", "normal"]
    table = make_splits(labels, TrainingConfig(folds=4, seeds=[0, 5]))
    counts = split_counts(table, labels.classes)
    totals = labels.df["label"].value_counts()
    for name in labels.classes:
        assert (counts[f"test_{name}"] >= 1).all() and (counts[f"train_{name}"] >= 1).all()
        # stratified on slides: each fold's share of a class is near a quarter of that class's slides
        assert (counts[f"test_{name}"] - totals[name] / 4).abs().max() <= 3
    assert (table.groupby(["seed", "fold", "patient_id"])["role"].nunique() == 1).all()


def test_split_counts_read_back_from_the_table(tmp_path):
    labels = _cohort(tmp_path, np.random.default_rng(4), 30, 2)
    table = make_splits(labels, TrainingConfig(folds=3, seeds=[0, 2]))
    counts = split_counts(table, labels.classes)
    assert list(counts.columns[:5]) == ["seed", "fold", "train_patients", "train_slides", "train_c0"]
    for _, row in counts.iterrows():
        part = table[(table.seed == row.seed) & (table.fold == row.fold)]
        for role in ("train", "val", "test"):
            sel = part[part.role == role]
            assert row[f"{role}_slides"] == len(sel) and row[f"{role}_patients"] == sel.patient_id.nunique()
            assert row[f"{role}_c0"] == (sel.y == 0).sum() and row[f"{role}_c1"] == (sel.y == 1).sum()


def test_check_splits_catches_leak(tmp_path):
    labels = _cohort(tmp_path, np.random.default_rng(1), 20, 2)
    table = make_splits(labels, TrainingConfig(folds=3))
    bad = table.copy()
    row = bad[(bad.seed == 0) & (bad.fold == 0) & (bad.role == "test")].index[0]
    patient = bad.loc[row, "patient_id"]
    other = bad[(bad.seed == 0) & (bad.fold == 0) & (bad.patient_id != patient) & (bad.role == "train")].index[0]
    bad.loc[other, "patient_id"] = patient
    with pytest.raises(WsiMilError, match="more than one role"):
        check_splits(bad)


def test_save_load_roundtrip(tmp_path):
    labels = _cohort(tmp_path, np.random.default_rng(2), 20, 2)
    table = make_splits(labels, TrainingConfig(folds=3))
    back = load_splits(save_splits(table, tmp_path / "s" / "splits.csv"))
    pd.testing.assert_frame_equal(table, back, check_dtype=False)


def test_folds_short_of_a_class_name_the_largest_fold_count_that_works(tmp_path):
    """A cohort that passes the patient count check but whose 5 grouped folds leave a test fold without tumour."""
    path = tmp_path / "labels.csv"
    pairs = [("tumor", 0), ("tumor", 1), ("normal", 1), ("normal", 2), ("normal", 3), ("normal", 4), ("tumor", 5),
             ("normal", 6), ("normal", 7), ("tumor", 6), ("tumor", 8), ("tumor", 8)]  # a `wsi-mil synth` cohort's shape
    path.write_text("slide_id,label,patient_id\n" + "".join(f"s{i},{lab},P{p}\n" for i, (lab, p) in enumerate(pairs)))
    labels = read_labels(path)
    with pytest.raises(WsiMilError) as info:
        make_splits(labels, TrainingConfig(folds=5))
    msg = str(info.value)
    assert "has no 'tumor' slide" in msg
    proposed = int(msg.split("--set training.folds=")[1].split(":")[0])
    assert 2 <= proposed < 5
    make_splits(labels, TrainingConfig(folds=proposed))  # what the message proposes works
    for more in range(proposed + 1, 5):  # and it is the largest that does
        with pytest.raises(WsiMilError):
            make_splits(labels, TrainingConfig(folds=more))
