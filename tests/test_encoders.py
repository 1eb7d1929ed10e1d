"""Encoder registry, weight sources (pretrained cache / local file / random) and their provenance."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from wsi_mil.config import FeaturesConfig
from wsi_mil.encoders import (
    ResNetTrunk,
    TinyCNN,
    build_encoder,
    encoder_key,
    list_encoders,
    pretrained_available,
)
from wsi_mil.errors import WsiMilError
from wsi_mil.extract import embed_patches


def reference_forward(model, patches, size, mean, std):
    """The encoder's transform written independently: scale, normalise, resize, forward."""
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return model.eval()(x).numpy()


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty torch-hub and Hugging Face caches, offline mode on."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("WSI_MIL_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize(("name", "dim", "size"), [("resnet18", 512, 224), ("tiny_cnn", 64, 64)])
def test_random_encoders_are_recorded_as_random_and_deterministic(name, dim, size):
    cfg = FeaturesConfig(encoder=name, weights="random")
    enc = build_encoder(cfg)
    assert (enc.dim, enc.input_size, enc.key) == (dim, size, f"{name}-random") and encoder_key(cfg) == enc.key
    attrs = enc.attrs()
    assert attrs["weights"] == "random" and attrs["weights_source"].startswith("random")
    assert attrs["weights_sha256"] == "" and attrs["transform"]["input_size"] == size
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = enc.model(x)
        again = build_encoder(cfg).model(x)  # seeded: every worker builds the same network
    assert out.shape == (2, dim)
    torch.testing.assert_close(out, again)


def test_registry_lists_builtins_and_accepts_timm_names():
    assert {"resnet50_trunc", "resnet18", "tiny_cnn"} <= set(list_encoders())
    enc = build_encoder(FeaturesConfig(encoder="resnet18.a1_in1k", weights="random"))
    assert enc.dim == 512 and enc.input_size == 224 and enc.key == "resnet18.a1_in1k-random"
    assert len(enc.mean) == 3 and "timm_version" in enc.attrs()


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(WsiMilError, match=r"unknown encoder 'resnt50'.*close names: .*resnet50"):
        build_encoder(FeaturesConfig(encoder="resnt50", weights="random"))


def test_pretrained_offline_cache_miss_names_the_remedy(empty_caches):
    for name in ("resnet50_trunc", "resnet18.a1_in1k"):
        cfg = FeaturesConfig(encoder=name, weights="pretrained")
        assert not pretrained_available(cfg)
        with pytest.raises(WsiMilError, match=r"not in the local cache.*--weights PATH.*--weights random"):
            build_encoder(cfg)
    with pytest.raises(WsiMilError, match="no pretrained weights.*--weights random"):
        build_encoder(FeaturesConfig(encoder="tiny_cnn", weights="pretrained"))
    with pytest.raises(WsiMilError, match="config.json.*not cached"):
        build_encoder(FeaturesConfig(encoder="hf-hub:SomeLab/some-model", weights="random"))


def test_pretrained_weights_found_in_torch_cache(empty_caches):
    """A checkpoint already in TORCH_HOME is used without any network access, with its sha256."""
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    cached = empty_caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    cfg = FeaturesConfig(encoder="resnet18", weights="pretrained")
    assert pretrained_available(cfg)
    enc = build_encoder(cfg)
    assert enc.key == "resnet18-imagenet"
    assert enc.weights_source.startswith("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    assert enc.weights_sha256 == sha256(cached)
    reference.fc = torch.nn.Identity()
    patches = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    expected = reference_forward(reference, patches, 224, enc.mean, enc.std)
    np.testing.assert_allclose(embed_patches(enc, patches, "cpu"), expected, rtol=1e-4, atol=1e-4)


def test_local_weights_file_round_trip_resnet18(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_site.pth"
    torch.save({"state_dict": reference.state_dict()}, path)  # a checkpoint dict wrapping the state dict
    cfg = FeaturesConfig(encoder="resnet18", weights=str(path))
    enc = build_encoder(cfg)
    digest = sha256(path)
    assert enc.weights_sha256 == digest and enc.attrs()["weights_sha256"] == digest
    assert enc.key == encoder_key(cfg) == f"resnet18-file-{digest[:8]}"
    assert enc.weights_source == f"file:{path.resolve()}"
    reference.fc = torch.nn.Identity()
    patches = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = reference_forward(reference, patches, 224, enc.mean, enc.std)
    np.testing.assert_allclose(embed_patches(enc, patches, "cpu", batch_size=2), expected, rtol=1e-4, atol=1e-4)


def test_resnet50_trunc_loads_a_full_resnet50_state_dict(tmp_path):
    """layer4/fc of a full torchvision ResNet-50 are ignored; features = layer3 output, average pooled."""
    torch.manual_seed(2)
    full = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pt"
    torch.save(full.state_dict(), path)
    enc = build_encoder(FeaturesConfig(encoder="resnet50_trunc", weights=str(path)))
    assert enc.dim == 1024 and enc.key.startswith("resnet50_trunc-file-")
    trunk = torch.nn.Sequential(full.conv1, full.bn1, full.relu, full.maxpool, full.layer1, full.layer2,
                                full.layer3, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    patches = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    expected = reference_forward(trunk, patches, 224, enc.mean, enc.std)
    got = embed_patches(enc, patches, "cpu")
    assert got.shape == (2, 1024)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_safetensors_weights(tmp_path):
    torch.manual_seed(4)
    reference = TinyCNN()
    path = tmp_path / "tiny.safetensors"
    save_file(reference.state_dict(), str(path))
    enc = build_encoder(FeaturesConfig(encoder="tiny_cnn", weights=str(path)))
    assert enc.weights_sha256 == sha256(path)
    patches = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(embed_patches(enc, patches, "cpu"),
                               reference_forward(reference, patches, 64, enc.mean, enc.std), rtol=1e-5, atol=1e-5)


def test_bad_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(WsiMilError, match="does not exist"):
        build_encoder(FeaturesConfig(encoder="tiny_cnn", weights=str(tmp_path / "nope.pt")))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(WsiMilError, match=r"corrupt.pt cannot be read"):
        build_encoder(FeaturesConfig(encoder="tiny_cnn", weights=str(corrupt)))
    other = tmp_path / "resnet18.pt"
    torch.save(ResNetTrunk(torchvision.models.resnet18(weights=None), 4).state_dict(), other)
    with pytest.raises(WsiMilError, match=r"do not fit encoder tiny_cnn: \d+ missing keys .* unexpected keys"):
        build_encoder(FeaturesConfig(encoder="tiny_cnn", weights=str(other)))
    resized = TinyCNN(dim=32)
    wrong_shape = tmp_path / "tiny32.pt"
    torch.save(resized.state_dict(), wrong_shape)
    with pytest.raises(WsiMilError, match="do not fit encoder tiny_cnn.*size mismatch"):
        build_encoder(FeaturesConfig(encoder="tiny_cnn", weights=str(wrong_shape)))


def test_timm_vit_built_with_img_size_is_fed_that_size():
    cfg = FeaturesConfig(encoder="test_vit", weights="random", encoder_kwargs={"img_size": 64})
    encoder = build_encoder(cfg)
    assert encoder.input_size == 64
    patches = np.random.default_rng(0).integers(0, 255, size=(2, 96, 96, 3), dtype=np.uint8)
    features = embed_patches(encoder, patches, batch_size=2)
    assert features.shape == (2, encoder.dim)
