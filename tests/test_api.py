"""The Python API (`from cdimf import CDIMF`) against the engine driven by hand, brute-force top-k and numpy-only reads of a saved model."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf import CDIMF
from cdimf.common.core.params import ADMMParams, IALSParams
from cdimf.engine import CDIMFEngine, DomainInput

ROOT = Path(__file__).resolve().parents[1]


def tables(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Two domains with string ids: users u0..u49 in sport, u30..u79 in cloth (u30..u49 in both)."""
    rng = np.random.default_rng(seed)
    sport = {"user": np.char.add("u", rng.integers(0, 50, 600).astype(str)), "item": np.char.add("s", rng.integers(0, 40, 600).astype(str))}
    cloth = {"user": np.char.add("u", rng.integers(30, 80, 600).astype(str)), "item": np.char.add("c", rng.integers(0, 25, 600).astype(str))}
    return {"sport": sport, "cloth": cloth}


@pytest.fixture(scope="module")
def fitted() -> CDIMF:
    return CDIMF(rank=8, rho=1.0, alpha=0.05, lam=0.5, iterations=4, threads=1).fit(tables())


def by_hand(data: dict[str, dict[str, np.ndarray]]) -> tuple[list[str], dict[str, list[str]], CDIMFEngine]:
    """What a notebook did before the API: id maps with sorted(set()), CSR matrices, the engine (weights: counts of duplicates)."""
    users = sorted(set(data["sport"]["user"].tolist()) | set(data["cloth"]["user"].tolist()))
    row_of = {user: row for row, user in enumerate(users)}
    items, inputs = {}, []
    params = IALSParams(rank=8, alpha=0.05, lam=0.5, threads=1)
    for name, table in data.items():
        items[name] = sorted(set(table["item"].tolist()))
        column_of = {item: column for column, item in enumerate(items[name])}
        rows = [row_of[user] for user in table["user"].tolist()]
        columns = [column_of[item] for item in table["item"].tolist()]
        matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, columns)), shape=(len(users), len(items[name])))
        inputs.append(DomainInput(name, np.arange(len(users)), matrix, params))
    engine = CDIMFEngine(inputs, ADMMParams(rho=1.0))
    engine.run(4)
    return users, items, engine


def test_fit_equals_the_engine_driven_by_hand(fitted: CDIMF) -> None:
    users, items, engine = by_hand(tables())
    ids, factors = fitted.user_factors("cloth")
    assert ids.tolist() == users
    np.testing.assert_array_equal(factors, engine.trainers[1].scoring_users())
    item_ids, item_factors = fitted.item_factors("sport")
    assert item_ids.tolist() == items["sport"]
    np.testing.assert_array_equal(item_factors, engine.trainers[0].state.items)


def test_recommend_is_the_brute_force_top_n_without_seen_items(fitted: CDIMF) -> None:
    data = tables()["cloth"]
    user_ids, users = fitted.user_factors("cloth")
    item_ids, items = fitted.item_factors("cloth")
    asked = np.array(["u35", "u70", "u31"])
    got, scores = fitted.recommend("cloth", asked, n=5)
    assert got.shape == (3, 5)
    for row, user in enumerate(asked):
        seen = set(data["item"][data["user"] == user].tolist())
        assert not seen & set(got[row].tolist())
        brute = users[user_ids.tolist().index(user)] @ items.T
        order = [item_ids[c] for c in np.argsort(-brute, kind="stable") if item_ids[c] not in seen][:5]
        assert got[row].tolist() == order
        np.testing.assert_allclose(scores[row], [brute[item_ids.tolist().index(item)] for item in order], rtol=1e-5)
    single, _ = fitted.recommend("cloth", "u35", n=5)
    assert single.tolist() == got[0].tolist()
    everything, _ = fitted.recommend("cloth", "u35", n=5, filter_seen=False)
    brute = users[user_ids.tolist().index("u35")] @ items.T
    assert everything.tolist() == [item_ids[c] for c in np.argsort(-brute, kind="stable")[:5]]


def test_cold_start_user_is_scored_with_its_consensus_vector(fitted: CDIMF) -> None:
    """u5 has sport history only: in cloth its vector is Z, which with one holder is sport's X + U of the last round."""
    _, _, engine = by_hand(tables())
    sport, cloth = engine.trainers
    user_ids, _ = fitted.user_factors("cloth")
    row = user_ids.tolist().index("u5")
    assert cloth.train[row].nnz == 0 and sport.train[row].nnz > 0
    got, scores = fitted.recommend("cloth", "u5", n=3)
    assert np.all(np.isfinite(scores)) and len(got) == 3
    z = fitted.user_factors("cloth")[1][row]
    assert np.any(z != 0)
    np.testing.assert_array_equal(z, engine.consensus[engine.global_keys.tolist().index(row)])


