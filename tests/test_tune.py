"""`cdimf tune` end to end on real files: Optuna trials on validation only, a runnable tuned config, test files never opened."""

import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from test_reproduce import CONFIG, write_pair

from cdimf import tune
from cdimf.reproduce import CDIMF, held_out, load_splits
from cdimf.reproduce_config import load_reproduce_config

ROOT = Path(__file__).resolve().parents[1]
OPENED: list[str] = []
RECORDING = [False]


def _record_opens(event: str, args: tuple) -> None:
    """Audit hook: every path opened while RECORDING (open() and os.open raise the 'open' event)."""
    if RECORDING[0] and event == "open" and isinstance(args[0], str | Path):
        OPENED.append(str(Path(args[0]).resolve()))


sys.addaudithook(_record_opens)


def brute_force_ndcg(users: np.ndarray, items: np.ndarray, candidates: np.ndarray, rows: np.ndarray, train: np.ndarray, k: int) -> float:
    """Mean NDCG@k by hand: rank = 1 + negatives scoring >= the target, the user's training items among negatives last."""
    total = 0.0
    for row, user in enumerate(rows):
        scores = items[candidates[row]] @ users[user]
        negatives = scores[1:].copy()
        negatives[train[user, candidates[row, 1:]] > 0] = -np.inf
        rank = 1 + int(np.sum(negatives >= scores[0]))
        total += 1.0 / np.log2(rank + 1) if rank <= k else 0.0
    return total / len(rows)


