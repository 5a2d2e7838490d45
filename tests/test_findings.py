"""Regression tests of findings a user ran into, each through the real command: the error names what to change."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "csv-pair"


def _cdimf(*arguments: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m cdimf ...` without CDIMF_* variables of this environment."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("CDIMF_")}
    return subprocess.run([sys.executable, "-m", "cdimf", *arguments], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=environ)


def test_a_node_rank_other_than_the_runs_is_an_error_naming_the_flag() -> None:
    """`simulate --ials-rank 8` under the run's rank 64 is refused, blaming the flag, before anything starts."""
    done = _cdimf("simulate", "--ials-rank", "8", "--insecure")
    assert done.returncode == 2
    assert "option --ials-rank: field (top level): Value error, ials.rank = 8 differs from the run's rank 64" in done.stderr


def test_recommend_refuses_k_0() -> None:
    """-k 0 is refused by the parser (it used to return 10 items)."""
    done = _cdimf("recommend", "--node", "127.0.0.1:1", "--user", "u", "-k", "0", "--insecure")
    assert done.returncode == 2 and "argument -k: must be at least 1, got 0" in done.stderr


def test_too_many_negatives_in_reproduce_name_the_config_key_the_domain_and_the_user(tmp_path: Path) -> None:
    """A catalog too small for [stopping] valid_negatives and [evaluation] n_negatives: both keys, by domain and user id, at once."""
    config = tmp_path / "small.toml"
    text = (EXAMPLE / "federation.toml").read_text().replace('_path = "', f'_path = "{EXAMPLE}/')
    config.write_text(text + "\n[stopping]\nvalid_negatives = 5000\n[evaluation]\nn_negatives = 4000\n")
    done = _cdimf("reproduce", str(config))
    assert done.returncode == 2
    # the catalogs: the items of each train file (counted here from the CSV, not by cdimf's reader)
    items = {name: len({line.split(",")[1] for line in (EXAMPLE / f"{name}_train.csv").read_text().splitlines()[1:]})
             for name in ("books", "films")}
    for name, count in items.items():
        assert f"[stopping] valid_negatives = 5000: domain {name} has {count} items, so the validation row of user 'user-" in done.stderr
        assert f"[evaluation] n_negatives = 4000: domain {name} has {count} items, so the test row of user 'user-" in done.stderr
    assert "test row 0" not in done.stderr and "(user 0)" not in done.stderr


def test_simulate_with_a_relative_work_dir_and_mutual_tls(tmp_path: Path) -> None:
    """`--work-dir wd` relative to the working folder: certificates, secret and logs land there and the run trains."""
    done = _cdimf("simulate", "--config", str(EXAMPLE / "federation.toml"), "--rounds", "1", "--work-dir", "wd", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["transport"] == "mutual TLS" and report["rounds"] == 1
    assert (tmp_path / "wd" / "federation.secret").is_file() and (tmp_path / "wd" / "certs" / "ca.pem").is_file()
    assert (tmp_path / "wd" / "node-books.log").is_file()


def test_simulate_says_when_a_small_catalog_capped_the_negatives(tmp_path: Path) -> None:
    """A 30-item domain cannot give 999 negatives: labels carry the number used, the table says why, the node logs it."""
    catalog = 30
    lines = ["user,item"] + [f"u{user},i{(user * 7 + shift) % catalog}" for user in range(40) for shift in range(5)]
    (tmp_path / "small_train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "small_test.csv").write_text("user,item\n" + "".join(f"u{user},i{(user * 7 + 5) % catalog}\n" for user in range(40)))
    (tmp_path / "fed.toml").write_text('[[domains]]\nname = "small"\ntrain_path = "small_train.csv"\ntest_path = "small_test.csv"\n')
    done = _cdimf("simulate", "--config", str(tmp_path / "fed.toml"), "--insecure", "--rounds", "1", "--min-domains", "1",
                  "--work-dir", "wd", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # each test row excludes its own held-out item: 29 of the 30 items are left to draw
    assert "test HR@10 (29 neg)" in done.stdout
    assert "small: ranked against 29 negatives, not the paper's 999: its catalog has too few items" in done.stdout
    log = (tmp_path / "wd" / "node-small.log").read_text()
    assert "domain small: test rows ranked against 29 negatives, not 999: a catalog of 30 items" in log


def test_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """stdout a pipe nobody reads any more (`... | head -1` after its line): no "Broken pipe" error, the status of a SIGPIPE."""
    config = tmp_path / "pair.toml"
    text = (EXAMPLE / "federation.toml").read_text().replace('_path = "', f'_path = "{EXAMPLE}/')
    config.write_text(text + "\n[stopping]\nmax_rounds = 1\n")
    environ = {name: value for name, value in os.environ.items() if not name.startswith("CDIMF_")}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the table is printed
    try:
        writer = subprocess.run([sys.executable, "-m", "cdimf", "reproduce", str(config)], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=300, cwd=ROOT, env=environ)
    finally:
        os.close(write_end)
    assert writer.returncode == 141 and "Broken pipe" not in writer.stderr, writer.stderr[-2000:]
    assert "model 3/3: CDIMF done" in writer.stderr  # the work itself ran to its end
