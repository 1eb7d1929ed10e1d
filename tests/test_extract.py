"""Feature extraction: patch stores -> HDF5 bags (correctness, resume, bad input, OOM back-off, Dask, CLI)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_mil import stores
from wsi_mil.cli import main
from wsi_mil.config import Config, FeaturesConfig
from wsi_mil.encoders import EncoderSpec, TinyCNN, build_encoder, encoder_key, register_encoder
from wsi_mil.errors import SlideError
from wsi_mil.extract import embed_patches, extract_cohort
from wsi_mil.layout import Layout, tiling_key


class MemoryCappedCNN(TinyCNN):
    """TinyCNN that fails like a GPU out of memory when given more than ``cap`` patches at once."""

    cap = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.cap:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {x.shape[0]} patches")
        return super().forward(x)


register_encoder(EncoderSpec("test_capped_cnn", MemoryCappedCNN, dim=64, input_size=64))


def make_config(**features) -> Config:
    cfg = Config()
    cfg.features = FeaturesConfig(**{"encoder": "tiny_cnn", "weights": "random", "batch_size": 8,
                                     "device": "cpu", **features})
    return cfg


def write_store(path, patches, coords, *, complete=True, chunk=16, slide_id="s"):
    tmp = stores.partial_path(path)
    n, p = patches.shape[:2]
    group = stores.create_patch_store(tmp, n_patches=n, patch_size=p, chunk_patches=chunk, attrs={
        "slide_id": slide_id, "mpp_level0": 0.25, "target_mpp": 0.5, "patch_size_level0": 2 * p,
        "level": 0, "downsample": 1.0, "read_size": 2 * p, "slide_path": f"/slides/{slide_id}.svs"})
    group["patches"][:] = patches
    group["coords"][:] = coords
    if complete:
        stores.mark_complete(tmp)
    stores.commit(tmp, path)


def make_cohort(out, cfg, sizes=(20, 35, 50), patch=96, seed=0):
    """Small synthetic patch stores ``s0, s1, ...`` under OUT/tiles/<tiling>/; returns their content."""
    rng = np.random.default_rng(seed)
    layout, tiling = Layout(out), tiling_key(cfg)
    data = {}
    for i, n in enumerate(sizes):
        sid = f"s{i}"
        patches = rng.integers(0, 256, (n, patch, patch, 3), dtype=np.uint8)
        coords = np.stack([np.arange(n) * 2 * patch, np.full(n, 1000 * i)], axis=1).astype(np.int64)
        layout.tiles_dir(tiling).mkdir(parents=True, exist_ok=True)
        write_store(layout.patch_store(tiling, sid), patches, coords, slide_id=sid)
        data[sid] = (patches, coords)
    return data


def reference_features(cfg, patches):
    """Direct forward pass of the configured encoder, with the transform written independently."""
    enc = build_encoder(cfg.features)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(enc.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return enc.model.eval()(x).numpy()


def bag_path(out, cfg, sid):
    return Layout(out).bag(tiling_key(cfg), encoder_key(cfg.features), sid)


def test_bags_equal_direct_forward_and_carry_provenance(tmp_path):
    cfg = make_config()
    data = make_cohort(tmp_path, cfg)
    report = extract_cohort(tmp_path, cfg)
    assert [r.status for r in report.results] == ["done"] * 3 and report.patches_embedded == 105
    assert "3 done, 0 reused, 0 failed" in report.summary()
    for sid, (patches, coords) in data.items():
        bag = stores.read_bag(bag_path(tmp_path, cfg, sid))
        assert bag.features.dtype == np.float32 and bag.features.shape == (len(patches), 64)
        np.testing.assert_allclose(bag.features, reference_features(cfg, patches), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(bag.coords, coords)
        a = bag.attrs
        assert a["encoder"] == "tiny_cnn" and a["encoder_key"] == "tiny_cnn-random"
        assert a["weights"] == "random" and a["weights_source"].startswith("random")
        assert a["transform"]["input_size"] == 64 and a["transform"]["mean"] == [0.485, 0.456, 0.406]
        assert a["slide_id"] == sid and a["tiling_key"] == tiling_key(cfg) and a["n_patches"] == len(patches)
        assert a["mpp_level0"] == 0.25 and a["target_mpp"] == 0.5 and a["slide_path"] == f"/slides/{sid}.svs"
        assert a["patch_store"].endswith(f"{sid}.zarr") and a["target_patch_size"] == 96
        assert a["patch_size"] == 192 and a["patch_level"] == 0  # CLAM: side at patch_level
    status = Layout(tmp_path).extract_status(tiling_key(cfg), encoder_key(cfg.features)).read_text().splitlines()
    assert status[0].startswith("slide_id,status") and status[1].startswith("s0,done,20")


def test_clam_style_reader_reads_our_bags(tmp_path):
    cfg = make_config(precision="float16", export_pt=True)
    data = make_cohort(tmp_path, cfg, sizes=(20,))
    extract_cohort(tmp_path, cfg)
    path = bag_path(tmp_path, cfg, "s0")
    with h5py.File(path, "r") as f:  # what CLAM's dataset / heatmap code does
        features = torch.from_numpy(f["features"][:])
        coords = f["coords"][:]
        assert f["coords"].attrs["patch_size"] == 192 and f["coords"].attrs["patch_level"] == 0
        assert f.attrs["patch_size"] == 192 and f.attrs["patch_level"] == 0
        assert f["features"].dtype == np.float16 and f["features"].chunks is not None
    assert features.shape == (20, 64)
    np.testing.assert_array_equal(coords, data["s0"][1])
    exported = torch.load(path.with_suffix(".pt"), weights_only=True)
    assert exported.dtype == torch.float32 and exported.shape == (20, 64)
    np.testing.assert_allclose(exported.numpy().astype(np.float16), features.numpy())


def test_resume_skips_finished_bags_and_redoes_interrupted_ones(tmp_path):
    cfg = make_config()
    make_cohort(tmp_path, cfg, sizes=(20, 30))
    extract_cohort(tmp_path, cfg)
    done, lost = bag_path(tmp_path, cfg, "s0"), bag_path(tmp_path, cfg, "s1")
    mtime = done.stat().st_mtime_ns
    expected = stores.read_bag(lost).features
    lost.unlink()  # interrupted: the bag never got renamed into place, only a partial is left
    leftover = stores.partial_path(lost)
    leftover.write_bytes(b"half-written")
    report = extract_cohort(tmp_path, cfg)
    assert report.status_of("s0").status == "reused" and report.status_of("s1").status == "done"
    assert done.stat().st_mtime_ns == mtime and not leftover.exists()
    np.testing.assert_allclose(stores.read_bag(lost).features, expected, rtol=1e-5, atol=1e-6)
    # a bag from a different patch store (re-tiled slide) is stale and redone
    patches = np.zeros((12, 96, 96, 3), np.uint8)
    store = Layout(tmp_path).patch_store(tiling_key(cfg), "s0")
    write_store(store, patches, np.zeros((12, 2), np.int64), slide_id="s0")
    report = extract_cohort(tmp_path, cfg)
    assert report.status_of("s0").status == "done" and report.status_of("s1").status == "reused"
    assert stores.read_bag(done).features.shape == (12, 64)
    # patch stores deleted after embedding to save space: the bags stay valid
    stores.remove_path(Layout(tmp_path).patch_store(tiling_key(cfg), "s1"))
    report = extract_cohort(tmp_path, cfg, slide_ids=["s0", "s1"])
    assert [r.status for r in report.results] == ["reused", "reused"]


def test_missing_and_incomplete_stores_fail_clearly_while_others_complete(tmp_path):
    cfg = make_config()
    make_cohort(tmp_path, cfg, sizes=(20,))
    rng = np.random.default_rng(5)
    broken = Layout(tmp_path).patch_store(tiling_key(cfg), "broken")
    write_store(broken, rng.integers(0, 256, (10, 96, 96, 3), dtype=np.uint8), np.zeros((10, 2)), complete=False)
    # a store still being written by the tiler is not a slide
    stores.create_patch_store(stores.partial_path(Layout(tmp_path).patch_store(tiling_key(cfg), "busy")),
                              n_patches=4, patch_size=96, chunk_patches=4)
    report = extract_cohort(tmp_path, cfg, slide_ids=["s0", "missing", "broken"])
    assert report.status_of("s0").status == "done"
    assert "missing.zarr does not exist; run `wsi-mil tile` first" in report.status_of("missing").error
    assert "broken.zarr is incomplete" in report.status_of("broken").error
    assert not bag_path(tmp_path, cfg, "broken").exists()
    assert [r.slide_id for r in extract_cohort(tmp_path, cfg).results] == ["broken", "s0"]
    with pytest.raises(SlideError, match="slide missing: .*does not exist"):
        extract_cohort(tmp_path, cfg, slide_ids=["s0", "missing"], strict=True)


def test_unreadable_chunk_fails_only_its_slide(tmp_path):
    cfg = make_config()
    make_cohort(tmp_path, cfg, sizes=(32, 20))
    store = Layout(tmp_path).patch_store(tiling_key(cfg), "s0")
    chunk = next(p for p in (store / "patches").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage")  # corrupt compressed chunk
    report = extract_cohort(tmp_path, cfg)
    assert report.status_of("s1").status == "done"
    failed = report.status_of("s0")
    assert failed.status == "failed" and "cannot read patches" in failed.error and "s0.zarr" in failed.error


def test_nan_features_fail_the_slide_with_a_clear_error(tmp_path):
    weights = TinyCNN().state_dict()
    weights["features.0.weight"][0, 0, 0, 0] = float("nan")  # corrupt weights give NaN features
    path = tmp_path / "nan.pt"
    torch.save(weights, path)
    cfg = make_config(weights=str(path))
    make_cohort(tmp_path, cfg, sizes=(20, 20))
    report = extract_cohort(tmp_path, cfg)
    assert len(report.failed) == 2 and not bag_path(tmp_path, cfg, "s0").exists()
    assert "NaN/inf features for 20 of 20 patches" in report.status_of("s0").error
    with pytest.raises(SlideError, match="NaN/inf"):
        extract_cohort(tmp_path, cfg, strict=True)


def test_out_of_memory_batches_are_retried_smaller(tmp_path):
    cfg = make_config(encoder="test_capped_cnn", batch_size=16)
    data = make_cohort(tmp_path, cfg, sizes=(40,))
    report = extract_cohort(tmp_path, cfg)
    assert report.status_of("s0").status == "done"
    same_net = make_config()  # same seeded initialisation as tiny_cnn
    np.testing.assert_allclose(stores.read_bag(bag_path(tmp_path, cfg, "s0")).features,
                               reference_features(same_net, data["s0"][0]), rtol=1e-4, atol=1e-5)
    MemoryCappedCNN.cap = 0
    try:
        with pytest.raises(SlideError, match="out of memory .* even for a single patch"):
            embed_patches(build_encoder(cfg.features), data["s0"][0][:3], "cpu")
    finally:
        MemoryCappedCNN.cap = 4


def test_cluster_whose_worker_advertises_a_gpu_resource_embeds_every_slide_on_it(tmp_path):
    """A CPU worker advertising ``GPU=1``: tasks ask for that resource and still give the reference features."""
    import distributed

    cfg = make_config()
    data = make_cohort(tmp_path, cfg, sizes=(20, 24))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tcp",
                                  dashboard_address=":0", resources={"GPU": 1}) as cluster:
        cfg.compute.scheduler = cluster.scheduler_address
        report = extract_cohort(tmp_path, cfg, slide_ids=["s0", "s1", "nostore"])
    assert report.device.startswith("dask:")
    assert [r.status for r in report.results] == ["done", "done", "failed"]
    for sid, (patches, _) in data.items():
        np.testing.assert_allclose(stores.read_bag(bag_path(tmp_path, cfg, sid)).features,
                                   reference_features(cfg, patches), rtol=1e-4, atol=1e-5)


def test_cli_extract(tmp_path, capsys):
    cfg = make_config()
    make_cohort(tmp_path, cfg, sizes=(20,))
    args = ["extract", str(tmp_path), "--encoder", "tiny_cnn", "--weights", "random", "--device", "cpu",
            "--batch-size", "8"]
    assert main(args) == 0
    assert "1 done" in capsys.readouterr().out and bag_path(tmp_path, cfg, "s0").is_file()
    assert main(args) == 0 and "1 reused" in capsys.readouterr().out
    assert main(["extract", str(tmp_path), "--encoder", "no_such_net", "--weights", "random"]) == 2
    assert "unknown encoder 'no_such_net'" in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_failed_offline_extract_leaves_no_empty_bag_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty caches, offline
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("WSI_MIL_OFFLINE", "1")
    cfg = make_config()
    make_cohort(tmp_path, cfg, sizes=(20,))
    assert main(["extract", str(tmp_path), "--encoder", "resnet18", "--weights", "pretrained", "--device", "cpu"]) == 2
    assert "--weights random" in capsys.readouterr().err
    tiling = Layout(tmp_path).features_dir(tiling_key(cfg), "x").parent
    assert not (tiling / "resnet18-imagenet").exists() and not list(tiling.glob("resnet18-*"))


def test_each_slides_seconds_are_its_own_not_a_running_total(tmp_path):
    cfg = make_config()
    make_cohort(tmp_path, cfg, sizes=(40, 40, 40, 40))
    report = extract_cohort(tmp_path, cfg)
    seconds = [r.seconds for r in report.results]
    assert [r.status for r in report.results] == ["done"] * 4 and all(s > 0 for s in seconds)
    # running totals would add up to about twice the whole extraction; each slide's own time adds up to less
    assert sum(seconds) <= report.seconds
