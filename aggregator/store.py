"""Where the aggregator keeps registrations and its run: a RunStore protocol, in memory or in a directory.

Both stores keep the same things (a store is written at registrations and at round boundaries,
never between), so tests/test_run_store.py runs one suite against both.
"""

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cdimf.aggregator.rounds import Event, SavedRun
from cdimf.common.atomic_files import StateFileError, read_arrays, read_arrays_or_npz, remove_stale_temporaries, write_arrays_atomically
from cdimf.common.config import ColdStartPolicy, ConfigError, RunParams
from cdimf.common.security.pseudonyms import membership_fingerprint

# checksummed containers (cdimf.common.atomic_files); the .npz of earlier versions is still read
# when it is the only one
REGISTRATIONS_FILE = "registrations.arrays"
LEGACY_REGISTRATIONS_FILE = "registrations.npz"
# written every round before Z is served: the plain container (cdimf.common.atomic_files) skips the
# zip CRC pass over Z; the .npz of earlier versions is still read when it is the only one
RUN_FILE = "run.arrays"
LEGACY_RUN_FILE = "run.npz"
# what a refusal to resume tells the operator to do
_START_OVER = "restore the folder from a backup, or move it away to start over (its run is then lost)"
# ended runs replaced by a newer one: their description and events only (no matrices), one JSON file each
ARCHIVE_DIR = "runs"
ARCHIVE_SUFFIX = ".arrays"


@dataclass(frozen=True)
class Registration:
    """One domain's registered rows: pseudonyms (n, 32) uint8 and holder flags (n,) bool, and its cold-start policy."""

    domain: str
    pseudonyms: np.ndarray
    holder: np.ndarray
    fingerprint: str
    cold_start: ColdStartPolicy = field(default_factory=ColdStartPolicy)


class RunStore(Protocol):
    """Keeps the registrations and the latest saved run; what a restarted aggregator resumes from."""

    def save_registrations(self, registrations: Mapping[str, Registration]) -> None:
        """Replace the stored registrations with these."""
        ...

    def load_registrations(self) -> dict[str, Registration]:
        """The stored registrations (empty when none were saved)."""
        ...

    def save_run(self, run: SavedRun) -> None:
        """Replace the stored run with this one."""
        ...

    def load_run(self) -> SavedRun | None:
        """The stored run, or None when none was saved."""
        ...

    def archive_run(self, run: SavedRun) -> None:
        """Keep an ended run's description and events (not its matrices) after a newer run replaced it."""
        ...

    def archived_runs(self) -> list[SavedRun]:
        """The archived runs, oldest first (consensus None, no contributions)."""
        ...


class MemoryRunStore:
    """A RunStore in memory: kept as long as the object (tests, and state_dir None)."""

    def __init__(self) -> None:
        self._registrations: dict[str, Registration] = {}
        self._run: SavedRun | None = None
        self._archive: dict[str, SavedRun] = {}

    def save_registrations(self, registrations: Mapping[str, Registration]) -> None:
        """Replace the stored registrations with these (registrations are immutable: no copy)."""
        self._registrations = dict(registrations)

    def load_registrations(self) -> dict[str, Registration]:
        """The stored registrations."""
        return dict(self._registrations)

    def save_run(self, run: SavedRun) -> None:
        """Replace the stored run (a SavedRun is a snapshot already)."""
        self._run = run

    def load_run(self) -> SavedRun | None:
        """The stored run, or None."""
        return self._run

    def archive_run(self, run: SavedRun) -> None:
        """Keep the run without its matrices."""
        self._archive[run.run_id] = replace(run, consensus=None, contributions={})

    def archived_runs(self) -> list[SavedRun]:
        """The archived runs, oldest first."""
        return sorted(self._archive.values(), key=lambda run: run.started_wall)


