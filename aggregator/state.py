"""The aggregator's bookkeeping as a plain class: registrations, the frozen membership of a run,
rounds, contributions, consensus, metrics, events and atomic persistence. No gRPC in here.

Rules (issue 4):
- A domain registers all its rows (pseudonym + holder flag). Membership (which rows are shared,
  which are receivers, who holds what) comes from cdimf.common.core.membership.align_memberships over the
  pseudonyms, exactly as the in-process engine aligns raw keys.
- StartRun admits the registered domains and freezes their membership; rounds count from 1.
- A push tagged t from domain d while round c is open is accepted when t <= c, t is newer than
  d's latest accepted tag and c - t <= max_staleness; it replaces d's contribution and marks d
  as reported in round c. Round c closes when every admitted domain reported, or when the
  deadline has passed and at least min_domains reported; then Z = prox(mean of each domain's
  latest accepted contribution) over holders (cdimf.common.core.admm.consensus), the state is saved, and
  round c + 1 opens (the run finishes after `rounds`).
- Every rejection raises StateError with a status name and changes nothing.
"""

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cdimf.common.atomic_files import read_arrays_or_npz, write_arrays_atomically, write_npz_atomically
from cdimf.common.config import ConfigError, RunParams
from cdimf.common.core.admm import consensus
from cdimf.common.core.membership import align_memberships
from cdimf.common.core.params import ADMMParams
from cdimf.common.security.pseudonyms import PSEUDONYM_BYTES, as_keys, membership_fingerprint

MAX_DOMAINS = 64  # holder masks are uint64
ROLE_LOCAL, ROLE_SHARED, ROLE_RECEIVER = 1, 2, 3  # values of the proto's RowRole
StatusName = Literal["INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED"]
RunStateName = Literal["running", "finished", "stopped"]
REGISTRATIONS_FILE = "registrations.npz"
# Z is computed in blocks of rows whose float64 temporaries take about this many bytes: small
# enough for cache (at 10k x 192, 4096-row blocks took 26 ms a round, ~512-row ones 16 ms).
CONSENSUS_BLOCK_BYTES = 512 * 1024
# written every round before Z is served: the plain container (cdimf.common.atomic_files) skips the
# zip CRC pass over Z; the .npz of earlier versions is still read when it is the only one
RUN_FILE = "run.arrays"
LEGACY_RUN_FILE = "run.npz"


class StateError(Exception):
    """A request the state refuses; `status` names the gRPC status code the server answers with."""

    def __init__(self, status: StatusName, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Registration:
    """One domain's registered rows: pseudonyms (n, 32) uint8 and holder flags (n,) bool."""

    domain: str
    pseudonyms: np.ndarray
    holder: np.ndarray
    fingerprint: str


@dataclass(frozen=True)
class DomainLayout:
    """A domain's place in a membership: per-row roles and holder masks, and its exchanged rows.

    shared_rows/receiver_rows index the domain's registered rows (ascending); shared_index and
    receiver_index are their positions in the run's exchanged-row space (the rows of Z).
    """

    roles: np.ndarray
    holder_masks: np.ndarray
    shared_rows: np.ndarray
    shared_index: np.ndarray
    receiver_rows: np.ndarray
    receiver_index: np.ndarray

    @property
    def pull_index(self) -> np.ndarray:
        """Rows of Z a domain pulls: its shared rows then its receiver rows."""
        return np.concatenate([self.shared_index, self.receiver_index])


@dataclass(frozen=True)
class Layout:
    """The membership of a set of domains (bit i of a holder mask = domains[i])."""

    domains: tuple[str, ...]
    per_domain: dict[str, DomainLayout]
    exchanged_rows: int


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2.4's plain np.unique hashes, ~50x slower on a million ints."""
    ordered = np.sort(values)
    if len(ordered) == 0:
        return ordered
    return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])]


def sortable_keys(pseudonym_sets: list[np.ndarray]) -> list[np.ndarray]:
    """Keys that order and compare like the pseudonyms: their first 8 bytes as uint64 when those
    tell every distinct pseudonym apart (all but certainly: HMAC outputs), else the full 32 bytes.

    Sorting and searching uint64 is ~10x faster than 32-byte strings at a million users.
    """
    everything = np.concatenate(pseudonym_sets) if pseudonym_sets else np.zeros((0, PSEUDONYM_BYTES), np.uint8)
    prefixes = np.ascontiguousarray(everything[:, :8]).view("<u8").reshape(-1)
    _, first, group = np.unique(prefixes, return_index=True, return_inverse=True)
    if np.array_equal(everything, everything[first[group]]):
        bounds = np.cumsum([0] + [len(part) for part in pseudonym_sets])
        return [prefixes[bounds[i] : bounds[i + 1]] for i in range(len(pseudonym_sets))]
    # two pseudonyms share their first 8 bytes: compare whole digests
    return [as_keys(part) for part in pseudonym_sets]


