"""benchmarks/gpu_check.py in its CPU mode: every part runs the real code and reports what a CPU can show."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("abmil", "transmil", "mhim_abmil", "mhim_transmil", "ins")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def check() -> tuple[str, dict[str, str]]:
    """One CPU-mode run (small sizes, one torch thread): its stdout and its RESULT lines."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--threads", "1",
           "--budget-s", "900"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            _, name, value = line.split(maxsplit=2)
            assert name not in results, f"RESULT {name} printed twice"
            results[name] = value
    return proc.stdout, results


def number(results: dict[str, str], name: str) -> float:
    assert name in results, f"RESULT {name} missing; got {sorted(results)}"
    value = float(results[name])
    assert math.isfinite(value), f"RESULT {name} {results[name]}"
    return value


def test_every_part_runs_on_cpu_without_failing(check: tuple[str, dict[str, str]]) -> None:
    stdout, results = check
    for heading in ("(1) extract vs forward alone", "(2) out-of-memory retry", "(3) MIL", "(4) features"):
        assert heading in stdout
    assert not [name for name in results if "failed" in name], stdout[-3000:]
    assert not [name for name, value in results.items() if value == "skipped" and not name.startswith("oom_")]
    assert number(results, "gpu_check_seconds") > 0


def test_extract_ratios_are_measured_in_fp32_and_amp_is_not_applicable_on_cpu(check) -> None:
    _, results = check
    assert number(results, "extract_reader_patches_per_s") > 0
    for role in ("cnn", "vit"):
        # the whole call does the forward pass and more: a positive ratio, not far above 1 even on a noisy machine
        assert 0 < number(results, f"extract_ratio_fp32_{role}") < 2
        steady = results[f"extract_steady_ratio_fp32_{role}"]
        assert steady == "nan" or float(steady) > 0
        assert results[f"extract_ratio_amp_{role}"] == "n/a"
        assert results[f"extract_steady_ratio_amp_{role}"] == "n/a"


def test_oom_part_is_reported_as_skipped_without_cuda(check) -> None:
    stdout, results = check
    assert results["oom_recovered"] == "skipped"
    assert results["oom_feature_maxdiff"] == "skipped"
    assert "skipped: no CUDA device" in stdout


def test_every_mil_method_trains_two_epochs_with_time_and_memory(check) -> None:
    _, results = check
    for method in METHODS:
        assert number(results, f"mil_s_per_epoch_{method}") > 0
        assert number(results, f"mil_peak_mb_{method}") >= 0
    for student in ("abmil", "transmil"):
        assert number(results, f"mhim_{student}_time_ratio") > 0
        assert results[f"mhim_{student}_memory_ratio"] == "n/a"  # a device-memory ratio, CUDA only


def test_extractor_stream_gives_the_direct_embedding_of_the_same_patches(check) -> None:
    stdout, results = check
    assert "a path check, not a device comparison" in stdout
    for role in ("cnn", "vit"):
        # same device, same batches: reader order, batching and the HDF5 round trip must change nothing
        assert number(results, f"features_vs_cpu_maxdiff_fp32_{role}") < 1e-5
        assert results[f"features_vs_cpu_maxdiff_amp_{role}"] == "n/a"