class DirectoryRunStore:
    """A RunStore in a directory: atomic files, written with fsync unless `fsync` is False.

    fsync False trades power-loss durability for latency (a killed process still loses nothing).
    Reads the run saved as .npz by earlier versions when it is the only one.
    """

    def __init__(self, directory: Path | str, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in (REGISTRATIONS_FILE, RUN_FILE):
            remove_stale_temporaries(self.directory / name)

    def save_registrations(self, registrations: Mapping[str, Registration]) -> None:
        """Write every domain's pseudonyms, holder flags and cold-start policy atomically (names and policies in a JSON header: never cut)."""
        names = sorted(registrations)
        meta = {"domains": names, "cold_start": {name: registrations[name].cold_start.model_dump(mode="json") for name in names}}
        arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        for index, name in enumerate(names):
            arrays[f"pseudonyms_{index}"] = registrations[name].pseudonyms
            arrays[f"holder_{index}"] = registrations[name].holder
        write_arrays_atomically(self.directory / REGISTRATIONS_FILE, arrays, self.fsync)
        (self.directory / LEGACY_REGISTRATIONS_FILE).unlink(missing_ok=True)

    def registrations_path(self) -> Path | None:
        """The registrations file a restart reads (the current one, else an earlier version's), or None."""
        for name in (REGISTRATIONS_FILE, LEGACY_REGISTRATIONS_FILE):
            if (self.directory / name).exists():
                return self.directory / name
        return None

    def load_registrations(self) -> dict[str, Registration]:
        """The registrations in the directory (fingerprints recomputed from the rows); StateFileError naming a damaged file."""
        path = self.registrations_path()
        registrations: dict[str, Registration] = {}
        if path is None:
            return registrations
        saved = read_arrays_or_npz(path)
        try:
            meta = json.loads(saved["meta"].tobytes()) if "meta" in saved else {"domains": saved["domains"].tolist()}
            # files of versions before cold-start policies hold none: those domains served without a cap
            policies = meta.get("cold_start", {})
            for index, name in enumerate(meta["domains"]):
                pseudonyms, holder = saved[f"pseudonyms_{index}"], saved[f"holder_{index}"]
                if pseudonyms.ndim != 2 or holder.shape != (len(pseudonyms),):
                    raise ValueError(f"rows of {name!r} are malformed")
                policy = ColdStartPolicy.model_validate(policies.get(name, {}))
                registrations[str(name)] = Registration(str(name), pseudonyms, holder.astype(bool), membership_fingerprint(pseudonyms, holder), policy)
        except (KeyError, ValueError, TypeError) as error:
            raise StateFileError(f"{path}: damaged registrations ({type(error).__name__}: {error}); {_START_OVER}") from error
        return registrations

    def save_run(self, run: SavedRun) -> None:
        """Write the run as one container: its description as JSON, Z and the kept contributions."""
        arrays = {"meta": np.frombuffer(json.dumps(_meta(run)).encode(), dtype=np.uint8)}
        if run.consensus is not None:
            arrays["consensus"] = run.consensus
        for index, name in enumerate(run.domains):
            if name in run.contributions:
                arrays[f"contribution_{index}"] = run.contributions[name]
        write_arrays_atomically(self.directory / RUN_FILE, arrays, self.fsync)
        # the new file is in place: an older-format run must never be restored instead of it
        (self.directory / LEGACY_RUN_FILE).unlink(missing_ok=True)

    def archive_run(self, run: SavedRun) -> None:
        """Write runs/<run_id>.arrays atomically: the run's description and events, checksummed like every state file."""
        folder = self.directory / ARCHIVE_DIR
        folder.mkdir(exist_ok=True)
        meta = np.frombuffer(json.dumps(_meta(run)).encode(), dtype=np.uint8)
        write_arrays_atomically(folder / f"{run.run_id}{ARCHIVE_SUFFIX}", {"meta": meta}, self.fsync)

    def archived_runs(self) -> list[SavedRun]:
        """The runs under runs/, oldest first; StateFileError (or ConfigError) naming a file that cannot be used."""
        runs = []
        for path in sorted((self.directory / ARCHIVE_DIR).glob(f"*{ARCHIVE_SUFFIX}")):
            saved = read_arrays(path)
            try:
                meta = json.loads(saved["meta"].tobytes())
            except (KeyError, ValueError) as error:
                raise StateFileError(f"{path}: damaged archived run ({type(error).__name__}: {error}); move it away") from error
            runs.append(_from_meta(path, meta, {}))
        return sorted(runs, key=lambda run: run.started_wall)

    def load_run(self) -> SavedRun | None:
        """The run in the directory (the current container, else an earlier version's .npz), or None."""
        path = self.directory / RUN_FILE
        if not path.exists():
            path = self.directory / LEGACY_RUN_FILE
            if not path.exists():
                return None
        saved = read_arrays_or_npz(path)
        try:
            meta: dict[str, Any] = json.loads(saved["meta"].tobytes())
        except (KeyError, ValueError, TypeError) as error:
            raise StateFileError(f"{path}: damaged run description ({type(error).__name__}: {error}); {_START_OVER}") from error
        run = _from_meta(path, meta, saved)
        consensus = run.consensus
        if run.params.secure_aggregation:
            # a secure run keeps the masked ring sum: any uint64 is a valid element
            if consensus is not None and (consensus.dtype != np.uint64 or consensus.ndim != 2):
                raise StateFileError(f"{path}: the stored masked sum of a secure run is not a uint64 matrix; {_START_OVER}")
        elif consensus is not None and (consensus.dtype != np.float32 or consensus.ndim != 2 or not np.isfinite(consensus).all()):
            raise StateFileError(f"{path}: the stored consensus is not a finite float32 matrix; {_START_OVER}")
        return run


def _meta(run: SavedRun) -> dict[str, Any]:
    """A run's description as JSON-ready values (everything but its matrices)."""
    return {
        "run_id": run.run_id,
        "params": run.params.model_dump(mode="json"),
        "domains": list(run.domains),
        "fingerprints": run.fingerprints,
        "state": run.state,
        "current_round": run.current_round,
        "consensus_round": run.consensus_round,
        "tags": run.tags,
        "contribution_counts": run.contribution_counts,
        "started_wall": run.started_wall,
        "metrics": {d: {str(r): m for r, m in rounds.items()} for d, rounds in run.metrics.items()},
        "events": [asdict(event) for event in run.events],
        "stop_reason": run.stop_reason,
        "consensus_contributors": [[domain, tag] for domain, tag in run.consensus_contributors],
    }


def _from_meta(path: Path, meta: dict[str, Any], saved: Mapping[str, np.ndarray]) -> SavedRun:
    """A SavedRun from its description and arrays; ConfigError naming `path` when its parameters are invalid."""
    try:
        params = RunParams.model_validate(meta.get("params"))
    except Exception as error:
        raise ConfigError(f"{path}: stored run parameters are invalid: {error}") from error
    try:
        return _saved_run(meta, params, saved)
    except (KeyError, ValueError, TypeError) as error:
        raise StateFileError(f"{path}: damaged run description ({type(error).__name__}: {error}); {_START_OVER}") from error


def _saved_run(meta: dict[str, Any], params: RunParams, saved: Mapping[str, np.ndarray]) -> SavedRun:
    """A SavedRun from a run file's description and arrays (KeyError/ValueError when they are malformed)."""
    domains = meta["domains"]
    return SavedRun(
        run_id=meta["run_id"],
        params=params,
        fingerprints={d: meta["fingerprints"][d] for d in domains},
        state=meta["state"],
        current_round=meta["current_round"],
        consensus_round=meta["consensus_round"],
        consensus=saved.get("consensus"),
        tags={name: int(tag) for name, tag in meta["tags"].items()},
        contributions={name: saved[f"contribution_{i}"] for i, name in enumerate(domains) if f"contribution_{i}" in saved},
        contribution_counts={d: int(c) for d, c in meta["contribution_counts"].items()},
        started_wall=meta["started_wall"],
        metrics={d: {int(r): m for r, m in rounds.items()} for d, rounds in meta["metrics"].items()},
        events=tuple(Event(**event) for event in meta["events"]),
        stop_reason=meta["stop_reason"],
        # absent from runs saved before contributor lists were kept
        consensus_contributors=tuple((str(domain), int(tag)) for domain, tag in meta.get("consensus_contributors", [])),
    )
