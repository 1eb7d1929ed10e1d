"""The model registry is the one list of models: config validation, the factories and listings read it."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.cli import main
from wsi_mil.config import Config, load_config
from wsi_mil.errors import ConfigError
from wsi_mil.mil.base import FoldContext
from wsi_mil.mil.methods import BagMethod, build_method
from wsi_mil.mil.models import build_model
from wsi_mil.mil.pooling import MeanPoolMIL
from wsi_mil.registry import MODELS, builder, model_names, model_spec, register_model


@pytest.fixture
def tiny_model():
    """A user's aggregator, registered for the test and removed afterwards."""
    built: list[tuple[int, int, int]] = []

    def build(in_dim: int, n_classes: int, cfg) -> MeanPoolMIL:
        built.append((in_dim, n_classes, cfg.hidden_dim))
        return MeanPoolMIL(in_dim, n_classes, cfg.hidden_dim, cfg.dropout)

    register_model("tiny_pool", kind="aggregator", summary="a test model", student=True, build=build)
    yield built
    del MODELS["tiny_pool"]


def test_a_registered_model_is_accepted_by_config_factories_and_listing(tiny_model, capsys):
    cfg = load_config(None, ["model.name=tiny_pool", "model.hidden_dim=16", "run.models=[tiny_pool,mhim]",
                             "model.mhim.student=tiny_pool"])
    ctx = FoldContext(0, 0, [], [], 2, 12, torch.device("cpu"))
    method = build_method(cfg, ctx)
    assert isinstance(method, BagMethod) and isinstance(method.model, MeanPoolMIL)
    assert isinstance(build_model("tiny_pool", 12, 3, cfg.model), MeanPoolMIL)
    assert tiny_model == [(12, 2, 16), (12, 3, 16)]
    assert main(["config", "show", "--describe"]) == 0
    assert "tiny_pool*  [aggregator]  a test model" in capsys.readouterr().out


def test_unregistered_names_are_refused_everywhere_with_the_list():
    names = ", ".join(model_names())
    for override in ("model.name=tiny_pool", "run.models=[abmil,tiny_pool]"):
        with pytest.raises(ConfigError, match=f"unknown MIL model 'tiny_pool'; choose one of: {names}"):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="'mean' cannot be MHIM's student; choose one of: abmil, gated_abmil"):
        load_config(None, ["model.mhim.student=mean"])
    with pytest.raises(ConfigError, match="unknown MIL model 'tiny_pool'"):
        build_model("tiny_pool", 8, 2)
    with pytest.raises(ConfigError, match="'mhim' is not an aggregator"):
        build_model("mhim", 8, 2)


def test_every_registered_model_has_a_builder_and_builds():
    cfg = Config().with_overrides({"model.hidden_dim": 16, "model.attention_dim": 8, "model.heads": 4})
    ctx = FoldContext(0, 0, [], [], 2, 12, torch.device("cpu"))
    for name in model_names():
        assert model_spec(name).build is not None, name
        method = build_method(cfg.for_model(name), ctx)
        assert hasattr(method, "train_epoch") and hasattr(method, "predict"), name
    assert model_names("method") == ("mhim", "ins")
    assert set(model_names(student=True)) == {"abmil", "gated_abmil", "transmil", "dsmil"}


def test_registry_refuses_duplicates_and_unknown_builders():
    with pytest.raises(ConfigError, match="registered already"):
        register_model("abmil", kind="aggregator", summary="again")
    with pytest.raises(ConfigError, match="unknown MIL model 'nothing'"):
        builder("nothing")(lambda *a: None)
