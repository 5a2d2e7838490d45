"""The shipped warm Sport&Cloth pair under `cdimf simulate`, secure vs plain: the masks cost no accuracy (0.1 point)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdimf.aggregator.store import stored_run_arrays
from tests.federation_harness import REPO_ROOT

pytestmark = pytest.mark.timeout(120)


def warm_pair(work: Path, secure: bool) -> dict[str, Any]:
    """`cdimf simulate --json` on the embedded warm Sport&Cloth pair at rank 8 for 3 rounds (no per-round validation)."""
    arguments = ["--insecure", "--rounds", "3", "--rank", "8", "--validation-every", "0", "--work-dir", str(work), "--json"]
    done = subprocess.run([sys.executable, "-m", "cdimf", "simulate", *arguments, *(["--secure-aggregation"] if secure else [])],
                          cwd=REPO_ROOT, capture_output=True, timeout=100)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return json.loads(done.stdout)


def test_the_warm_pair_secure_scores_within_a_tenth_of_a_point_of_plain(tmp_path: Path) -> None:
    """The shipped warm pair trained secure and plain: every test metric of every domain within 0.1 point."""
    secure = warm_pair(tmp_path / "secure", secure=True)
    plain = warm_pair(tmp_path / "plain", secure=False)
    assert secure["domains"].keys() == plain["domains"].keys() == {"sport", "cloth"}
    for name, row in plain["domains"].items():
        assert row["split"] == "test" and row["round"] == 3
        assert row["metrics"].keys() == secure["domains"][name]["metrics"].keys() and row["metrics"]
        for label, value in row["metrics"].items():
            assert abs(secure["domains"][name]["metrics"][label] - value) <= 0.1, (name, label)
        assert max(row["metrics"].values()) > 1.0  # a model that learned something: the comparison is not of zeros
    saved = stored_run_arrays(tmp_path / "secure" / "state" / "aggregator")
    assert saved["consensus"].dtype == np.uint64 and json.loads(saved["meta"].tobytes())["params"]["secure_aggregation"]
