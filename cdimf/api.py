"""The Python API: `CDIMF(rank=..., rho=...).fit({"sport": table, ...})`, then recommend, similar items, factors, save/load.

A table is one domain's interactions: a scipy sparse matrix with its id arrays
`(matrix, user_ids, item_ids)`, or columns `user`, `item` and optionally `weight` (a pandas
DataFrame, a pyarrow Table or a plain mapping of arrays). Users are matched across domains by
their ids; a user with no interactions in a domain is scored there with its consensus vector
(cold start), as the federated runtime does. Training runs on the in-process engine
(cdimf.engine), which runs the nodes' own model code.

A saved model is a folder of .npy files and a JSON manifest (`manifest.json`), readable with
numpy alone (`np.load(..., allow_pickle=False)`).
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.metrics import top_k_positions
from cdimf.common.core.params import ADMMParams, IALSParams
from cdimf.common.core.sparse import pairs_to_csr
from cdimf.engine import CDIMFEngine, DomainInput, RoundReport
from cdimf.progress import Progress

MODEL_FORMAT = "cdimf-model"
MODEL_VERSION = 1
MANIFEST = "manifest.json"
# scores of a block of users at once: bounded so that a large catalog never needs one huge matrix
_SCORE_BLOCK_FLOATS = 1 << 24


def _ids(values: Any, what: str) -> np.ndarray:
    """Ids as a numpy array of int64 or str (the two kinds an id map keeps)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind in "OUST":
        return array.astype(str)
    raise ValueError(f"{what} must be integers or strings, got dtype {array.dtype}")


def _column(table: Any, name: str) -> np.ndarray | None:
    """Column `name` of a pandas DataFrame, pyarrow Table or mapping of arrays (None when absent)."""
    if hasattr(table, "column_names"):  # pyarrow.Table
        return table.column(name).to_numpy() if name in table.column_names else None
    if hasattr(table, "columns") and hasattr(table, "__getitem__"):  # pandas.DataFrame
        return table[name].to_numpy() if name in table.columns else None
    if isinstance(table, Mapping):
        return np.asarray(table[name]) if name in table else None
    raise TypeError(f"a table is (sparse matrix, user_ids, item_ids), a DataFrame, a pyarrow Table or a mapping, got {type(table).__name__}")


def interactions_of(domain: str, table: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, item ids, weights) of one domain's table, one entry per interaction."""
    if isinstance(table, tuple) and len(table) == 3 and sp.issparse(table[0]):
        matrix, user_ids, item_ids = sp.coo_matrix(table[0]), _ids(table[1], f"{domain}: user_ids"), _ids(table[2], f"{domain}: item_ids")
        if matrix.shape != (len(user_ids), len(item_ids)):
            raise ValueError(f"{domain}: matrix of shape {matrix.shape} for {len(user_ids)} user ids and {len(item_ids)} item ids")
        return user_ids[matrix.row], item_ids[matrix.col], matrix.data.astype(np.float32)
    users, items, weights = (_column(table, name) for name in ("user", "item", "weight"))
    if users is None or items is None:
        raise ValueError(f"{domain}: a table needs the columns user and item (and optionally weight)")
    users, items = _ids(users, f"{domain}: column user"), _ids(items, f"{domain}: column item")
    if len(users) != len(items):
        raise ValueError(f"{domain}: {len(users)} users but {len(items)} items")
    weights = np.ones(len(users), np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    if len(weights) != len(users) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"{domain}: column weight must hold one positive finite number per interaction")
    return users, items, weights


def _lookup(known: np.ndarray, wanted: Any, what: str) -> np.ndarray:
    """Positions of `wanted` ids in the sorted unique `known`; ValueError naming the unknown ones."""
    query = np.asarray(wanted)
    query = query.astype(known.dtype) if query.dtype.kind in "OUST" or known.dtype.kind in "iu" else query
    slots = np.searchsorted(known, query).clip(max=max(len(known) - 1, 0))
    found = known[slots] == query if len(known) else np.zeros(query.shape, bool)
    if not np.all(found):
        missing = query[~found][:5].tolist()
        raise ValueError(f"unknown {what}: {', '.join(map(repr, missing))}{' ...' if (~found).sum() > 5 else ''}")
    return slots.astype(np.int64)


@dataclass
class DomainModel:
    """One domain's trained model: scoring vectors of every user of the federation, its items and what each user saw."""

    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    seen: sp.csr_matrix


