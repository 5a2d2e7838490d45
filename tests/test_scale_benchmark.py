"""benchmarks/scale.py at a tiny size: it runs the whole federation for real and reports what it promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(240)


def test_scale_benchmark_runs_tiny_and_reports_every_ratio(tmp_path: Path) -> None:
    command = [sys.executable, "benchmarks/scale.py", "--users", "300", "--items", "60", "--interactions", "1500", "--domains", "2",
               "--rank", "4", "--rounds", "2", "--work-dir", str(tmp_path), "--json"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(done.stdout)
    # 300 users per domain, half shared: 150 shared rows in each of the two contributions, and Z
    # over those 150 exchanged rows, rank 4 float32
    assert row["aggregator_held_mb"] * (1 << 20) == pytest.approx((150 + 150 + 150) * 4 * 4)
    assert set(row["node_peak_mb"]) == {"node-d0", "node-d1"}
    assert all(peak > 10 for peak in row["node_peak_mb"].values())
    assert row["aggregator_peak_mb"] > 10 and row["implicit_peak_mb"] > 10
    assert len(row["round_s"]) == 2 and len(row["engine_round_s"]) == 2
    assert row["startup_s"] > 0 and row["epoch_s"] > 0
    assert row["node_over_implicit"]["node-d0"] == pytest.approx(row["node_peak_mb"]["node-d0"] / row["implicit_peak_mb"])
