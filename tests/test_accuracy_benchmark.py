"""benchmarks/accuracy.py --quick: every model trains and is scored, and the RESULT lines come last."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_accuracy_quick_mode_prints_the_table_and_both_result_lines() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--workers", "1",
           "--prevalences", "0.02"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("RESULT mhim_minus_baseline_auc_min ")
    assert lines[-1].startswith("RESULT ins_instance_auc ")
    gap, ins = float(lines[-2].split()[-1]), float(lines[-1].split()[-1])
    assert math.isfinite(gap) and -1.0 <= gap <= 1.0
    assert math.isfinite(ins) and 0.0 <= ins <= 1.0
    for model in ("abmil", "transmil", "dsmil", "mhim(abmil)", "mhim(transmil)", "mhim(dsmil)", "ins"):
        assert any(line.startswith(f"| {model} |") for line in lines), model
