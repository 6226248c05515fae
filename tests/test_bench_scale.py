"""bench/scale.py runs: a smoke run of the scale bench (six local nodes), its figures printed and
every node done. The figures themselves depend on the machine and are not judged here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_scale_bench_quick_run_prints_its_figures_and_ends_done_everywhere() -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench/scale.py"), "--quick"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "rollout of 6 nodes, batches 1,50%, --parallel 4, --batch-parallel 64: done on 6 of 6 nodes" in out
    assert re.search(r"batch  1 \(   1 nodes\): +[\d.]+ s", out)
    assert re.search(r"batch  3 \(   2 nodes\): +[\d.]+ s", out)
    for figure, unit in (("controller CPU per node", "ms"), ("memory growth per node", "KiB"),
                         ("no-op re-run / baseline", "x")):
        assert re.search(rf"^{re.escape(figure)}: +-?[\d.]+ {unit} +goal <= [\d.]+ {unit}: (met|MISSED)$", out, re.M), out
    assert re.search(r"^controller peak memory: +[\d.]+ MiB", out, re.M), out
    assert re.search(r"^one helper status per node: +[\d.]+ ms", out, re.M), out
    assert re.search(r"^every node done, then skipped: +yes$", out, re.M), out
