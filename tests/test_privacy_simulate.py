"""`cdimf simulate` with a [privacy] table: every node clips and noises what it pushes and the results carry each node's epsilon."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.federation_harness import DOMAINS, REPO_ROOT
from tests.test_privacy import analytic_epsilon
from tests.test_simulate import _config

pytestmark = pytest.mark.timeout(120)


def test_simulate_passes_privacy_to_every_node_and_reports_their_epsilon(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.write_text(config.read_text() + "\n[privacy]\nclip_norm = 0.1\nnoise_multiplier = 1.5\n")
    done = subprocess.run([sys.executable, "-m", "cdimf", "simulate", "--config", str(config), "--insecure", "--rounds", "2",
                           "--privacy-delta", "1e-6", "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    for domain in DOMAINS:
        row = results["domains"][domain]
        assert row["dp_delta"] == 1e-6 and row["dp_epsilon"] == pytest.approx(analytic_epsilon(1.5, 2, 1e-6), rel=0.03)