class CDIMF:
    """Federated cross-domain implicit matrix factorisation, trained in one process (the API of implicit's models)."""

    def __init__(self, rank: int = 64, rho: float = 1.0, alpha: float = 0.01, lam: float = 1.0, nu: float = 0.0,
                 iterations: int = 10, aggregation_period: int = 1, prox: str = "identity", lambda_z: float = 0.0,
                 sigma: float = 0.1, seed: int = 0, threads: int | None = None, backend: str = "auto") -> None:
        # validated now, so a bad value fails here and not after a slow fit
        self.ials = IALSParams.model_validate({"rank": rank, "alpha": alpha, "lam": lam, "nu": nu, "sigma": sigma, "seed": seed,
                                               "threads": threads, "backend": backend})
        self.admm = ADMMParams(rho=rho, prox=prox, lambda_z=lambda_z)
        if iterations < 1 or aggregation_period < 1:
            raise ValueError(f"iterations and aggregation_period must be >= 1, got {iterations} and {aggregation_period}")
        self.iterations = iterations
        self.aggregation_period = aggregation_period
        self.user_ids = np.zeros(0, dtype=np.int64)
        self.domains: dict[str, DomainModel] = {}

    def params(self) -> dict[str, Any]:
        """The constructor's arguments (what `save` writes into the manifest)."""
        return {**self.ials.model_dump(), **self.admm.model_dump(), "iterations": self.iterations, "aggregation_period": self.aggregation_period}

    def fit(self, tables: Mapping[str, Any], show_progress: bool = False) -> "CDIMF":
        """Train on {domain: table}; users are matched across domains by id. Returns self."""
        if not tables:
            raise ValueError("fit needs at least one domain")
        per_domain = {name: interactions_of(name, table) for name, table in tables.items()}
        kinds = {users.dtype.kind for users, _, _ in per_domain.values()}
        if len(kinds) > 1:
            raise ValueError("user ids must be of one kind (all integers or all strings) in every domain")
        user_ids = np.unique(np.concatenate([users for users, _, _ in per_domain.values()]))
        inputs, item_ids = [], {}
        for name, (users, items, weights) in per_domain.items():
            item_ids[name], columns = np.unique(items, return_inverse=True)
            rows = np.searchsorted(user_ids, users)
            train = pairs_to_csr(rows, columns, (len(user_ids), len(item_ids[name])), weights)
            # every domain has a row for every user: the ones it lacks are its cold-start (receiver) rows
            inputs.append(DomainInput(name, np.arange(len(user_ids)), train, self.ials, self.aggregation_period))
        engine = CDIMFEngine(inputs, self.admm)
        with Progress("fit", self.iterations, "rounds", enabled=show_progress) as progress:
            def advance(report: RoundReport) -> None:
                """One round done."""
                progress.update(1)

            engine.run(self.iterations, advance)
        self.user_ids = user_ids
        self.domains = {
            trainer.name: DomainModel(item_ids[trainer.name], trainer.scoring_users(), trainer.state.items, trainer.train)
            for trainer in engine.trainers
        }
        return self

    def _domain(self, domain: str) -> DomainModel:
        """The trained domain; ValueError naming the known ones."""
        if not self.domains:
            raise ValueError("the model is not trained: call fit or load first")
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; known: {', '.join(self.domains)}")
        return self.domains[domain]

    def recommend(self, domain: str, user_ids: Any, n: int = 10, filter_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The n best item ids and their scores per user in `domain`, best first.

        `user_ids` is one id (1-d results) or an array of ids (one row each). A user without
        interactions in `domain` but with some in another domain is scored with its consensus
        vector. With `filter_seen`, a user's training items are left out; where fewer than n
        remain, the row ends with scores of -inf. Ids never seen in any domain are a ValueError.
        """
        model = self._domain(domain)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        single = np.ndim(user_ids) == 0
        rows = _lookup(self.user_ids, np.atleast_1d(np.asarray(user_ids)), "user id")
        width = min(n, len(model.item_ids))
        best = np.zeros((len(rows), width), dtype=np.int64)
        scores = np.zeros((len(rows), width), dtype=np.float32)
        block = max(1, _SCORE_BLOCK_FLOATS // max(1, len(model.item_ids)))
        for start in range(0, len(rows), block):
            chunk = rows[start:start + block]
            block_scores = model.user_factors[chunk] @ model.item_factors.T
            if filter_seen:
                seen = model.seen[chunk]
                block_scores[np.repeat(np.arange(len(chunk)), np.diff(seen.indptr)), seen.indices] = -np.inf
            best[start:start + len(chunk)], scores[start:start + len(chunk)] = top_k_positions(block_scores, width)
        ids = model.item_ids[best]
        return (ids[0], scores[0]) if single else (ids, scores)

    def similar_items(self, domain: str, item_ids: Any, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The n items of `domain` most similar to each given item (cosine of item factors), the item itself left out."""
        model = self._domain(domain)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        single = np.ndim(item_ids) == 0
        columns = _lookup(model.item_ids, np.atleast_1d(np.asarray(item_ids)), f"item id of {domain}")
        norms = np.linalg.norm(model.item_factors, axis=1)
        unit = model.item_factors / np.where(norms > 0, norms, 1.0)[:, None]
        similarity = unit[columns] @ unit.T
        similarity[np.arange(len(columns)), columns] = -np.inf
        width = min(n, len(model.item_ids) - 1)
        if width < 1:
            raise ValueError(f"domain {domain} has a single item: no other item to compare with")
        best, scores = top_k_positions(similarity, width)
        ids = model.item_ids[best]
        return (ids[0], scores[0].astype(np.float32)) if single else (ids, scores.astype(np.float32))

    def user_factors(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        """(user ids, their scoring vectors in `domain`): every user of the federation, cold-start users' consensus vectors included."""
        return self.user_ids, self._domain(domain).user_factors

    def item_factors(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, their factors) of `domain`."""
        model = self._domain(domain)
        return model.item_ids, model.item_factors

    def save(self, folder: str | Path) -> Path:
        """Write the model as .npy files plus manifest.json into `folder` (created); returns the folder."""
        if not self.domains:
            raise ValueError("the model is not trained: call fit first")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, dict[str, str]] = {}
        np.save(folder / "user_ids.npy", self.user_ids, allow_pickle=False)
        for index, (name, model) in enumerate(self.domains.items()):
            arrays = {"item_ids": model.item_ids, "user_factors": model.user_factors, "item_factors": model.item_factors,
                      "seen_indptr": model.seen.indptr.astype(np.int64), "seen_indices": model.seen.indices.astype(np.int64),
                      "seen_weights": model.seen.data.astype(np.float32)}
            files[name] = {}
            for key, array in arrays.items():
                # file names by position: a domain name is safe, but the manifest is what maps names to files
                file_name = f"domain{index}.{key}.npy"
                np.save(folder / file_name, array, allow_pickle=False)
                files[name][key] = file_name
        manifest = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "params": self.params(), "user_ids": "user_ids.npy",
                    "domains": files,
                    "notes": "user_factors rows follow user_ids (cold-start users hold their consensus vectors); item rows follow item_ids; "
                             "seen_* is the CSR (users x items) of the training interactions"}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CDIMF":
        """A model written by `save`; ValueError naming the file when the folder is not one."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{folder / MANIFEST}: not a saved cdimf model: {error}") from error
        if manifest.get("format") != MODEL_FORMAT or manifest.get("version") != MODEL_VERSION:
            raise ValueError(f"{folder / MANIFEST}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                             f"expected {MODEL_FORMAT!r} version {MODEL_VERSION}")
        params = dict(manifest["params"])
        model = cls(**{key: params[key] for key in ("rank", "alpha", "lam", "nu", "sigma", "seed", "threads", "backend", "rho", "prox",
                                                     "lambda_z", "iterations", "aggregation_period")})

        def array(name: str) -> np.ndarray:
            """One array of the folder, pickles refused."""
            return np.load(folder / name, allow_pickle=False)

        model.user_ids = array(manifest["user_ids"])
        for name, files in manifest["domains"].items():
            item_ids = array(files["item_ids"])
            seen = sp.csr_matrix((array(files["seen_weights"]), array(files["seen_indices"]), array(files["seen_indptr"])),
                                 shape=(len(model.user_ids), len(item_ids)))
            domain = DomainModel(item_ids, array(files["user_factors"]), array(files["item_factors"]), seen)
            if domain.user_factors.shape != (len(model.user_ids), model.ials.rank) or domain.item_factors.shape != (len(item_ids), model.ials.rank):
                raise ValueError(f"{folder}: domain {name}: factor shapes {domain.user_factors.shape}, {domain.item_factors.shape} "
                                 f"do not match {len(model.user_ids)} users, {len(item_ids)} items at rank {model.ials.rank}")
            model.domains[name] = domain
        return model
