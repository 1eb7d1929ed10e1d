"""Settings that cannot work together are refused when the config is loaded, before any work or store."""

from __future__ import annotations

import pytest
from helpers.milcore import write_cohort

from wsi_mil import cli
from wsi_mil.config import load_config
from wsi_mil.errors import ConfigError


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.name=transmil", "model.heads=7"], "model.hidden_dim (512) must be a multiple of model.heads (7)"),
    (["model.name=mhim", "model.mhim.student=transmil", "model.heads=7"], "for transmil (model.mhim.student)"),
    (["training.seeds=[0,1,0]"], "training.seeds lists seed(s) 0 more than once"),
    (["tracking.register_as=m", "tracking.log_model=false"], "tracking.register_as needs tracking.log_model=true"),
    (["tiling.overlap=256", "tiling.patch_size=256"], "must be smaller than tiling.patch_size"),
    (["model.name=ins", "training.classes=[a,b,c]"], "trains binary tasks only"),
])
def test_combinations_that_would_crash_later_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match="invalid setting") as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_train_with_heads_that_do_not_divide_hidden_dim_stops_before_any_store(tmp_path, capsys):
    bags, labels = write_cohort(tmp_path / "data", n_slides=6, dim=8)
    out = tmp_path / "out"
    code = cli.main(["train", str(out), "--labels", str(labels), "--model", "transmil", "--set", "model.heads=7",
                     "--set", f"training.features_dir={bags}"])
    assert code == cli.EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert "model.heads (7)" in err and len(err.splitlines()) == 1
    assert not out.exists()  # no labels read into it, no MLflow store, no parent run
