"""Configuration: defaults, YAML merge, overrides and the clarity of every error."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from wsi_mil.cli import main
from wsi_mil.config import Config, load_config, parse_override
from wsi_mil.errors import ConfigError
from wsi_mil.layout import tiling_key

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_validate_and_flatten():
    cfg = load_config()
    assert cfg.tiling.target_mpp == 0.5 and cfg.tiling.patch_size == 256
    flat = cfg.flat()
    assert flat["tiling.patch_size"] == 256
    assert flat["model.mhim.cl_alpha"] == cfg.model.mhim.cl_alpha
    assert all("." in key for key in flat)


def test_yaml_merges_over_defaults(tmp_path):
    path = write(tmp_path / "exp.yaml", "tiling:\n  patch_size: 224\nmodel:\n  mhim:\n    cl_alpha: 0.5\n")
    cfg = load_config(path)
    assert cfg.tiling.patch_size == 224
    assert cfg.model.mhim.cl_alpha == 0.5
    assert cfg.tiling.target_mpp == 0.5  # untouched default


def test_override_wins_over_file(tmp_path):
    path = write(tmp_path / "exp.yaml", "training:\n  epochs: 50\n")
    cfg = load_config(path, ["training.epochs=7", "training.seeds=[1, 2]"])
    assert cfg.training.epochs == 7
    assert cfg.training.seeds == [1, 2]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tiling:\n  patch_sz: 224\n", "unknown config key 'tiling.patch_sz'"),
        ("tilling:\n  patch_size: 224\n", "unknown config key 'tilling'"),
        ("tiling:\n  patch_size: big\n", "'tiling.patch_size'"),
        ("tiling:\n  target_mpp: -1\n", "'tiling.target_mpp'"),
        ("tiling:\n  patch_size: 256\n  overlap: 300\n", "overlap"),
        ("model:\n  name: resnet\n", "'model.name'"),
        ("tiling: 5\n", "'tiling' must be a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("tiling: [\n", "not valid YAML"),
    ],
)
def test_bad_config_files_name_the_key_and_file(tmp_path, text, fragment):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_missing_referenced_file_is_named(tmp_path):
    path = write(tmp_path / "exp.yaml", "training:\n  labels_csv: labels.csv\n")
    with pytest.raises(ConfigError, match=r"training.labels_csv: file .*labels.csv does not exist"):
        load_config(path)
    (tmp_path / "labels.csv").write_text("slide_id,label\n")
    assert load_config(path).training.labels_csv == (tmp_path / "labels.csv").resolve()


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("training.epochs")
    with pytest.raises(ConfigError, match="unknown config key 'training.epoch'"):
        load_config(None, ["training.epoch=3"])


def test_tiling_key_changes_with_patch_settings():
    base = Config()
    assert tiling_key(base) == tiling_key(Config())
    assert tiling_key(base).startswith("mpp0.50_px256_ov0_t")
    assert tiling_key(base.with_overrides({"tiling.patch_size": 224})) != tiling_key(base)
    assert tiling_key(base.with_overrides({"tissue.min_saturation": 30})) != tiling_key(base)
    assert tiling_key(base.with_overrides({"tiling.tissue_threshold": 0.7})) != tiling_key(base)
    # settings that do not change the patches keep the key
    assert tiling_key(base.with_overrides({"training.epochs": 3})) == tiling_key(base)


def test_every_preset_in_configs_validates():
    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert presets, "configs/ must hold presets"
    for preset in presets:
        load_config(preset)


def test_cli_config_show_and_exit_code(tmp_path, capsys):
    assert main(["config", "show", "--set", "training.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
    bad = write(tmp_path / "bad.yaml", "tiling:\n  nope: 1\n")
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'tiling.nope'" in err and str(bad) in err
    assert len(err.strip().splitlines()) == 1  # one clear sentence, no traceback


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "wsi_mil.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "wsi-mil" in out.stdout


# ------------------------------------------------------------------------------ cross-field checks
@pytest.mark.parametrize("overrides, key", [
    (["model.name=transmil", "model.heads=7"], "for transmil (model.name)"),
    (["model.name=mhim", "model.mhim.student=transmil", "model.heads=7"], "for transmil (model.mhim.student)"),
])
def test_heads_that_do_not_divide_hidden_dim_fail_at_load_in_one_line(overrides, key, capsys):
    with pytest.raises(ConfigError, match=rf"model.hidden_dim \(512\) must be a multiple of model.heads \(7\) {re.escape(key)}"):
        load_config(None, overrides)
    assert main(["config", "show", *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.heads (7)" in err and "{" not in err
    load_config(None, ["model.name=abmil", "model.heads=7"])  # heads do not matter to ABMIL


def test_binary_only_models_refuse_more_classes_at_load():
    with pytest.raises(ConfigError, match=r"ins \(model.name\) trains binary tasks only but training.classes lists 3"):
        load_config(None, ["model.name=ins", "training.classes=[a,b,c]"])
    load_config(None, ["model.name=abmil", "training.classes=[a,b,c]"])


def test_run_checks_every_listed_model_before_any_work(tmp_path):
    from wsi_mil.workflows.cohort import run_cohort

    labels = write(tmp_path / "labels.csv", "slide_id,label\n")
    cfg = load_config(None, ["run.models=[abmil,transmil]", "model.heads=7"])
    with pytest.raises(ConfigError, match="run.models lists transmil: .*multiple of model.heads"):
        run_cohort(tmp_path / "no_slides_needed", labels, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- describe
def test_every_key_is_described_with_its_default(capsys):
    def keys(cls, prefix=""):
        for name, field in cls.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from keys(field.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field

    undocumented = [k for k, f in keys(Config) if not (f.description or "").strip()]
    assert undocumented == []
    assert main(["config", "show", "--describe", "--set", "training.epochs=7"]) == 0
    text = capsys.readouterr().out
    for key, field in keys(Config):
        assert f"  {key} = " in text, key
        assert field.description.split(";")[0][:40] in text, key
    assert "  training.epochs = 7  (default 200)" in text
    assert "One of: mean, max, abmil, gated_abmil, transmil, dsmil, mhim, ins." in text
    assert "  model.mhim.student = \"abmil\"\n" in text


def test_preset_usage_lines_are_commands_that_parse():
    from wsi_mil.cli import build_parser

    parser = build_parser()
    found = 0
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        text = preset.read_text()
        match = re.search(r"^# Usage: (wsi-mil .*?)(?=\n(?!#\s{2,})|\Z)", text, re.M | re.S)
        if not match:
            continue
        command = " ".join(line.lstrip("#").strip().rstrip("\\").strip() for line in match.group(1).splitlines())
        argv = shlex.split(command)[1:]
        args = parser.parse_args(argv)
        assert args.config == Path(f"configs/{preset.name}"), preset.name
        found += 1
    assert found >= 2
