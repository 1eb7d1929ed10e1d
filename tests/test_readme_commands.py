"""The README's own-slides commands, run literally on a small synthetic cohort offline: they work or stop
before any tiling with one sentence; `run` finds a synthetic cohort's ground truth by itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from wsi_mil.workflows.cohort import preflight

from wsi_mil.cli import build_parser, main
from wsi_mil.config import load_config
from wsi_mil.synth import generate_cohort

ROOT = Path(__file__).resolve().parents[1]


def own_slides_commands() -> list[list[str]]:
    """The `wsi-mil ...` lines of the README's first code block under "## Your own slides" (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own slides", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip().startswith("wsi-mil ")]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("readme"), n_slides=12, seed=3, size=2048, tumour="large")


def _literal(command: list[str], slides: Path, labels: Path, out: Path) -> list[str]:
    swap = {"/data/slides": str(slides), "labels.csv": str(labels), "/data/out": str(out)}
    return [swap.get(a, a) for a in command[1:]]


SMALL_COHORT = "--set training.folds=3"  # what the README tells a small cohort to add


@pytest.mark.parametrize("small_cohort_flag", [False, True])
def test_readme_own_slides_commands_work_or_stop_before_tiling_with_one_sentence(cohort, small_cohort_flag, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's --config paths are relative to the repository
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-cache"))  # offline and nothing cached
    commands = own_slides_commands()
    assert [c[1] for c in commands] == ["run", "runs", "ui"]
    out = tmp_path / "out"
    for command in commands:
        build_parser().parse_args(_literal(command, cohort.slides_dir, cohort.labels_csv, out))  # valid as written
    assert f"`{SMALL_COHORT}`" in (ROOT / "README.md").read_text()
    args = _literal(commands[0], cohort.slides_dir, cohort.labels_csv, out)
    code = main([*args, *shlex.split(SMALL_COHORT)] if small_cohort_flag else args)
    err = capsys.readouterr().err.strip()
    if code == 0:
        assert (out / "results" / "summary.md").is_file()
        return
    assert code == 2 and "\n" not in err and err.endswith(".")
    assert not (out / "tiles").exists() and not (out / "slides.csv").exists()  # stopped before any tiling
    if small_cohort_flag:  # folds fit: offline, the encoder's weights are what stops it, with the --weights choices
        assert "resnet50_trunc" in err and "--weights random" in err and "--weights PATH" in err
    else:  # 12 slides cannot fill 5 folds with both classes: it says so and how to fix it
        assert "folds" in err and "Lower training.folds" in err


def test_run_finds_a_synthetic_cohorts_truth_beside_its_slides(cohort, caplog):
    cfg = load_config(None, [f"training.labels_csv={cohort.labels_csv}", "training.folds=3",
                             "features.weights=random"])
    assert cfg.training.annotations_dir is None
    with caplog.at_level("INFO"):
        found = preflight(cohort.slides_dir, cfg)
    assert Path(found.training.annotations_dir) == cohort.truth_dir.resolve()
    assert "ground truth for" in caplog.text
    chosen = preflight(cohort.slides_dir, cfg.with_overrides({"training.annotations_dir": str(cohort.slides_dir)}))
    assert Path(chosen.training.annotations_dir) == cohort.slides_dir  # the user's folder wins
    assert "annotates none of the 12 slides" in caplog.text
