"""Where the aggregator keeps registrations and its run: a RunStore protocol, in memory or in a directory.

Both stores keep the same things, so tests/test_run_store.py runs one suite against both:
registrations when they change; each contribution when it arrives, before its push is acked
(one file per domain, its latest: the push of a round's last domain is as cheap as any other);
and at round boundaries a commit record: the run's description, naming the Z file written
just before it and the contributions it still uses. A restart reads the record, its Z, and
the contributions that arrived after it (accepted again: nobody pushes twice what was acked).
"""

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cdimf.aggregator.rounds import Event, SavedRun
from cdimf.common.atomic_files import (
    StateFileError,
    read_arrays,
    read_arrays_or_npz,
    remove_stale_temporaries,
    write_arrays_atomically,
)
from cdimf.common.config import ColdStartPolicy, ConfigError, RunParams
from cdimf.common.security.pseudonyms import membership_fingerprint

# checksummed containers (cdimf.common.atomic_files); the .npz of earlier versions is still read
# when it is the only one
REGISTRATIONS_FILE = "registrations.arrays"
LEGACY_REGISTRATIONS_FILE = "registrations.npz"
# the commit record, written every round after its Z file and before Z is served: the run's
# description only (runs of earlier versions held Z and the contributions in it, and still load);
# the .npz of earlier versions is still read when it is the only one
RUN_FILE = "run.arrays"
# contributions/<domain>.arrays: a domain's latest accepted contribution, written before its ack
CONTRIBUTIONS_DIR = "contributions"
# consensus/<round>.arrays: the Z of a round, written before the record that names it
CONSENSUS_DIR = "consensus"
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

    def save_contribution(self, run_id: str, domain: str, tag: int, values: np.ndarray) -> None:
        """Keep a contribution durably before it is accepted (replacing the domain's previous one)."""
        ...

    def save_run(self, run: SavedRun) -> None:
        """Replace the stored run with this one (a commit: contributions it no longer uses may go)."""
        ...

    def load_run(self) -> SavedRun | None:
        """The stored run with the contributions that arrived after it (SavedRun.arrived), or None when none was saved."""
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
        # domain -> (run id, tag, values): the latest saved contribution (the same array the run holds)
        self._contributions: dict[str, tuple[str, int, np.ndarray]] = {}

    def save_registrations(self, registrations: Mapping[str, Registration]) -> None:
        """Replace the stored registrations with these (registrations are immutable: no copy)."""
        self._registrations = dict(registrations)

    def load_registrations(self) -> dict[str, Registration]:
        """The stored registrations."""
        return dict(self._registrations)

    def save_contribution(self, run_id: str, domain: str, tag: int, values: np.ndarray) -> None:
        """Keep a reference to the contribution (never modified in place: no copy)."""
        self._contributions[domain] = (run_id, tag, values)

    def save_run(self, run: SavedRun) -> None:
        """Replace the stored run (a SavedRun is a snapshot already) and let go of contributions it no longer uses."""
        self._run = run
        # held on, a synchronous run's used contributions would double the memory in the next round
        self._contributions = {d: kept for d, kept in self._contributions.items() if not _consumed(run, d, kept[0], kept[1])}

    def load_run(self) -> SavedRun | None:
        """The stored run and the contributions saved after it, or None."""
        if self._run is None:
            return None
        run = self._run
        arrived = {d: (tag, values) for d, (run_id, tag, values) in self._contributions.items()
                   if run_id == run.run_id and d in run.fingerprints and tag > run.tags.get(d, 0)}
        return replace(run, arrived=arrived)

    def archive_run(self, run: SavedRun) -> None:
        """Keep the run without its matrices."""
        self._archive[run.run_id] = replace(run, consensus=None, contributions={}, arrived={})

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
        for folder in (CONTRIBUTIONS_DIR, CONSENSUS_DIR):
            # temp files of writes killed before their rename (of files that may not exist yet)
            for stale in (self.directory / folder).glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        # domain -> (run id, tag) of its contribution file, as written or read here
        self._contribution_files: dict[str, tuple[str, int]] = {}
        # (run id, round) of the Z file on disk that the next record may name without writing it again
        self._consensus_file: tuple[str, int] | None = None

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

    def contribution_path(self, domain: str) -> Path:
        """Where a domain's latest contribution is kept (domain names are party names: safe file names)."""
        return self.directory / CONTRIBUTIONS_DIR / f"{domain}{ARCHIVE_SUFFIX}"

    def consensus_path(self, round_index: int) -> Path:
        """Where the Z of a round is kept until a later round's record replaces it."""
        return self.directory / CONSENSUS_DIR / f"{round_index}{ARCHIVE_SUFFIX}"

    def save_contribution(self, run_id: str, domain: str, tag: int, values: np.ndarray) -> None:
        """Write contributions/<domain>.arrays atomically: the run, round tag and values, checksummed (StateWriteError on failure)."""
        meta = {"run_id": run_id, "domain": domain, "tag": tag}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), "values": values}
        write_arrays_atomically(self.contribution_path(domain), arrays, self.fsync)
        self._contribution_files[domain] = (run_id, tag)

    def save_run(self, run: SavedRun) -> None:
        """Commit the run: its Z file (once per round), then the record naming it; then drop the files it no longer needs.

        The contributions are on disk already (save_contribution), so a round's close writes Z and
        a few kilobytes. A crash between the two writes leaves the previous record in force and
        the new Z file unnamed: the restart removes it and closes the round again from the same
        contributions.
        """
        for domain, values in run.contributions.items():
            # a kept contribution this store has no file of: one a run of an earlier version held
            # inside its run file, or one taken before this store replaced another
            if self._contribution_files.get(domain) != (run.run_id, run.tags[domain]):
                self.save_contribution(run.run_id, domain, run.tags[domain], values)
        meta = _meta(run)
        if run.consensus is not None:
            if self._consensus_file != (run.run_id, run.consensus_round):
                z_meta = np.frombuffer(json.dumps({"run_id": run.run_id, "round": run.consensus_round}).encode(), dtype=np.uint8)
                write_arrays_atomically(self.consensus_path(run.consensus_round), {"meta": z_meta, "consensus": run.consensus}, self.fsync)
                self._consensus_file = (run.run_id, run.consensus_round)
            meta["consensus_file"] = self.consensus_path(run.consensus_round).name
        meta["kept_contributions"] = {d: run.tags[d] for d in run.contributions}
        write_arrays_atomically(self.directory / RUN_FILE, {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}, self.fsync)
        # the new record is in place: an older-format run must never be restored instead of it
        (self.directory / LEGACY_RUN_FILE).unlink(missing_ok=True)
        self._drop_unused(run)

    def _drop_unused(self, run: SavedRun) -> None:
        """Remove the Z files other than the record's and the contributions the run no longer uses (disk space only: a restart ignores them)."""
        named = self.consensus_path(run.consensus_round).name if run.consensus is not None else None
        for path in (self.directory / CONSENSUS_DIR).glob(f"*{ARCHIVE_SUFFIX}"):
            if path.name != named:
                path.unlink(missing_ok=True)
        for domain, (run_id, tag) in list(self._contribution_files.items()):
            if _consumed(run, domain, run_id, tag):
                self.contribution_path(domain).unlink(missing_ok=True)
                del self._contribution_files[domain]
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
        """The run in the directory (the current record, else an earlier version's .npz) and the contributions that arrived after it, or None.

        StateFileError naming the file for a damaged or missing file the run needs (its Z, a
        contribution it still uses, or any contribution file: it may be one that was acked).
        """
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
        arrays = dict(saved)
        files = self._contribution_files_of(meta, path)
        if "consensus_file" in meta:
            arrays["consensus"] = self._consensus_of(meta, path)
        kept: dict[str, Any] = meta.get("kept_contributions", {})
        arrived: dict[str, tuple[int, np.ndarray]] = {}
        domains = list(meta.get("domains", []))
        for domain, (tag, values, file) in files.items():
            if domain in kept and tag == kept[domain]:
                arrays[f"contribution_{domains.index(domain)}"] = values
            elif tag > int(meta.get("tags", {}).get(domain, 0)):
                arrived[domain] = (tag, values)
            elif domain in kept:
                raise StateFileError(f"{file}: holds round {tag} of {domain}, the run needs round {kept[domain]}; {_START_OVER}")
        missing = [d for d in kept if d not in files]
        if missing:
            raise StateFileError(f"{self.contribution_path(missing[0])}: missing, and run {meta.get('run_id')} still uses it; {_START_OVER}")
        run = replace(_from_meta(path, meta, arrays), arrived=arrived)
        consensus = run.consensus
        if run.params.secure_aggregation:
            # a secure run keeps the masked ring sum: any uint64 is a valid element
            if consensus is not None and (consensus.dtype != np.uint64 or consensus.ndim != 2):
                raise StateFileError(f"{path}: the stored masked sum of a secure run is not a uint64 matrix; {_START_OVER}")
        elif consensus is not None and (consensus.dtype != np.float32 or consensus.ndim != 2 or not np.isfinite(consensus).all()):
            raise StateFileError(f"{path}: the stored consensus is not a finite float32 matrix; {_START_OVER}")
        return run

    def _consensus_of(self, meta: dict[str, Any], record: Path) -> np.ndarray:
        """The Z file a record names, checked to be of its run and round; StateFileError naming it."""
        path = self.directory / CONSENSUS_DIR / str(meta["consensus_file"])
        if not path.exists():
            raise StateFileError(f"{path}: missing, and {record} names it as the consensus of round {meta.get('consensus_round')}; {_START_OVER}")
        stored = read_arrays(path)
        try:
            z_meta = json.loads(stored["meta"].tobytes())
            consensus = stored["consensus"]
        except (KeyError, ValueError, TypeError) as error:
            raise StateFileError(f"{path}: damaged consensus file ({type(error).__name__}: {error}); {_START_OVER}") from error
        if z_meta.get("run_id") != meta.get("run_id") or z_meta.get("round") != meta.get("consensus_round"):
            raise StateFileError(f"{path}: holds run {z_meta.get('run_id')} round {z_meta.get('round')}, {record} names run "
                                 f"{meta.get('run_id')} round {meta.get('consensus_round')}; {_START_OVER}")
        # Z files of rounds the record does not name (a close killed before its record) go at the next commit
        self._consensus_file = (str(meta["run_id"]), int(meta["consensus_round"]))
        return consensus

    def _contribution_files_of(self, meta: dict[str, Any], record: Path) -> dict[str, tuple[int, np.ndarray, Path]]:
        """The contribution files of the record's run, by domain: (tag, values, path); those of other runs are left out.

        A damaged file is refused naming it, whichever run it is of: it may hold an acked contribution.
        """
        found: dict[str, tuple[int, np.ndarray, Path]] = {}
        self._contribution_files = {}
        for path in sorted((self.directory / CONTRIBUTIONS_DIR).glob(f"*{ARCHIVE_SUFFIX}")):
            try:
                stored = read_arrays(path)
            except StateFileError as error:
                raise StateFileError(f"{error}; this contribution may have been acked: restore it from a backup, or move it away"
                                     " (its domain is then asked to push that round again)") from error
            try:
                c_meta = json.loads(stored["meta"].tobytes())
                run_id, domain, tag, values = str(c_meta["run_id"]), str(c_meta["domain"]), int(c_meta["tag"]), stored["values"]
            except (KeyError, ValueError, TypeError) as error:
                raise StateFileError(f"{path}: damaged contribution ({type(error).__name__}: {error}); move it away to drop it"
                                     " (its domain is then asked to push that round again)") from error
            if path != self.contribution_path(domain):
                raise StateFileError(f"{path}: holds the contribution of {domain}; move it away")
            self._contribution_files[domain] = (run_id, tag)
            if run_id != meta.get("run_id") or domain not in meta.get("domains", []):
                continue  # of an earlier run: never used again, removed at the next commit
            found[domain] = (tag, values, path)
        return found


