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
    done = run_reproduce(tmp_path, CONFIG)
    report = json.loads(done.stdout)
    assert [r["model"] for r in report["results"]] == ["ALS-separate", "ALS-joined", "CDIMF"]
    for result in report["results"]:
        assert set(result["metrics"]) == {"shop", "video"}
        assert_early_stopped(result["validation"], result["rounds"], max_rounds=4, patience=2)
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


def assert_early_stopped(history: list[float], rounds: int, max_rounds: int, patience: int) -> None:
    """The stopping rule, by hand: the chosen round is the first best validation NDCG, and training
    went on until `patience` rounds without a gain past it or `max_rounds`."""
    best = int(np.argmax(history)) + 1  # argmax returns the first of equal maxima: a tie is no gain
    assert rounds == best
    assert len(history) == min(max_rounds, best + patience)
    assert all(value <= history[best - 1] for value in history)


G = 4  # taste groups; item j of a domain belongs to group j % G


def write_cross_domain_pair(folder: Path, seed: int, cold_only_test: bool = False) -> np.ndarray:
    """A pair built so that CDIMF >= ALS-joined >= ALS-separate on `shop`; each user's kind (0, 1, 2).

    120 users in G taste groups. Kind 0 likes its group's items in both domains; kind 1 (the
    "contradictory" users) likes group g in shop but group g + 1 in video, with 14 video items
    against 8 shop ones; kind 2 is cold in shop (no shop training, a shop test item), its shop
    taste only readable from video. Hence:
    - ALS-separate has no shop factor for kind 2 and ranks their targets last: HR at most 2/3;
    - ALS-joined transfers kind 2's taste, but its one user factor follows kind 1's video taste;
    - CDIMF transfers kind 2's taste through the consensus (its only holder is video) and, with a
      small rho over a few rounds, keeps kind 1's local shop factor close to its own shop taste.
    Video: every user trains on 14 of its group's 15 items and is tested on the 15th, the only
    untrained item of its group, so any model that learnt the groups ranks it first (HR = NDCG = 1).
    """
    rng = np.random.default_rng(seed)
    users = np.arange(120)
    group = users % G
    kind = (users // G) % 3
    taste = {"shop": group, "video": np.where(kind == 1, (group + 1) % G, group)}
    for domain, n_items, n_train in (("shop", 40, 8), ("video", 60, 14)):
        train, test = [], []
        for user in users:
            liked = np.flatnonzero(np.arange(n_items) % G == taste[domain][user])
            chosen = rng.choice(liked, size=n_train + 1, replace=False)
            if not (domain == "shop" and kind[user] == 2):
                train += [(f"u{user}", f"{domain}-{item}") for item in chosen[:n_train]]
            if not (cold_only_test and domain == "shop" and kind[user] != 2):
                test.append((f"u{user}", f"{domain}-{chosen[n_train]}"))
        (folder / f"{domain}_train.csv").write_text("user,item\n" + "\n".join(f"{u},{i}" for u, i in train) + "\n")
        (folder / f"{domain}_test.csv").write_text("user,item\n" + "\n".join(f"{u},{i}" for u, i in test) + "\n")
    return kind


CROSS_CONFIG = (
    CONFIG.replace("max_rounds = 4", "max_rounds = 8")
    .replace("rank = 4", "rank = 8")
    .replace("rho = 1.0", "rho = 0.1")
    .replace('[paper]\n"CDIMF" = { shop = [50.0, 30.0] }\n', "")
)


def run_reproduce(folder: Path, config_text: str) -> subprocess.CompletedProcess[str]:
    """Run the real `cdimf reproduce --json` on the config text written into `folder`; it must succeed."""
    config = folder / "pair.toml"
    config.write_text(config_text)
    done = subprocess.run(
        [sys.executable, "-m", "cdimf", "reproduce", str(config), "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done


def reproduce_json(folder: Path, config_text: str) -> dict:
    """The JSON report of `run_reproduce`."""
    return json.loads(run_reproduce(folder, config_text).stdout)


HR, NDCG = "test HR@10 (19 neg)", "test NDCG@10 (19 neg)"  # reproduce's labels at the configs' 19 negatives, in %


def test_reproduce_orders_cdimf_over_joined_over_separate_on_a_pair_built_for_it(tmp_path: Path) -> None:
    """On the pair above, shop's test metrics order CDIMF >= ALS-joined >= ALS-separate with margins,
    and video's sole untrained group item is ranked first by every model."""
    kind = write_cross_domain_pair(tmp_path, seed=0)
    report = reproduce_json(tmp_path, CROSS_CONFIG)
    by_model = {r["model"]: r for r in report["results"]}
    separate, joined, cdimf = (by_model[m]["metrics"]["shop"] for m in ("ALS-separate", "ALS-joined", "CDIMF"))
    # a third of shop's test rows are cold users' (0 each for ALS-separate)
    assert np.mean(kind != 2) == pytest.approx(2 / 3)
    assert separate[HR] <= 100 * 2 / 3 + 1e-3  # the JSON's % carry 4 decimals
    assert joined[HR] >= separate[HR] + 25
    assert joined[NDCG] >= separate[NDCG] + 10
    assert cdimf[HR] >= joined[HR]
    assert cdimf[NDCG] >= joined[NDCG] + 2
    for result in report["results"]:
        assert result["metrics"]["video"][HR] == pytest.approx(100.0) and result["metrics"]["video"][NDCG] == pytest.approx(100.0)
        assert_early_stopped(result["validation"], result["rounds"], max_rounds=8, patience=2)


def test_als_separate_ranks_cold_users_targets_last_while_joined_and_cdimf_transfer_their_taste(tmp_path: Path) -> None:
    """Scored on cold users only: ALS-separate has no factor for them, every candidate ties and ties
    count against the target, so it ranks last (HR = NDCG = 0 exactly); the two models that see
    video place nearly every target in the top 10 (a group holds 10 of shop's 40 items)."""
    write_cross_domain_pair(tmp_path, seed=0, cold_only_test=True)
    report = reproduce_json(tmp_path, CROSS_CONFIG)
    by_model = {r["model"]: r["metrics"]["shop"] for r in report["results"]}
    assert by_model["ALS-separate"][HR] == 0.0 and by_model["ALS-separate"][NDCG] == 0.0
    assert by_model["ALS-joined"][HR] >= 90 and by_model["CDIMF"][HR] >= 90


def test_the_test_files_never_change_the_chosen_rounds_and_the_refit_trains_on_all_of_train(tmp_path: Path) -> None:
    """Test data is read only for the final table: other test files give the same validation
    histories and rounds. With refit, the final model's training set holds the carved validation
    pairs again: a test file of every training pair is then seen in full, without refit short of
    one carved pair per user (every user here has 8 or 14 training items, none an orphan)."""
    write_cross_domain_pair(tmp_path, seed=0)
    config = CROSS_CONFIG.replace('models = ["ALS-separate", "ALS-joined", "CDIMF"]', 'models = ["ALS-separate", "CDIMF"]')
    config = config.replace("[evaluation]\n", '[evaluation]\nseen_test_pairs = "keep"\n')
    first = reproduce_json(tmp_path, config)
    for domain in ("shop", "video"):
        (tmp_path / f"{domain}_test.csv").write_text((tmp_path / f"{domain}_train.csv").read_text())
    trained_on = {d: len((tmp_path / f"{d}_train.csv").read_text().splitlines()) - 1 for d in ("shop", "video")}
    users_in = {"shop": 80, "video": 120}
    refit = reproduce_json(tmp_path, config)
    kept = reproduce_json(tmp_path, config.replace("patience = 2\n", "patience = 2\nrefit = false\n"))
    for a, b, c in zip(first["results"], refit["results"], kept["results"]):
        assert a["validation"] == b["validation"] == c["validation"] and a["rounds"] == b["rounds"] == c["rounds"]
        assert b["seen_test_pairs"] == trained_on
        assert c["seen_test_pairs"] == {d: trained_on[d] - users_in[d] for d in trained_on}


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
