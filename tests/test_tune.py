"""`cdimf tune` end to end on real files: a grid over rho on a synthetic pair given only by paths."""

import json
import subprocess
import sys
from pathlib import Path

from test_reproduce import CONFIG, write_pair


def test_tune_grid_by_path_json(tmp_path: Path) -> None:
    """Each grid value is one trial scored by its best validation round; the best trial wins."""
    write_pair(tmp_path)
    (tmp_path / "pair.toml").write_text(CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "cdimf", "tune", "pair.toml", "--models", "cdimf", "--grid", "rho=0,1", "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    trials = report["trials"]
    assert sorted(trial["settings"]["rho"] for trial in trials) == [0.0, 1.0]
    for trial in trials:
        history = trial["history"]
        assert trial["valid_ndcg"] == max(history)
        assert trial["rounds"] == history.index(max(history)) + 1
    assert report["best"]["cdimf"]["valid_ndcg"] == max(trial["valid_ndcg"] for trial in trials)