def test_tune_never_opens_test_files_and_writes_a_config_that_reproduces_its_best_trial(tmp_path: Path) -> None:
    """Trials score validation only (test files unopened); the written config re-trains to the best trial's value."""
    write_pair(tmp_path)
    (tmp_path / "pair.toml").write_text(CONFIG)
    output = tmp_path / "out" / "tuned.toml"
    output.parent.mkdir()
    stdout, stderr = StringIO(), StringIO()
    RECORDING[0] = True
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = tune.main([str(tmp_path / "pair.toml"), "--trials", "4", "--startup-trials", "2", "--seed", "3",
                              "--output", str(output), "--json"])
    finally:
        RECORDING[0] = False
    assert code == 0, stderr.getvalue()
    opened = set(OPENED)
    assert str((tmp_path / "shop_train.csv").resolve()) in opened  # the hook does see the data files
    assert not {str((tmp_path / f"{d}_test.csv").resolve()) for d in ("shop", "video")} & opened
    report = json.loads(stdout.getvalue())
    progress = [line for line in stderr.getvalue().splitlines() if " trial " in line]
    assert len(progress) == len(report["trials"]) == 12  # 4 trials x 3 models, one line each
    for model in ("separate", "joined", "cdimf"):
        trials = [t for t in report["trials"] if t["model"] == model]
        assert trials[0]["params"]["rank"] == 4 and trials[0]["state"] == "complete"  # the config's values first
        for trial in trials:
            assert trial["valid_ndcg"] == max(trial["history"])
            assert trial["rounds"] == trial["history"].index(max(trial["history"])) + 1
        complete = [t["valid_ndcg"] for t in trials if t["state"] == "complete"]
        assert report["best"][model]["valid_ndcg"] == max(complete)
    assert {"consensus", "aggregation_period", "alpha.shop", "nu.video"} <= set(report["best"]["cdimf"]["params"])

    tuned = load_reproduce_config(output)
    best = report["best"]["cdimf"]
    params = best["params"]
    assert tuned.cdimf.ials.rank == params["rank"] and tuned.cdimf.aggregation_period == params["aggregation_period"]
    for domain in ("shop", "video"):
        local = tuned.cdimf.ials.for_domain(domain)
        assert (local.alpha, local.lam, local.nu) == (params[f"alpha.{domain}"], params[f"lam.{domain}"], params[f"nu.{domain}"])
    assert tuned.cdimf.admm.rho == (params["rho"] if params["consensus"] == "on" else 0.0)
    # retrain CDIMF from the written file for the best round count and score validation by hand
    splits, _ = load_splits(tuned, with_test=False)
    model = CDIMF([s.train for s in splits], tuned, splits[0].users.keys)
    for _ in range(best["rounds"]):
        model.step()
    values = []
    for split, (users, items) in zip(splits, model.vectors()):
        held = held_out(split, "valid", tuned.evaluation.n_negatives, tuned.evaluation.seed)
        values.append(brute_force_ndcg(users, items, held.candidates, held.users, split.train.toarray(), tuned.evaluation.k))
    assert float(np.mean(values)) == pytest.approx(best["valid_ndcg"], abs=1e-6)
    assert "# cdimf: 4 trials" in output.read_text()

    # the written config is a runnable reproduce config, from any folder
    done = subprocess.run([sys.executable, "-m", "cdimf", "reproduce", str(output), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert [r["model"] for r in json.loads(done.stdout)["results"]] == ["ALS-separate", "ALS-joined", "CDIMF"]


def test_tune_cli_by_path_with_shared_local_values_and_a_time_budget(tmp_path: Path) -> None:
    """`cdimf tune` as a process: --shared-local gives one alpha/lam/nu, --start a first point; --timeout stops the study early."""
    write_pair(tmp_path)
    (tmp_path / "pair.toml").write_text(CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "cdimf", "tune", "pair.toml", "--models", "cdimf", "--shared-local", "--trials", "500",
         "--timeout", "3", "--max-rank", "8", "--start", "rank=8,alpha=0.07,consensus=off", "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert 2 <= len(report["trials"]) < 500
    start = report["trials"][1]["params"]  # after the config's own values: the --start point, the rest sampled
    assert (start["rank"], start["alpha"], start["consensus"]) == (8, 0.07, "off") and "rho" not in start
    assert all({"alpha", "lam", "nu"} <= set(t["params"]) and t["params"]["rank"] <= 8 for t in report["trials"])
    assert (tmp_path / "pair-tuned.toml").is_file() and report["output"] == "pair-tuned.toml"


def test_tune_rejects_a_bad_flag_and_an_unknown_model(tmp_path: Path) -> None:
    """Bad flags exit 2 naming the flag, before any data is read."""
    for arguments, named in ((["--models", "nope"], "--models"), (["--trials", "0"], "--trials")):
        done = subprocess.run([sys.executable, "-m", "cdimf", "tune", "warm-sport-cloth", *arguments],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 2 and named in done.stderr


def test_a_tuned_config_makes_reproduce_stop_on_the_tunes_protocol_and_round(tmp_path: Path) -> None:
    """Source config stops on 5 negatives, tune scores 19: the written config early-stops on 19, at the winner's round."""
    write_pair(tmp_path)
    source = CONFIG.replace("max_rounds = 4\npatience = 2\nvalid_negatives = 19", "max_rounds = 8\npatience = 2\nvalid_negatives = 5")
    assert source != CONFIG
    (tmp_path / "pair.toml").write_text(source)
    output = tmp_path / "tuned.toml"
    stdout, stderr = StringIO(), StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = tune.main([str(tmp_path / "pair.toml"), "--models", "cdimf", "--trials", "3", "--startup-trials", "1",
                          "--seed", "1", "--output", str(output), "--json"])
    assert code == 0, stderr.getvalue()
    report = json.loads(stdout.getvalue())
    assert report["valid_negatives"] == 19  # [evaluation] n_negatives, not the source's [stopping] 5
    tuned = load_reproduce_config(output)
    assert tuned.stopping.valid_negatives == 19
    assert "valid_negatives = 19" in output.read_text()
    # reproduce, as a process, early-stops CDIMF on the tune's validation rows: the winner's curve, round by round
    done = subprocess.run([sys.executable, "-m", "cdimf", "reproduce", str(output), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = next(r for r in json.loads(done.stdout)["results"] if r["model"] == "CDIMF")
    best = report["best"]["cdimf"]
    assert result["validation_metric"] == "mean valid NDCG@10 (19 neg)"
    assert result["rounds"] == best["rounds"]
    assert result["validation"] == pytest.approx([100 * v for v in best["history"]], abs=1e-3)
    # and the 5-negative protocol of the source config would have scored another curve (so this test can fail)
    splits, _ = load_splits(tuned, with_test=False)
    model = CDIMF([s.train for s in splits], tuned, splits[0].users.keys)
    model.step()
    five = [held_out(s, "valid", 5, tuned.evaluation.seed) for s in splits]
    first = np.mean([brute_force_ndcg(u, i, h.candidates, h.users, s.train.toarray(), 10)
                     for s, (u, i), h in zip(splits, model.vectors(), five)])
    assert abs(100 * first - result["validation"][0]) > 1e-3


def test_tune_valid_negatives_flag_is_written_as_the_stopping_protocol(tmp_path: Path) -> None:
    """--valid-negatives 7: the trials are scored on 7 negatives and the written config stops on 7."""
    write_pair(tmp_path)
    (tmp_path / "pair.toml").write_text(CONFIG)
    output = tmp_path / "tuned.toml"
    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        assert tune.main([str(tmp_path / "pair.toml"), "--models", "joined", "--trials", "1", "--valid-negatives", "7",
                          "--output", str(output)]) == 0
    assert load_reproduce_config(output).stopping.valid_negatives == 7