def compute_layout(registrations: dict[str, Registration]) -> Layout:
    """Align the domains' pseudonyms; domains are ordered by name (the summation order of Z)."""
    domains = tuple(sorted(registrations))
    if len(domains) > MAX_DOMAINS:
        raise StateError("RESOURCE_EXHAUSTED", f"at most {MAX_DOMAINS} domains, got {len(domains)}")
    keys = sortable_keys([registrations[d].pseudonyms for d in domains])
    holds = [registrations[d].holder for d in domains]
    # which rows are shared or received: the engine's own rule, on the pseudonyms
    memberships, _ = align_memberships(keys, holds)
    # global ids of every registered row (a sort with inverse, no per-domain binary searches)
    _, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    bounds = np.cumsum([0] + [len(k) for k in keys])
    global_ids = [inverse[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(len(keys))]
    n_global = int(inverse.max()) + 1 if len(inverse) else 0
    holder_mask_global = np.zeros(n_global, dtype=np.uint64)
    for bit, (ids, held) in enumerate(zip(global_ids, holds)):
        holder_mask_global[ids[held]] |= np.uint64(1 << bit)
    # Z lives only on exchanged rows (shared or received somewhere): rows one domain holds alone
    # never cross the network, and prox is per row, so values equal the engine's full Z.
    exchanged_global = np.zeros(n_global, dtype=bool)
    for ids, membership in zip(global_ids, memberships):
        exchanged_global[ids[membership.shared_rows]] = True
        exchanged_global[ids[membership.receiver_rows]] = True
    position = np.cumsum(exchanged_global) - 1  # row of Z for each exchanged global id
    exchanged = int(exchanged_global.sum())
    per_domain = {}
    for name, ids, membership in zip(domains, global_ids, memberships):
        roles = np.full(len(ids), ROLE_LOCAL, dtype=np.uint8)
        roles[membership.shared_rows] = ROLE_SHARED
        roles[membership.receiver_rows] = ROLE_RECEIVER
        per_domain[name] = DomainLayout(
            roles=roles,
            holder_masks=holder_mask_global[ids],
            shared_rows=membership.shared_rows.astype(np.int64),
            shared_index=position[ids[membership.shared_rows]].astype(np.int64),
            receiver_rows=membership.receiver_rows.astype(np.int64),
            receiver_index=position[ids[membership.receiver_rows]].astype(np.int64),
        )
    return Layout(domains, per_domain, exchanged)


def blockwise_consensus(
    contributions: list[tuple[np.ndarray, np.ndarray]], n_rows: int, rank: int, admm: ADMMParams, block_rows: int | None = None
) -> np.ndarray:
    """cdimf.common.core.admm.consensus applied to blocks of rows: the same values (mean and prox are per row,
    domains summed in the same order) with temporaries of one block instead of a float64 copy of
    everything, and cache-sized passes (about 3x faster at a million rows). block_rows None:
    rows of about CONSENSUS_BLOCK_BYTES of float64 at this rank."""
    if block_rows is None:
        block_rows = max(64, CONSENSUS_BLOCK_BYTES // (8 * max(rank, 1)))
    z = np.empty((n_rows, rank), dtype=np.float32)
    starts = np.arange(0, n_rows + block_rows, block_rows).clip(max=n_rows)
    parts = []
    for index, values in contributions:
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        parts.append((order, sorted_index, np.searchsorted(sorted_index, starts), values))
    # a loop over blocks of rows (n_rows / block_rows iterations), each one vectorised
    for block, (start, stop) in enumerate(zip(starts[:-1], starts[1:])):
        block_parts = [
            (sorted_index[cuts[block] : cuts[block + 1]] - start, values[order[cuts[block] : cuts[block + 1]]])
            for order, sorted_index, cuts, values in parts
        ]
        z[start:stop], _ = consensus(block_parts, int(stop - start), rank, admm)
    return z


@dataclass
class Event:
    """One progress event of a run (mirrors the proto RoundEvent)."""

    kind: Literal["run_started", "round_closed", "metrics", "run_finished", "run_stopped"]
    round: int
    elapsed_s: float
    contributors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    domain: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """One run: its parameters, frozen membership, open round, contributions and consensus."""

    run_id: str
    params: RunParams
    layout: Layout
    state: RunStateName = "running"
    current_round: int = 1
    consensus: np.ndarray | None = None
    consensus_round: int = 0
    # domain -> (round tag, X + U on its shared rows) of its latest accepted contribution
    contributions: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    # domain -> round tag of its latest accepted contribution (kept on restart even where the
    # values are not: synchronous runs do not save them)
    tags: dict[str, int] = field(default_factory=dict)
    contribution_counts: dict[str, int] = field(default_factory=dict)
    reported: list[str] = field(default_factory=list)
    round_opened_at: float = 0.0
    started_wall: float = 0.0
    metrics: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    stop_reason: str = ""

    @property
    def admitted(self) -> tuple[str, ...]:
        """Domains admitted to this run (sorted)."""
        return self.layout.domains


@dataclass(frozen=True)
class PushOutcome:
    """What accepting a contribution did: the round it counted in and whether that closed it."""

    accepted_round: int
    closed_round: int | None


class AggregatorState:
    """Registrations and the current run; every method validates first and mutates last.

    Not thread-safe: the server serialises calls (one asyncio lock). `clock` is monotonic
    seconds (injectable for deadline tests); `state_dir` None keeps everything in memory;
    `fsync` False trades power-loss durability for latency (a killed process still loses nothing).
    """

    def __init__(
        self, state_dir: Path | str | None = None, clock: Callable[[], float] = time.monotonic, fsync: bool = True
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.clock = clock
        self.fsync = fsync
        self.registrations: dict[str, Registration] = {}
        self.run: Run | None = None
        # aligning a million pseudonyms takes seconds; registrations change rarely
        self._layout_cache: tuple[tuple[tuple[str, str], ...], Layout] | None = None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._restore()

    # ----- registration and membership -----

    def register(self, domain: str, pseudonyms: np.ndarray, holder: np.ndarray) -> Registration:
        """Record a domain's rows; idempotent for the same rows, refused while a run uses other ones."""
        if not domain:
            raise StateError("INVALID_ARGUMENT", "header.domain is empty")
        if pseudonyms.ndim != 2 or pseudonyms.shape[1] != PSEUDONYM_BYTES or holder.shape != (len(pseudonyms),):
            raise StateError("INVALID_ARGUMENT", f"registration of {domain}: pseudonyms {pseudonyms.shape} / flags {holder.shape} malformed")
        keys = sortable_keys([pseudonyms])[0]
        if len(sorted_unique(keys)) != len(keys):
            raise StateError("INVALID_ARGUMENT", f"registration of {domain}: a pseudonym appears twice")
        registration = Registration(domain, pseudonyms.copy(), holder.astype(bool), membership_fingerprint(pseudonyms, holder))
        previous = self.registrations.get(domain)
        if previous is not None and previous.fingerprint == registration.fingerprint:
            return previous
        if self.run is not None and self.run.state == "running" and domain in self.run.admitted:
            raise StateError("FAILED_PRECONDITION", f"domain {domain} is in running run {self.run.run_id} with other rows; stop the run before re-registering")
        if previous is None and len(self.registrations) >= MAX_DOMAINS:
            raise StateError("RESOURCE_EXHAUSTED", f"at most {MAX_DOMAINS} domains can register")
        self.registrations[domain] = registration
        self._save_registrations()
        return registration

    def layout_for(self, domain: str) -> tuple[Layout, bool]:
        """The membership a domain sees: the run's frozen one when admitted, else over all registered."""
        if domain not in self.registrations:
            raise StateError("NOT_FOUND", f"domain {domain!r} is not registered")
        run = self.run
        if run is not None and run.state == "running" and domain in run.admitted:
            return run.layout, True
        return self.current_layout(), False

    def current_layout(self) -> Layout:
        """The membership over every registered domain (cached until a registration changes)."""
        key = tuple((name, self.registrations[name].fingerprint) for name in sorted(self.registrations))
        if self._layout_cache is None or self._layout_cache[0] != key:
            self._layout_cache = (key, compute_layout(self.registrations))
        return self._layout_cache[1]

    # ----- runs -----

    def start_run(self, params: RunParams) -> Run:
        """Admit every registered domain and open round 1."""
        if self.run is not None and self.run.state == "running":
            if params.run_id is not None and params.run_id == self.run.run_id:
                raise StateError("ALREADY_EXISTS", f"run {params.run_id} is already running")
            raise StateError("FAILED_PRECONDITION", f"run {self.run.run_id} is still running; stop it first")
        if params.run_id is not None and self.run is not None and params.run_id == self.run.run_id:
            raise StateError("ALREADY_EXISTS", f"run {params.run_id} already ran; pick another run id")
        if len(self.registrations) < params.min_domains:
            raise StateError("FAILED_PRECONDITION", f"{len(self.registrations)} domains registered, the run needs min_domains = {params.min_domains}")
        unknown = sorted(set(params.domain_aggregation_period) - set(self.registrations))
        if unknown:
            raise StateError("INVALID_ARGUMENT", f"domain_aggregation_period names unregistered domains {unknown}")
        layout = self.current_layout()
        run_id = params.run_id or f"run-{uuid.uuid4().hex[:12]}"
        run = Run(run_id, params.model_copy(update={"run_id": run_id}), layout, round_opened_at=self.clock(), started_wall=time.time())
        run.events.append(Event("run_started", 0, 0.0))
        self.run = run
        self._save_run()
        return run

    def stop_run(self, run_id: str, reason: str = "") -> Run:
        """Stop the running run (its last Z stays pullable)."""
        run = self._run(run_id)
        if run.state != "running":
            raise StateError("FAILED_PRECONDITION", f"run {run.run_id} is already {run.state}")
        run.state = "stopped"
        run.stop_reason = reason
        run.events.append(Event("run_stopped", run.current_round, self._elapsed(run)))
        self._save_run()
        return run

    def _run(self, run_id: str) -> Run:
        """The current run if `run_id` names it, else StateError NOT_FOUND."""
        if self.run is None or (run_id and run_id != self.run.run_id) or not run_id:
            raise StateError("NOT_FOUND", f"unknown run {run_id!r}" + (f" (current run is {self.run.run_id})" if self.run else " (no run started)"))
        return self.run

    def _admitted_run(self, run_id: str, domain: str) -> Run:
        """The current run if `run_id` names it and `domain` was admitted to it."""
        run = self._run(run_id)
        if domain not in run.admitted:
            raise StateError("NOT_FOUND", f"domain {domain!r} is not admitted to run {run.run_id}")
        return run

    # ----- rounds -----

    def check_contribution(self, run_id: str, domain: str, tag: int) -> tuple[int, int]:
        """Validate a push before its payload is read; returns the expected (rows, rank)."""
        run = self._admitted_run(run_id, domain)
        if run.state != "running":
            raise StateError("FAILED_PRECONDITION", f"run {run.run_id} is {run.state}")
        if tag < 1:
            raise StateError("INVALID_ARGUMENT", "contribution round must be >= 1")
        if tag > run.current_round:
            raise StateError("FAILED_PRECONDITION", f"round {tag} is not open yet (open round: {run.current_round})")
        latest = run.tags.get(domain, 0)
        if tag == latest:
            raise StateError("ALREADY_EXISTS", f"domain {domain} already contributed to round {tag}")
        if tag < latest:
            raise StateError("FAILED_PRECONDITION", f"round {tag} is older than domain {domain}'s latest contribution (round {latest})")
        if run.current_round - tag > run.params.max_staleness:
            raise StateError("FAILED_PRECONDITION", f"contribution of round {tag} is {run.current_round - tag} rounds stale (open round {run.current_round}, max_staleness {run.params.max_staleness})")
        return len(run.layout.per_domain[domain].shared_rows), run.params.rank

    def accept_contribution(self, run_id: str, domain: str, tag: int, values: np.ndarray) -> PushOutcome:
        """Take a decoded contribution (re-checked: the round may have moved while it streamed)."""
        expected = self.check_contribution(run_id, domain, tag)
        if values.shape != expected:
            raise StateError("INVALID_ARGUMENT", f"contribution of {domain} has shape {values.shape}, expected {expected}")
        if values.dtype != np.float32 or not np.isfinite(values).all():
            raise StateError("INVALID_ARGUMENT", f"contribution of {domain} must be finite float32")
        run = self.run
        assert run is not None
        run.contributions[domain] = (tag, values)
        run.tags[domain] = tag
        run.contribution_counts[domain] = run.contribution_counts.get(domain, 0) + 1
        if domain not in run.reported:
            run.reported.append(domain)
        accepted_round = run.current_round
        return PushOutcome(accepted_round, self.poll())

    def deadline_at(self) -> float | None:
        """Clock time when the open round's deadline passes (None: synchronous or not running)."""
        run = self.run
        if run is None or run.state != "running" or run.params.round_deadline_s <= 0:
            return None
        return run.round_opened_at + run.params.round_deadline_s

    def poll(self) -> int | None:
        """Close the open round when its rule says so; returns the closed round or None."""
        run = self.run
        if run is None or run.state != "running":
            return None
        everyone = len(run.reported) == len(run.admitted)
        deadline = self.deadline_at()
        timed_out = deadline is not None and self.clock() >= deadline and len(run.reported) >= run.params.min_domains
        if not (everyone or timed_out):
            return None
        return self._close_round(run)

    def _close_round(self, run: Run) -> int:
        """Z over the open round's contributions, a round_closed event, the next round opened, state saved; returns the closed round."""
        closed = run.current_round
        # sum in domain-name order, the same order for every round and after a restart
        contributions = [
            (run.layout.per_domain[d].shared_index, run.contributions[d][1]) for d in run.admitted if d in run.contributions
        ]
        run.consensus = blockwise_consensus(contributions, run.layout.exchanged_rows, run.params.rank, run.params.admm)
        run.consensus_round = closed
        contributors = [d for d in run.admitted if d in run.reported]
        missing = [d for d in run.admitted if d not in run.reported]
        run.events.append(Event("round_closed", closed, self._elapsed(run), contributors, missing))
        run.reported = []
        run.current_round = closed + 1
        run.round_opened_at = self.clock()
        if closed >= run.params.rounds:
            run.state = "finished"
            run.events.append(Event("run_finished", closed, self._elapsed(run)))
        self._save_run()
        return closed

    def consensus_for(self, run_id: str, domain: str, min_round: int) -> tuple[int, np.ndarray] | None:
        """The newest Z (round, rows for the domain: shared then receivers) if its round >= min_round.

        None means "not yet" (wait and ask again). Refuses a wait that cannot end: the run is
        over without such a round, or the domain never pushed the round it waits for (e.g. the
        aggregator restarted from the last round's state and lost it): push it again.
        """
        run = self._admitted_run(run_id, domain)
        if run.consensus is not None and run.consensus_round >= max(min_round, 1):
            return run.consensus_round, run.consensus[run.layout.per_domain[domain].pull_index]
        if run.state != "running":
            raise StateError("FAILED_PRECONDITION", f"run {run.run_id} is {run.state} at round {run.consensus_round}; no consensus of round {min_round} will come")
        if min_round > run.current_round:
            raise StateError("FAILED_PRECONDITION", f"round {min_round} is not open yet (open round: {run.current_round})")
        latest = run.tags.get(domain, 0)
        if min_round >= 1 and latest < min_round and min_round == run.current_round:
            raise StateError("FAILED_PRECONDITION", f"no contribution of round {min_round} from {domain} is held; push it again")
        return None

    def report_metrics(self, run_id: str, domain: str, round_index: int, metrics: dict[str, float]) -> None:
        """Record a domain's validation metrics for a round (once per domain and round)."""
        run = self._admitted_run(run_id, domain)
        if round_index > run.consensus_round:
            raise StateError("FAILED_PRECONDITION", f"metrics for round {round_index} but the latest consensus is round {run.consensus_round}")
        if not all(np.isfinite(value) for value in metrics.values()):
            raise StateError("INVALID_ARGUMENT", f"metrics of {domain} must be finite numbers")
        per_round = run.metrics.setdefault(domain, {})
        if round_index in per_round:
            raise StateError("ALREADY_EXISTS", f"{domain} already reported metrics for round {round_index}")
        per_round[round_index] = dict(metrics)
        run.events.append(Event("metrics", round_index, self._elapsed(run), domain=domain, metrics=dict(metrics)))

    def _elapsed(self, run: Run) -> float:
        """Wall seconds since the run started (event timestamps)."""
        return max(0.0, time.time() - run.started_wall)

    # ----- persistence -----

    def _save_registrations(self) -> None:
        """Write every domain's pseudonyms and holder flags atomically."""
        if self.state_dir is None:
            return
        arrays: dict[str, np.ndarray] = {"domains": np.array(sorted(self.registrations), dtype="U64")}
        for index, name in enumerate(sorted(self.registrations)):
            arrays[f"pseudonyms_{index}"] = self.registrations[name].pseudonyms
            arrays[f"holder_{index}"] = self.registrations[name].holder
        write_npz_atomically(self.state_dir / REGISTRATIONS_FILE, arrays, self.fsync)

    def _save_run(self) -> None:
        """Write the run at a round boundary: params, round, Z, contributions, metrics, events.

        Synchronous runs skip the contributions: a round closes only when every domain sent a
        fresh one, so after a restart the next Z never uses an older one (this cuts the
        per-round write from three matrices to one at two domains). Their rounds are kept.
        """
        if self.state_dir is None or self.run is None:
            return
        run = self.run
        meta = {
            "run_id": run.run_id,
            "params": run.params.model_dump(mode="json"),
            "domains": list(run.admitted),
            "fingerprints": {d: self.registrations[d].fingerprint for d in run.admitted},
            "state": run.state,
            "current_round": run.current_round,
            "consensus_round": run.consensus_round,
            "tags": run.tags,
            "contribution_counts": run.contribution_counts,
            "started_wall": run.started_wall,
            "metrics": {d: {str(r): m for r, m in rounds.items()} for d, rounds in run.metrics.items()},
            "events": [event.__dict__ for event in run.events],
            "stop_reason": run.stop_reason,
        }
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        if run.consensus is not None:
            arrays["consensus"] = run.consensus
        if run.params.round_deadline_s > 0:
            for index, name in enumerate(run.admitted):
                if name in run.contributions:
                    arrays[f"contribution_{index}"] = run.contributions[name][1]
        write_arrays_atomically(self.state_dir / RUN_FILE, arrays, self.fsync)
        # the new file is in place: an older-format run must never be restored instead of it
        (self.state_dir / LEGACY_RUN_FILE).unlink(missing_ok=True)

    def _restore(self) -> None:
        """Load the registrations and the run from state_dir (after a restart)."""
        assert self.state_dir is not None
        path = self.state_dir / REGISTRATIONS_FILE
        if path.exists():
            with np.load(path, allow_pickle=False) as saved:
                for index, name in enumerate(saved["domains"].tolist()):
                    pseudonyms, holder = saved[f"pseudonyms_{index}"], saved[f"holder_{index}"]
                    self.registrations[name] = Registration(name, pseudonyms, holder, membership_fingerprint(pseudonyms, holder))
        path = self.state_dir / RUN_FILE
        if not path.exists():
            path = self.state_dir / LEGACY_RUN_FILE
            if not path.exists():
                return
        saved = read_arrays_or_npz(path)
        meta: dict[str, Any] = json.loads(saved["meta"].tobytes())
        domains = meta["domains"]
        missing = [d for d in domains if d not in self.registrations or self.registrations[d].fingerprint != meta["fingerprints"][d]]
        if missing and meta["state"] != "running":
            return  # an ended run whose domains re-registered since: nothing to resume
        if missing:
            raise ValueError(f"{path}: run {meta['run_id']} needs registrations of {missing} that {REGISTRATIONS_FILE} lacks or holds differently")
        try:
            params = RunParams.model_validate(meta["params"])
        except Exception as error:
            raise ConfigError(f"{path}: stored run parameters are invalid: {error}") from error
        layout = compute_layout({d: self.registrations[d] for d in domains})
        run = Run(meta["run_id"], params, layout, state=meta["state"], current_round=meta["current_round"])
        run.consensus_round = meta["consensus_round"]
        run.consensus = saved.get("consensus")
        run.tags = {name: int(tag) for name, tag in meta["tags"].items()}
        for index, name in enumerate(domains):
            if f"contribution_{index}" in saved:
                run.contributions[name] = (run.tags[name], saved[f"contribution_{index}"])
        run.contribution_counts = {d: int(c) for d, c in meta["contribution_counts"].items()}
        run.started_wall = meta["started_wall"]
        run.metrics = {d: {int(r): m for r, m in rounds.items()} for d, rounds in meta["metrics"].items()}
        run.events = [Event(**event) for event in meta["events"]]
        run.stop_reason = meta["stop_reason"]
        run.round_opened_at = self.clock()
        self.run = run

