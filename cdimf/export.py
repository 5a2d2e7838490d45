"""`cdimf export`: a saved model's or a node's factors with their id maps, as .npy files or Parquet tables.

Per domain it writes `<domain>.user_ids`, `<domain>.user_factors`, `<domain>.item_ids` and
`<domain>.item_factors` (.npy), or `<domain>.users.parquet` and `<domain>.items.parquet` with
columns `id` and `factors` (a fixed-size list of float32; needs pyarrow). Rows are in id-map
order, so row i of the factors belongs to id i of the ids. A node's users without interactions
in its domain (cold start) get their consensus vector, the one the node scores them with.
"""

import json
from pathlib import Path
from typing import Literal

import numpy as np

from cdimf.common.config import NodeConfig

Format = Literal["npy", "parquet"]


def model_factors(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """{domain: (user ids, user factors, item ids, item factors)} of a model saved by the Python API."""
    from cdimf.api import CDIMF

    model = CDIMF.load(folder)
    return {name: (*model.user_factors(name), *model.item_factors(name)) for name in model.domains}


def node_factors(config: NodeConfig) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """{domain: (...)} of a node from its config: the ids from its files, the factors from the checkpoint in its state_dir."""
    from cdimf.domain_node.checkpoint import load_checkpoint
    from cdimf.domain_node.node_data import load_node_data

    checkpoint = load_checkpoint(config.state_dir)
    if checkpoint is None:
        raise ValueError(f"{config.state_dir}: no node checkpoint (has the node trained a round?)")
    data = load_node_data(config.domain, config.train_path, config.valid_path, config.test_path, config.data_format)
    trainer = checkpoint.trainer
    if trainer.users.shape[0] != len(data.users) or trainer.items.shape[0] != len(data.items):
        raise ValueError(f"{config.state_dir}: the checkpoint holds {trainer.users.shape[0]} users x {trainer.items.shape[0]} items, "
                         f"the node's files {len(data.users)} x {len(data.items)}")
    users = trainer.users.copy()
    if trainer.receiver_consensus is not None and len(checkpoint.receiver_rows):
        users[checkpoint.receiver_rows] = trainer.receiver_consensus
    return {config.domain: (data.users.keys, users, data.items.keys, trainer.items)}


def write_factors(factors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], out: Path, fmt: Format) -> list[Path]:
    """Write every domain's ids and factors into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for domain, (user_ids, user_factors, item_ids, item_factors) in factors.items():
        for role, ids, vectors in (("user", user_ids, user_factors), ("item", item_ids, item_factors)):
            if fmt == "npy":
                for suffix, array in (("ids", ids), ("factors", vectors)):
                    path = out / f"{domain}.{role}_{suffix}.npy"
                    np.save(path, np.asarray(array), allow_pickle=False)
                    written.append(path)
            else:
                written.append(_write_parquet(out / f"{domain}.{role}s.parquet", ids, vectors))
    (out / "export.json").write_text(json.dumps({"format": fmt, "domains": sorted(factors), "files": [p.name for p in written]}, indent=2) + "\n")
    return written


def _write_parquet(path: Path, ids: np.ndarray, vectors: np.ndarray) -> Path:
    """One Parquet table: id and factors (fixed-size float32 list)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ValueError("--format parquet needs pyarrow (pip install pyarrow), or use --format npy") from error
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    factors = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    pq.write_table(pa.table({"id": pa.array(np.asarray(ids)), "factors": factors}), path)
    return path
