"""Secure aggregation end to end: `cdimf simulate` with secure_aggregation (real aggregator and node processes).

- Three domains with partial overlap and a cold receiver: every node's final factors and the
  consensus of its cold rows equal CDIMFEngine(quantize=True) bit for bit.
- What the aggregator stored (its state folder, read here) is masked: its bytes pass a uniformity
  test, are uncorrelated with the true contributions and Z (computed here with the engine), and
  hold none of their float32 rows nor their fixed-point encodings.
(The shipped warm pair, secure vs plain: tests/test_secure_warm_pair.py.)
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from cdimf.aggregator.store import stored_run_arrays
from cdimf.common.core.params import ADMMParams, LocalIALSParams
from cdimf.common.core.ring import RING_FRACTION_BITS
from cdimf.domain_node.checkpoint import Checkpoint, load_checkpoint
from cdimf.domain_node.node_data import load_node_data
from cdimf.engine import CDIMFEngine, DomainInput
from tests.federation_harness import REPO_ROOT, item_key, user_key

pytestmark = pytest.mark.timeout(120)
RANK = 4
ROUNDS = 3
LOCAL = LocalIALSParams(alpha=0.1, lam=0.5, seed=0, threads=1)
# books 0-59, films 40-109, music 90-149: books and films share 40-59, films and music 90-109,
# books and music nobody; books' test file names 140 and 141, whom only music trains on
USERS = {"books": range(0, 60), "films": range(40, 110), "music": range(90, 150)}
COLD = (140, 141)


def write_three_domains(folder: Path, n_items: int = 40) -> dict[str, dict[str, Path]]:
    """Three CSV domains with partial overlap; books also gets a test file with two users it never trains on."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}
    for domain, users in USERS.items():
        lines = []
        for user in users:
            group = np.arange(user % 4 * n_items // 4, (user % 4 + 1) * n_items // 4)
            picks = np.unique(np.where(rng.random(6) < 0.8, rng.choice(group, 6), rng.integers(0, n_items, 6)))
            lines += [f"{user_key(user)},{item_key(domain, int(item))}\n" for item in picks]
        path = folder / f"{domain}_train.csv"
        path.write_text("user,item\n" + "".join(lines))
        files[domain] = {"train": path}
    test = folder / "books_test.csv"
    test.write_text("user,item\n" + "".join(f"{user_key(u)},{item_key('books', u % 9)}\n" for u in (3, 17, *COLD)))
    files["books"]["test"] = test
    return files


def simulate(work: Path, files: dict[str, dict[str, Path]], secure: bool, deadline_s: float) -> dict[str, Any]:
    """`cdimf simulate --json` over the three domains, its state kept in `work`; the JSON it printed."""
    entries = "".join(
        f'[[domains]]\nname = "{name}"\ntrain_path = "{paths["train"]}"\ndata_format = "csv"\n'
        + (f'test_path = "{paths["test"]}"\n' if "test" in paths else "")
        for name, paths in files.items()
    )
    config = work / "simulate.toml"
    config.write_text(f"""insecure = true
work_dir = "{work / 'run'}"

{entries}
[ials]
alpha = {LOCAL.alpha}
lam = {LOCAL.lam}
seed = {LOCAL.seed}
threads = 1

[validation]
every = 0

[run]
rounds = {ROUNDS}
rank = {RANK}
min_domains = 3
round_deadline_s = {deadline_s}
secure_aggregation = {str(secure).lower()}

[run.admm]
rho = 1.0
prox = "identity"
""")
    done = subprocess.run([sys.executable, "-m", "cdimf", "simulate", "--config", str(config), "--json"], cwd=REPO_ROOT,
                          capture_output=True, timeout=100)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return json.loads(done.stdout)


def engine_of(files: dict[str, dict[str, Path]], rounds: int) -> CDIMFEngine:
    """The quantized in-process engine on exactly the nodes' data, run for `rounds` rounds."""
    inputs = []
    for name, paths in files.items():
        data = load_node_data(name, paths["train"], None, paths.get("test"), "csv")
        inputs.append(DomainInput(name, data.users.keys, data.train, LOCAL.at_rank(RANK)))
    engine = CDIMFEngine(inputs, ADMMParams(rho=1.0, prox="identity"), quantize=True)
    engine.run(rounds)
    return engine


def last_contributions(files: dict[str, dict[str, Path]]) -> dict[str, np.ndarray]:
    """X + U each domain pushed in the last round: the engine after ROUNDS - 1 rounds, then that round's local epoch."""
    engine = engine_of(files, ROUNDS - 1)
    contributions = {}
    for trainer in engine.trainers:
        trainer.local_epochs(1)
        contributions[trainer.name] = trainer.contribution()
    return contributions


def stored_bytes(folder: Path) -> bytes:
    """Every byte of every file the aggregator keeps in its state folder."""
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def plaintext_rows(blob: bytes, matrices: list[np.ndarray]) -> int:
    """How many rows of the matrices appear, byte for byte, in the blob (float32 rows and their int64 fixed-point encodings)."""
    found = 0
    for matrix in matrices:
        fixed = np.rint(matrix.astype(np.float64) * 2.0**RING_FRACTION_BITS).astype("<i8")
        for row in range(len(matrix)):
            if not np.any(matrix[row]):
                continue  # an all-zero row (nobody's) says nothing
            found += int(matrix[row].astype("<f4").tobytes() in blob) + int(fixed[row].tobytes() in blob)
    return found


def ring_as_unit(values: np.ndarray) -> np.ndarray:
    """uint64 ring elements as floats in [0, 1) (for a correlation with real values)."""
    return values.astype(np.float64) / 2.0**64


def test_a_secure_federated_run_equals_the_quantized_engine_and_the_aggregator_stores_only_masked_words(tmp_path: Path) -> None:
    """Three domains, partial overlap, a cold receiver, three rounds: the nodes' factors and cold-row Z are the engine's bit for bit,
    and the aggregator's state folder is indistinguishable from random words.

    The round deadline (60 s) is never reached: every round closes when all three pushed, as in a
    synchronous run, but the aggregator then keeps each domain's latest masked contribution on disk
    beside the masked sum, so both are checked.
    """
    files = write_three_domains(tmp_path / "data")
    result = simulate(tmp_path, files, secure=True, deadline_s=60.0)
    assert result["rounds"] == ROUNDS and sorted(result["admitted"]) == sorted(USERS)
    closed = [event for event in result["history"] if event["kind"] == "round_closed"]
    assert [event["round"] for event in closed] == [1, 2, 3] and all(not event["missing"] for event in closed)

    engine = engine_of(files, ROUNDS)
    state = tmp_path / "run" / "state"
    checkpoints: dict[str, Checkpoint] = {}
    for trainer, membership in zip(engine.trainers, engine.memberships):
        found = load_checkpoint(state / trainer.name)
        assert found is not None and found.round == ROUNDS, trainer.name
        checkpoints[trainer.name] = found
        mine = found.trainer
        np.testing.assert_array_equal(found.shared_rows, trainer.shared_rows)
        np.testing.assert_array_equal(found.receiver_rows, trainer.receiver_rows)
        for ours, theirs in ((mine.users, trainer.state.users), (mine.items, trainer.state.items), (mine.duals, trainer.state.duals)):
            np.testing.assert_array_equal(ours, theirs)
        assert engine.consensus is not None
        if len(membership.receiver_global):
            assert mine.receiver_consensus is not None
            np.testing.assert_array_equal(mine.receiver_consensus, engine.consensus[membership.receiver_global])
    # the cold receivers exist (books' two test-only users) and their Z is not trivially zero
    books = checkpoints["books"].trainer
    assert len(checkpoints["books"].receiver_rows) == len(COLD) and books.receiver_consensus is not None
    assert np.abs(books.receiver_consensus).max() > 1e-3

    saved = stored_run_arrays(state / "aggregator")
    meta = json.loads(saved["meta"].tobytes())
    assert meta["params"]["secure_aggregation"] is True
    assert [tuple(entry) for entry in meta["consensus_contributors"]] == [(name, ROUNDS) for name in sorted(USERS)]
    masked = [saved["consensus"], *(saved[f"contribution_{index}"] for index in range(len(USERS)))]
    assert all(array.dtype == np.uint64 for array in masked)
    exchanged_rows = np.unique(np.concatenate([rows for m in engine.memberships for rows in (m.shared_global, m.receiver_global)]))
    assert saved["consensus"].shape == (len(exchanged_rows), RANK + 1)

    # uniform bytes: a chi-square test of the byte histogram of every masked word stored
    words = np.concatenate([array.reshape(-1) for array in masked]).view(np.uint8)
    assert stats.chisquare(np.bincount(words, minlength=256)).pvalue > 1e-6
    # uncorrelated with the truth: each domain's stored contribution against its true X + U of that round
    truth = last_contributions(files)
    for index, name in enumerate(sorted(USERS)):
        stored = saved[f"contribution_{index}"]
        assert stored.shape == (len(truth[name]), RANK + 1)
        correlation = np.corrcoef(ring_as_unit(stored[:, :RANK]).reshape(-1), truth[name].reshape(-1))[0, 1]
        assert abs(correlation) < 0.3, (name, correlation)
    exchanged = engine.consensus[exchanged_rows]
    correlation = np.corrcoef(ring_as_unit(saved["consensus"][:, :RANK]).reshape(-1), exchanged.reshape(-1))[0, 1]
    assert abs(correlation) < 0.3, correlation
    # no plaintext on disk: none of the true rows, as float32 or as fixed point, in any file of the folder
    blob = stored_bytes(state / "aggregator")
    assert plaintext_rows(blob, [*truth.values(), exchanged]) == 0
    # (the search itself finds rows that are there)
    planted = truth["films"][:3].astype("<f4").tobytes()
    assert plaintext_rows(blob + planted, [truth["films"]]) == 3
