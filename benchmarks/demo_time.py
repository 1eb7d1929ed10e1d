"""CPU and wall time of `wsi-mil demo`, per stage (goal: under 300 s of CPU on 2 cores).

Each repeat runs the real command in a fresh child process into a fresh folder; CPU is the child's
user + system time (``RUSAGE_CHILDREN``: its threads and its own children), which a busy machine
changes far less than the wall time. The demo's own per-stage table (wall and CPU) is kept from
the last repeat. The last line is ``RESULT demo_cpu_seconds <median>``.

    .venv/bin/python benchmarks/demo_time.py                 # 3 repeats
    .venv/bin/python benchmarks/demo_time.py --repeats 1
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_CPU_S = 300.0


def one_demo(out: Path) -> tuple[float, float, str]:
    """Run `wsi-mil demo --out OUT` once; (wall s, CPU s, the demo's stdout)."""
    exe = Path(sys.executable).parent / "wsi-mil"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), "-q", "demo", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "WSI_MIL_OFFLINE": os.environ.get("WSI_MIL_OFFLINE", "1")}, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"wsi-mil demo failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    walls, cpus, stdout = [], [], ""
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="wsi-mil-demo-bench-") as tmp:
            wall, cpu, stdout = one_demo(Path(tmp) / "demo")
        walls.append(wall)
        cpus.append(cpu)
        print(f"repeat {i + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU (load average {os.getloadavg()[0]:.1f})", flush=True)
    stages = stdout.split("Where the time went:", 1)[-1].split("Where to look:", 1)[0].rstrip()
    print(f"per stage (last repeat):{stages}")
    cpu = statistics.median(cpus)
    print(f"median of {len(cpus)}: {statistics.median(walls):.1f} s wall, {cpu:.1f} s CPU "
          f"(goal < {GOAL_CPU_S:.0f} s CPU: {'met' if cpu < GOAL_CPU_S else 'NOT met'}); {os.cpu_count()} cores")
    print(f"RESULT demo_cpu_seconds {cpu:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
