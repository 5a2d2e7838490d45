"""`cdimf reproduce` end to end on real files: any pair by path, JSON output, clear config errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cdimf.common.config import ConfigError
from cdimf.reproduce_config import load_reproduce_config

ROOT = Path(__file__).resolve().parents[1]


def write_pair(folder: Path, seed: int = 0) -> None:
    """Two domains over 120 shared users with a planted 3-group taste structure, as CSV files."""
    rng = np.random.default_rng(seed)
    groups = np.arange(120) % 3
    for domain, n_items in (("shop", 60), ("video", 45)):
        item_groups = np.arange(n_items) % 3
        train, test = [], []
        for user in range(120):
            liked = np.flatnonzero(item_groups == groups[user])
            chosen = rng.choice(liked, size=8, replace=False)
            train += [(f"u{user}", f"{domain}-{item}") for item in chosen[:7]]
            test.append((f"u{user}", f"{domain}-{chosen[7]}"))
        (folder / f"{domain}_train.csv").write_text("user,item\n" + "\n".join(f"{u},{i}" for u, i in train) + "\n")
        (folder / f"{domain}_test.csv").write_text("user,item\n" + "\n".join(f"{u},{i}" for u, i in test) + "\n")


CONFIG = """
title = "synthetic pair"
models = ["ALS-separate", "ALS-joined", "CDIMF"]
[[domains]]
name = "shop"
data_format = "csv"
train_path = "shop_train.csv"
test_path = "shop_test.csv"
[[domains]]
name = "video"
data_format = "csv"
train_path = "video_train.csv"
test_path = "video_test.csv"
[evaluation]
n_negatives = 19
k = 10
[stopping]
max_rounds = 4
patience = 2
valid_negatives = 19
[separate]
rank = 4
alpha = 0.05
lam = 0.5
[joined]
rank = 4
alpha = 0.05
lam = 0.5
[cdimf.ials]
rank = 4
alpha = 0.05
lam = 0.5
[cdimf.admm]
rho = 1.0
[paper]
"CDIMF" = { shop = [50.0, 30.0] }
"""


def test_reproduce_any_pair_by_path_json(tmp_path: Path) -> None:
    """A pair in generic CSV, given only by paths in a config, trains all three models and reports JSON."""
    write_pair(tmp_path)
    config = tmp_path / "pair.toml"
    config.write_text(CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "cdimf", "reproduce", str(config), "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [r["model"] for r in report["results"]] == ["ALS-separate", "ALS-joined", "CDIMF"]
    for result in report["results"]:
        assert set(result["metrics"]) == {"shop", "video"}
        assert 1 <= result["rounds"] <= 4
        for metrics in result["metrics"].values():
            # every metric names its split and protocol, in % (the config's 19 negatives)
            assert {"test HR@10 (19 neg)", "test NDCG@10 (19 neg)", "test HR@10 (19 unseen neg)", "test NDCG@10 (19 unseen neg)",
                    "test HR@10 (full catalog)", "test NDCG@10 (full catalog)"} <= set(metrics)
            assert 0.0 <= metrics["test NDCG@10 (19 neg)"] <= metrics["test HR@10 (19 neg)"] <= 100.0
        assert result["validation_metric"] == "mean valid NDCG@10 (19 neg)"
        assert len(result["validation"]) >= result["rounds"] and all(0.0 <= v <= 100.0 for v in result["validation"])
    assert report["ok"] is True and report["unit"] == "%"
    assert report["paper"]["CDIMF"]["shop"] == {"test HR@10 (19 neg)": 50.0, "test NDCG@10 (19 neg)": 30.0}
    # with a planted group structure every model must beat random ranking (HR@10 = 10/20 = 50%)
    cdimf = report["results"][2]["metrics"]
    assert cdimf["shop"]["test HR@10 (19 neg)"] > 60 and cdimf["video"]["test HR@10 (19 neg)"] > 60
    # progress reaches stderr with --json too: each model, each round, the loading
    assert "reading " in done.stderr and "model 3/3: CDIMF" in done.stderr
    assert "CDIMF: early stopping: 1/4 rounds" in done.stderr


def test_reproduce_prints_table_with_paper_column(tmp_path: Path) -> None:
    """Without --json the table lists each model and domain with the paper's number beside ours."""
    write_pair(tmp_path, seed=1)
    config = tmp_path / "pair.toml"
    config.write_text(CONFIG.replace('models = ["ALS-separate", "ALS-joined", "CDIMF"]', 'models = ["CDIMF"]'))
    done = subprocess.run(
        [sys.executable, "-m", "cdimf", "reproduce", str(config)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("CDIMF")]
    assert len(lines) == 2
    assert "50.00" in lines[0] and "30.00" in lines[0]


def test_config_error_names_file_and_field(tmp_path: Path) -> None:
    """A bad value is reported with the file and the dotted field path."""
    config = tmp_path / "bad.toml"
    config.write_text(CONFIG.replace("rho = 1.0", "rho = -1.0"))
    line = CONFIG.splitlines().index("rho = 1.0") + 1
    with pytest.raises(ConfigError, match=rf"bad\.toml:{line}: field cdimf\.admm\.rho:"):
        load_reproduce_config(config)


def test_cli_reports_missing_data_file(tmp_path: Path) -> None:
    """A config pointing at a missing file fails with exit 2 and names the file."""
    config = tmp_path / "pair.toml"
    config.write_text(CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "cdimf", "reproduce", str(config)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 2
    assert "shop_train.csv" in done.stderr


def test_shipped_configs_load() -> None:
    """Both shipped configs validate and point at shipped files."""
    for name in ("warm-sport-cloth.toml", "cold-sport-cloth.toml"):
        config = load_reproduce_config(ROOT / "configs" / name)
        for domain in config.domains:
            assert domain.train_path.is_file() and domain.test_path is not None and domain.test_path.is_file()
