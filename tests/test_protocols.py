"""Both published test protocols, test pairs that occur in train, and per-domain local hyperparameters in reproduce."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from test_reproduce import CONFIG, CROSS_CONFIG, write_cross_domain_pair, write_pair

from cdimf.common.config import ConfigError
from cdimf.pairs import load_pair
from cdimf.reproduce import CDIMF, SeparateALS, scored_test_rows, unseen_held_out
from cdimf.reproduce_config import load_reproduce_config

ROOT = Path(__file__).resolve().parents[1]


def _pair(folder: Path) -> tuple:
    """The synthetic pair's two splits."""
    return load_pair(*(folder / f"{d}_train.csv" for d in ("shop", "video")), *(folder / f"{d}_test.csv" for d in ("shop", "video")),
                     names=("shop", "video"), fmt="csv")


def test_unseen_protocol_draws_only_items_the_user_neither_trained_on_nor_holds_in_test(tmp_path: Path) -> None:
    """Every negative of the DisenCDR/UniCDR draw is outside the user's train and test items; exactly n per row."""
    write_pair(tmp_path)
    shop, _ = _pair(tmp_path)
    held = unseen_held_out(shop, shop.train, shop.test_users, shop.test_items, 30, seed=5)
    dense = shop.train.toarray()
    assert held.candidates.shape == (len(shop.test_users), 31)
    assert np.array_equal(held.candidates[:, 0], shop.test_items)
    for row, user in enumerate(shop.test_users):
        negatives = held.candidates[row, 1:]
        assert len(set(negatives.tolist())) == 30
        assert not dense[user, negatives].any()
        assert not set(negatives.tolist()) & set(shop.test_items[shop.test_users == user].tolist())


def test_test_pairs_seen_in_train_are_counted_and_dropped_or_kept() -> None:
    """Rows whose (user, item) is a training entry: counted; 'drop' leaves exactly them out, 'keep' scores all."""
    train = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32))

    class Split:
        test_users = np.array([0, 0, 1, 2, 2])
        test_items = np.array([2, 3, 0, 3, 1])

    users, items, seen = scored_test_rows(Split, train, "drop")  # type: ignore[arg-type]
    assert seen == 2  # (0, 2) and (2, 3) are in train
    assert users.tolist() == [0, 1, 2] and items.tolist() == [3, 0, 1]
    users, items, seen = scored_test_rows(Split, train, "keep")  # type: ignore[arg-type]
    assert seen == 2 and users.tolist() == [0, 0, 1, 2, 2]


def test_reproduce_reports_both_protocols_and_the_seen_pairs(tmp_path: Path) -> None:
    """A test file repeating 3 training pairs: reproduce counts them, drops them, and prints both protocols.

    On video every user is tested on the one item of its group it did not train on (see
    write_cross_domain_pair): under every protocol (the paper code's, DisenCDR/UniCDR's, the full
    catalog less training items) no untrained item of the user's group competes, so a model that
    learnt the groups ranks the target first and every metric is exactly 1."""
    write_cross_domain_pair(tmp_path, seed=0)
    train_lines = (tmp_path / "shop_train.csv").read_text().splitlines()[1:]
    test = tmp_path / "shop_test.csv"
    test.write_text(test.read_text() + "".join(f"{line}\n" for line in train_lines[:24:8]))  # one pair each of u0, u1, u2
    config = tmp_path / "pair.toml"
    config.write_text(CROSS_CONFIG.replace('models = ["ALS-separate", "ALS-joined", "CDIMF"]', 'models = ["CDIMF"]'))
    done = subprocess.run([sys.executable, "-m", "cdimf", "reproduce", str(config), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["results"][0]
    assert result["seen_test_pairs"] == {"shop": 3, "video": 0}
    video = result["metrics"]["video"]  # video's target is the only untrained item of the user's group: ranked first, 100 %
    for name in ("test HR@10 (19 neg)", "test NDCG@10 (19 neg)", "test HR@10 (19 unseen neg)", "test NDCG@10 (19 unseen neg)",
                 "test HR@10 (full catalog)", "test NDCG@10 (full catalog)"):
        assert video[name] == pytest.approx(100.0, abs=1e-9), name
    table = subprocess.run([sys.executable, "-m", "cdimf", "reproduce", str(config)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert table.returncode == 0, table.stderr
    assert "test (19 unseen neg)" in table.stdout and "DisenCDR/UniCDR" in table.stdout
    assert "test pairs that also occur in train: shop 3, video 0" in table.stdout


PER_DOMAIN = CONFIG + """
[cdimf.ials.domains.video]
alpha = 0.2
lam = 2.0
nu = 0.5
[separate.domains.shop]
lam = 4.0
"""


def test_reproduce_config_gives_each_domain_its_own_local_hyperparameters(tmp_path: Path) -> None:
    """[MODEL.domains.NAME] sets that domain's alpha/lam/nu; the ridge follows lam (|I_u| + alpha |I|)^nu by hand."""
    write_pair(tmp_path)
    path = tmp_path / "pair.toml"
    path.write_text(PER_DOMAIN)
    config = load_reproduce_config(path)
    splits = _pair(tmp_path)
    trains = [s.train for s in splits]
    cdimf = CDIMF(trains, config, splits[0].users.keys)
    counts = [np.diff(t.indptr) for t in trains]
    shop, video = cdimf.engine.trainers
    np.testing.assert_allclose(shop.user_ridge, np.full(len(counts[0]), 0.5), rtol=1e-6)  # nu = 0: the shared lam
    np.testing.assert_allclose(video.user_ridge, 2.0 * (counts[1] + 0.2 * 45) ** 0.5, rtol=1e-5)
    assert video.params.rank == shop.params.rank == 4
    separate = SeparateALS(trains, config)
    assert [t.params.lam for t in separate.trainers] == [4.0, 0.5]
    assert [t.params.alpha for t in separate.trainers] == [0.05, 0.05]


def test_per_domain_values_must_name_a_domain_of_the_pair(tmp_path: Path) -> None:
    """A domains table for a domain the pair does not have is a ConfigError naming the section."""
    path = tmp_path / "pair.toml"
    path.write_text(PER_DOMAIN.replace("[separate.domains.shop]", "[separate.domains.books]"))
    with pytest.raises(ConfigError, match=r"separate\.domains: unknown domain\(s\) \['books'\]"):
        load_reproduce_config(path)