def test_similar_items_is_cosine_without_the_item_itself(fitted: CDIMF) -> None:
    item_ids, items = fitted.item_factors("sport")
    got, scores = fitted.similar_items("sport", "s3", n=4)
    unit = items / np.linalg.norm(items, axis=1, keepdims=True)
    cosine = unit @ unit[item_ids.tolist().index("s3")]
    expected = [item_ids[c] for c in np.argsort(-cosine, kind="stable") if item_ids[c] != "s3"][:4]
    assert got.tolist() == expected
    np.testing.assert_allclose(scores, np.sort(cosine)[::-1][1:5], rtol=1e-5)


def test_saved_model_reads_with_numpy_alone_and_loads_back(fitted: CDIMF, tmp_path: Path) -> None:
    fitted.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    users = np.load(tmp_path / "model" / manifest["user_ids"], allow_pickle=False)
    files = manifest["domains"]["cloth"]
    np.testing.assert_array_equal(np.load(tmp_path / "model" / files["user_factors"], allow_pickle=False), fitted.user_factors("cloth")[1])
    assert users.tolist() == fitted.user_ids.tolist()
    loaded = CDIMF.load(tmp_path / "model")
    for domain in ("sport", "cloth"):
        a, b = fitted.recommend(domain, ["u1", "u45", "u77"], n=4), loaded.recommend(domain, ["u1", "u45", "u77"], n=4)
        assert a[0].tolist() == b[0].tolist()
        np.testing.assert_array_equal(a[1], b[1])
    (tmp_path / "model" / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="manifest.json"):
        CDIMF.load(tmp_path / "model")


def test_csr_with_id_arrays_and_dataframes_train_the_same_model() -> None:
    pd = pytest.importorskip("pandas")
    data = tables(1)
    frames = {name: pd.DataFrame(table) for name, table in data.items()}
    matrices = {}
    for name, table in data.items():
        users, rows = np.unique(table["user"], return_inverse=True)
        items, columns = np.unique(table["item"], return_inverse=True)
        # the same users in another order: ids, not positions, match users across domains
        flip = np.arange(len(users))[::-1]
        matrices[name] = (sp.csr_matrix((np.ones(len(rows)), (flip[rows], columns)), shape=(len(users), len(items))), users[::-1], items)
    a = CDIMF(rank=4, iterations=2, threads=1).fit(frames)
    b = CDIMF(rank=4, iterations=2, threads=1).fit(matrices)
    np.testing.assert_array_equal(a.user_factors("sport")[1], b.user_factors("sport")[1])
    assert a.recommend("cloth", "u3", n=3)[0].tolist() == b.recommend("cloth", "u3", n=3)[0].tolist()


def test_integer_ids_come_back_as_integers() -> None:
    model = CDIMF(rank=4, iterations=1, threads=1).fit({"a": {"user": np.array([1, 2, 2, 3]), "item": np.array([10, 10, 11, 12])},
                                                         "b": {"user": np.array([3, 4]), "item": np.array([7, 8])}})
    items, _ = model.recommend("b", 1, n=2)
    assert items.dtype.kind == "i" and set(items.tolist()) == {7, 8}


def test_bad_input_names_what_is_wrong(fitted: CDIMF) -> None:
    with pytest.raises(ValueError, match="unknown user id: 'nobody'"):
        fitted.recommend("cloth", ["u1", "nobody"])
    with pytest.raises(ValueError, match="unknown domain 'books'; known: sport, cloth"):
        fitted.recommend("books", "u1")
    with pytest.raises(ValueError, match="n must be >= 1"):
        fitted.recommend("cloth", "u1", n=0)
    with pytest.raises(ValueError, match="sport: a table needs the columns user and item"):
        CDIMF(rank=2).fit({"sport": {"who": np.array(["a"])}})
    with pytest.raises(ValueError, match="rank"):
        CDIMF(rank=0)


def test_readme_python_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pandas")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    lines = [line for line in code.group(1).splitlines() if line.strip()]
    assert len(lines) <= 10
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    items, similar = namespace["items"], namespace["similar"]
    # ann saw hat in cloth, so with two cloth items her only unseen one is scarf; bob (cold start in cloth) gets both
    assert items[0][0] == "scarf" and sorted(items[1].tolist()) == ["hat", "scarf"]
    assert similar.tolist() == ["net"]
    assert (tmp_path / "my-model" / "manifest.json").is_file()
    assert namespace["model"].recommend("cloth", "bob", n=2)[0].tolist() == items[1].tolist()