def stored_run_arrays(directory: Path | str) -> dict[str, np.ndarray]:
    """The stored run's arrays in one mapping, read without changing anything (tools, tests): meta, consensus, contribution_<i> of the kept ones."""
    folder = Path(directory)
    arrays = read_arrays_or_npz(folder / RUN_FILE if (folder / RUN_FILE).exists() else folder / LEGACY_RUN_FILE)
    meta = json.loads(arrays["meta"].tobytes())
    if "consensus_file" in meta:
        arrays["consensus"] = read_arrays(folder / CONSENSUS_DIR / meta["consensus_file"])["consensus"]
    for domain, tag in meta.get("kept_contributions", {}).items():
        stored = read_arrays(folder / CONTRIBUTIONS_DIR / f"{domain}{ARCHIVE_SUFFIX}")
        if json.loads(stored["meta"].tobytes())["tag"] == tag:
            arrays[f"contribution_{meta['domains'].index(domain)}"] = stored["values"]
    return arrays


def _consumed(run: SavedRun, domain: str, run_id: str, tag: int) -> bool:
    """Whether a saved contribution is of no use after `run` was committed: of another run, or used and not kept."""
    if run_id != run.run_id:
        return True
    return domain not in run.contributions and tag <= run.tags.get(domain, 0)


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
        "reported": list(run.reported),
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
        # absent from runs of earlier versions, which saved records only at closes (nobody reported yet) and stops
        reported=tuple(str(domain) for domain in meta.get("reported", [])),
    )
