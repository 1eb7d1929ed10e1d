"""File formats: atomic writes, patch store round trip, HDF5 bags readable CLAM-style."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsi_mil import stores
from wsi_mil.errors import WsiMilError


def make_store(tmp_path, n=10, p=16, chunk=4):
    final = tmp_path / "s.zarr"
    tmp = stores.partial_path(final)
    group = stores.create_patch_store(tmp, n_patches=n, patch_size=p, chunk_patches=chunk, attrs={"target_mpp": 0.5})
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 255, size=(n, p, p, 3), dtype=np.uint8)
    coords = np.stack([np.arange(n) * 100, np.arange(n) * 7], axis=1)
    group["patches"][:] = patches
    group["coords"][:] = coords
    return final, tmp, patches, coords


def test_patch_store_is_invisible_until_committed(tmp_path):
    final, tmp, patches, coords = make_store(tmp_path)
    assert not stores.is_complete_store(final)
    assert not stores.is_complete_store(tmp)  # written but not marked complete
    with pytest.raises(WsiMilError, match="does not exist"):
        stores.open_patch_store(final)
    stores.mark_complete(tmp)
    stores.commit(tmp, final)
    store = stores.open_patch_store(final)
    assert len(store) == 10 and store.patch_size == 16
    np.testing.assert_array_equal(store.patches[:], patches)
    np.testing.assert_array_equal(store.coords, coords)
    assert store.attrs["target_mpp"] == 0.5 and store.attrs["complete"] is True


def test_incomplete_store_gives_clear_error(tmp_path):
    final, tmp, _, _ = make_store(tmp_path)
    stores.commit(tmp, final)  # renamed without being marked complete (e.g. a foreign tool)
    with pytest.raises(WsiMilError, match="incomplete or unreadable; rerun `wsi-mil tile`"):
        stores.open_patch_store(final)


def test_commit_replaces_existing_directory(tmp_path):
    final, tmp, _, _ = make_store(tmp_path)
    stores.mark_complete(tmp)
    stores.commit(tmp, final)
    _, tmp2, patches2, _ = make_store(tmp_path, n=3)
    stores.mark_complete(tmp2)
    stores.commit(tmp2, final)
    assert len(stores.open_patch_store(final)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_clean_partials_removes_leftovers_only(tmp_path):
    final, tmp, _, _ = make_store(tmp_path)
    (tmp_path / "keep.h5").write_text("x")
    assert stores.clean_partials(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5"]


def test_atomic_output_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    stores.write_text_atomic(target, "good")
    with pytest.raises(RuntimeError), stores.atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_bag_round_trip_and_clam_reader(tmp_path):
    feats = np.random.default_rng(1).normal(size=(50, 32)).astype(np.float32)
    coords = np.arange(100).reshape(50, 2)
    attrs = {"encoder": "resnet50_trunc", "patch_size": 256, "patch_level": 0, "tiling": {"mpp": 0.5}}
    path = tmp_path / "x.h5"
    stores.write_bag(path, feats, coords, attrs)
    bag = stores.read_bag(path)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["tiling"] == {"mpp": 0.5} and bag.attrs["encoder"] == "resnet50_trunc"
    with h5py.File(path, "r") as f:  # what CLAM's readers do
        assert f["features"].shape == (50, 32)
        assert f["coords"].attrs["patch_size"] == 256 and f["coords"].attrs["patch_level"] == 0
        assert f["features"].chunks[0] > 1  # not one row per chunk


def test_bad_bags_are_named(tmp_path):
    with pytest.raises(WsiMilError, match="does not exist"):
        stores.read_bag(tmp_path / "missing.h5")
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    with pytest.raises(WsiMilError, match=r"broken.h5 is unreadable"):
        stores.read_bag(broken)
    with pytest.raises(ValueError):
        stores.write_bag(tmp_path / "y.h5", np.zeros((3, 4)), np.zeros((2, 2)))
