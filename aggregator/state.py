"""The aggregator's bookkeeping behind the servicer: registrations, the current run, and its store. No gRPC in here.

- A domain registers all its rows (pseudonym + holder flag). Membership (which rows are shared,
  which are receivers, who holds what) comes from cdimf.common.core.membership.align_memberships
  over the pseudonyms, exactly as the in-process engine aligns raw keys.
- StartRun admits the registered domains and freezes their membership; rounds count from 1 and
  follow the rules of cdimf.aggregator.rounds. Each contribution is saved to the RunStore before
  it is accepted (and acked); the run is committed when it starts, stops and whenever a round
  closes (before its Z is served). A restart resumes with every acked contribution and closes
  the open round at once when they complete it.
- Every refusal raises StateError with a status name and changes nothing.
- Cold start is under the holders' control (cdimf.aggregator.cold_start): a registration after
  which any holder would serve more receiver rows than its registered policy allows is refused
  RESOURCE_EXHAUSTED, whichever side registers last.
- A save that fails (a full or read-only disk) is never silent: a contribution that cannot be
  saved is refused UNAVAILABLE; a closed round stays closed in memory but its Z is not served;
  either way pushes are refused UNAVAILABLE, `persist_error` says why
  (health NOT_SERVING, GetStatus, a persist_failed event for followers) and `poll` retries the
  save every SAVE_RETRY_S until it succeeds; then Z is served and the run goes on, nothing lost.
"""

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cdimf.aggregator.cold_start import ColdStartCounts, cold_start_counts, over_cap_detail, require_within_caps, served_cap, served_lines
from cdimf.aggregator.rounds import Event, Pulled, PushOutcome, Run, SavedRun, StateError, elapsed_since
from cdimf.aggregator.store import DirectoryRunStore, MemoryRunStore, Registration, RunStore
from cdimf.common.atomic_files import StateFileError
from cdimf.common.config import ColdStartPolicy, RunParams
from cdimf.common.core.membership import MAX_DOMAINS, AlignedMembership, align_memberships, sorted_unique
from cdimf.common.heap import release_freed_memory
from cdimf.common.security.names import is_party_name, shown
from cdimf.common.security.pseudonyms import PSEUDONYM_BYTES, as_keys, membership_fingerprint

log = logging.getLogger("cdimf.aggregator")
# how often a failed save of the run is tried again
SAVE_RETRY_S = 1.0
_MOVE_AWAY = "restore the state folder from a backup, or move it away to start over (its run is then lost)"


def sortable_keys(pseudonym_sets: list[np.ndarray]) -> list[np.ndarray]:
    """Keys that order and compare like the pseudonyms: their first 8 bytes as uint64 when those
    tell every distinct pseudonym apart (all but certainly: HMAC outputs), else the full 32 bytes.

    Sorting and searching uint64 is much faster than 32-byte strings at a million users.
    """
    everything = np.concatenate(pseudonym_sets) if pseudonym_sets else np.zeros((0, PSEUDONYM_BYTES), np.uint8)
    prefixes = np.ascontiguousarray(everything[:, :8]).view("<u8").reshape(-1)
    _, first, group = np.unique(prefixes, return_index=True, return_inverse=True)
    if np.array_equal(everything, everything[first[group]]):
        bounds = np.cumsum([0] + [len(part) for part in pseudonym_sets])
        return [prefixes[bounds[i] : bounds[i + 1]] for i in range(len(pseudonym_sets))]
    # two pseudonyms share their first 8 bytes: compare whole digests
    return [as_keys(part) for part in pseudonym_sets]


def memberships_of(registrations: dict[str, Registration]) -> dict[str, AlignedMembership]:
    """Align the domains' pseudonyms; domains are ordered by name (the summation order of Z)."""
    domains = sorted(registrations)
    if len(domains) > MAX_DOMAINS:
        raise StateError("RESOURCE_EXHAUSTED", f"at most {MAX_DOMAINS} domains, got {len(domains)}")
    keys = sortable_keys([registrations[d].pseudonyms for d in domains])
    memberships, _ = align_memberships(keys, [registrations[d].holder for d in domains], domains)
    return dict(zip(domains, memberships, strict=True))


@dataclass(frozen=True)
class DomainStatus:
    """One registered domain as GetStatus reports it (round fields are 0 unless admitted)."""

    domain: str
    rows: int
    admitted: bool
    shared_rows: int = 0
    receiver_rows: int = 0
    latest_contribution_round: int = 0
    contributions: int = 0
    latest_metrics: dict[str, float] = field(default_factory=dict)
    served_to: dict[str, int] = field(default_factory=dict)
    received_from: dict[str, int] = field(default_factory=dict)
    cold_start: ColdStartPolicy = field(default_factory=ColdStartPolicy)
    max_served_rows: int | None = None


@dataclass(frozen=True)
class Status:
    """The aggregator at one moment: the current run, its exchanged rows and every registered domain."""

    run: Run | None
    shared_users: int
    domains: tuple[DomainStatus, ...]
    persistence_error: str = ""


@dataclass(frozen=True)
class RunWatch:
    """What a watcher of a run sees at one moment: the events after those it has, and whether the run ended.

    current: the run is still the aggregator's run. complete: it ended and nothing more will come
    (stopped, or every admitted domain reported the final round's metrics).
    """

    events: tuple[Event, ...]
    current: bool
    ended: bool
    complete: bool


class AggregatorState:
    """Registrations and the current run over a RunStore; every method validates first and mutates last.

    Not thread-safe: the server serialises calls (one asyncio lock). `clock` is monotonic
    seconds (injectable for deadline tests). The store: `store` if given, else a
    DirectoryRunStore on `state_dir` (with `fsync`), else a MemoryRunStore.
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        clock: Callable[[], float] = time.monotonic,
        fsync: bool = True,
        store: RunStore | None = None,
    ) -> None:
        if store is None:
            store = DirectoryRunStore(state_dir, fsync) if state_dir is not None else MemoryRunStore()
        self.store = store
        self.clock = clock
        self.registrations: dict[str, Registration] = {}
        self.run: Run | None = None
        # why the latest save failed (None: everything in memory is on disk) and when to retry
        self.persist_error: str | None = None
        self._retry_at = 0.0
        # aligning a million pseudonyms takes seconds; registrations change rarely
        self._memberships_cache: tuple[tuple[tuple[str, str], ...], dict[str, AlignedMembership], ColdStartCounts] | None = None
        self._restore()

    # ----- registration and membership -----

    def register(self, domain: str, pseudonyms: np.ndarray, holder: np.ndarray, cold_start: ColdStartPolicy | None = None) -> Registration:
        """Record a domain's rows and cold-start policy; idempotent for the same ones, refused while a run uses other ones
        or when a holder would serve more receiver rows than its policy allows."""
        if not domain:
            raise StateError("INVALID_ARGUMENT", "header.domain is empty")
        # the party-name rule of configs and certificates, so plaintext servers apply it too
        # (a NUL or a 70-character name would not come back from the state folder as given)
        if not is_party_name(domain):
            raise StateError("INVALID_ARGUMENT", f"domain name {shown(domain)} is invalid: use 1-63 of a-z 0-9 _ - starting with a letter or digit")
        if pseudonyms.ndim != 2 or pseudonyms.shape[1] != PSEUDONYM_BYTES or holder.shape != (len(pseudonyms),):
            raise StateError("INVALID_ARGUMENT", f"registration of {domain}: pseudonyms {pseudonyms.shape} / flags {holder.shape} malformed")
        keys = sortable_keys([pseudonyms])[0]
        if len(sorted_unique(keys)) != len(keys):
            raise StateError("INVALID_ARGUMENT", f"registration of {domain}: a pseudonym appears twice")
        policy = cold_start if cold_start is not None else ColdStartPolicy()
        registration = Registration(domain, pseudonyms.copy(), holder.astype(bool), membership_fingerprint(pseudonyms, holder), policy)
        previous = self.registrations.get(domain)
        if previous is not None and previous.fingerprint == registration.fingerprint and previous.cold_start == policy:
            return previous
        if self.run is not None and self.run.state == "running" and domain in self.run.memberships:
            changed = "rows" if previous is None or previous.fingerprint != registration.fingerprint else "cold-start policy"
            raise StateError(
                "FAILED_PRECONDITION", f"domain {domain} is in running run {self.run.run_id} with other {changed}; stop the run before re-registering"
            )
        if previous is None and len(self.registrations) >= MAX_DOMAINS:
            raise StateError("RESOURCE_EXHAUSTED", f"at most {MAX_DOMAINS} domains can register")
        updated = {**self.registrations, domain: registration}
        memberships = memberships_of(updated)
        counts = cold_start_counts(memberships)
        try:
            require_within_caps(updated, counts, domain)
        except StateError as refusal:
            log.warning("refused the registration of %s: %s [%s]", domain, refusal.message, over_cap_detail(updated, counts))
            raise
        try:
            self.store.save_registrations(updated)
        except OSError as error:
            raise StateError("UNAVAILABLE", f"the aggregator cannot save the registration: {error}") from error
        self.registrations = updated
        self._memberships_cache = (self._registrations_key(), memberships, counts)
        for line in served_lines(updated, counts):
            log.info("cold start: %s", line)
        # checking and copying a million pseudonyms freed ~100 MiB of temporaries into the heap
        release_freed_memory()
        return registration

    def membership_for(self, domain: str) -> tuple[AlignedMembership, bool]:
        """The membership a domain sees and whether it is frozen: the run's when admitted, else over all registered."""
        if domain not in self.registrations:
            raise StateError("NOT_FOUND", f"domain {shown(domain)} is not registered")
        run = self.run
        if run is not None and run.state == "running" and domain in run.memberships:
            return run.memberships[domain], True
        return self.current_memberships()[domain], False

    def _registrations_key(self) -> tuple[tuple[str, str], ...]:
        """What the cached alignment depends on: every domain's name and fingerprint."""
        return tuple((name, self.registrations[name].fingerprint) for name in sorted(self.registrations))

    def _aligned(self) -> tuple[dict[str, AlignedMembership], ColdStartCounts]:
        """Every registered domain's membership and the cold-start counts (cached until a registration changes)."""
        key = self._registrations_key()
        if self._memberships_cache is None or self._memberships_cache[0] != key:
            memberships = memberships_of(self.registrations)
            self._memberships_cache = (key, memberships, cold_start_counts(memberships))
        return self._memberships_cache[1], self._memberships_cache[2]

    def current_memberships(self) -> dict[str, AlignedMembership]:
        """Every registered domain's membership (cached until a registration changes)."""
        return self._aligned()[0]

    def cold_start_counts(self) -> ColdStartCounts:
        """Receiver rows per domain pair over every registration: what the caps are checked against and the next run serves."""
        return self._aligned()[1]

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
        memberships = self.current_memberships()
        self._require_saved()
        run_id = params.run_id or f"run-{uuid.uuid4().hex[:12]}"
        run = Run.start(run_id, params.model_copy(update={"run_id": run_id}), memberships, self.clock())
        try:
            if self.run is not None:
                # the ended run stays listable (`cdimf runs`, `cdimf log`) after this one replaces it
                self.store.archive_run(self.run.saved({d: self.registrations[d].fingerprint for d in self.run.admitted}))
            self.store.save_run(run.saved({d: self.registrations[d].fingerprint for d in run.admitted}))
        except OSError as error:
            raise StateError("UNAVAILABLE", f"the aggregator cannot save the new run: {error}") from error
        self.run = run
        # aligning the memberships freed more temporaries than the memberships it keeps
        release_freed_memory()
        return run

    def start_when_ready(self, params: RunParams) -> bool:
        """Start a run once min_domains domains registered, unless one is running; True when nothing is left to do."""
        if self.run is not None and self.run.state == "running":
            return True
        if len(self.registrations) < params.min_domains:
            return False
        self.start_run(params)
        return True

    def stop_run(self, run_id: str, reason: str = "") -> Run:
        """Stop the running run (its last Z stays pullable)."""
        run = self._run(run_id)
        run.stop(reason)
        self._save_run()
        return run

    def _run(self, run_id: str) -> Run:
        """The current run if `run_id` names it, else StateError NOT_FOUND."""
        if self.run is None or (run_id and run_id != self.run.run_id) or not run_id:
            raise StateError("NOT_FOUND", f"unknown run {shown(run_id)}" + (f" (current run is {self.run.run_id})" if self.run else " (no run started)"))
        return self.run

    def current_run(self, after_run_id: str = "") -> Run | None:
        """The current run unless it is `after_run_id` (or there is none)."""
        run = self.run
        return run if run is not None and run.run_id != after_run_id else None

    # ----- rounds -----

    def _require_saved(self) -> None:
        """StateError UNAVAILABLE while the latest save failed: nothing may build on an unsaved round."""
        if self.persist_error is not None:
            raise StateError("UNAVAILABLE", f"the aggregator cannot save its state ({self.persist_error}); it retries every {SAVE_RETRY_S:.0f} s")

    def check_contribution(self, run_id: str, domain: str, tag: int, ring: bool | None = None) -> tuple[int, int]:
        """Validate a push before its payload is read (`ring`: whether it is DTYPE_RING64, when known); returns the expected (rows, columns)."""
        run = self._run(run_id)
        self._require_saved()
        expected = run.check_contribution(domain, tag)
        if ring is not None:
            run.check_encoding(ring)
        return expected

    def pull_encoding(self, run_id: str, ring: bool | None) -> bool:
        """Whether a pull of this run is served as ring elements (a secure run); `ring`: whether it asked for them (None: left to the run).

        INVALID_ARGUMENT for ring elements of a plaintext run, or floats of a secure one.
        """
        run = self._run(run_id)
        if ring is not None and ring != run.secure:
            raise StateError("INVALID_ARGUMENT", f"run {run_id} is {'' if run.secure else 'not '}secure: pull with dtype "
                             f"{'DTYPE_RING64 (the masked sum)' if run.secure else 'float32 or float16'}")
        return run.secure

    def accept_contribution(self, run_id: str, domain: str, tag: int, values: np.ndarray) -> PushOutcome:
        """Take a decoded contribution; closes the round (and saves the run) when that completes it."""
        accepted_round = self.take_contribution(run_id, domain, tag, values)
        return PushOutcome(accepted_round, self.poll())

    def take_contribution(self, run_id: str, domain: str, tag: int, values: np.ndarray) -> int:
        """Take a decoded contribution without closing the round it may complete (`poll` closes it); returns the round it counts in."""
        run = self._run(run_id)
        self._require_saved()
        run.check_values(domain, tag, values)
        # on disk before it is taken (and so before the ack): a restart resumes with it
        try:
            self.store.save_contribution(run.run_id, domain, tag, values)
        except OSError as error:
            # refused, so nothing unsaved is held; reported like a failed commit (health, status, a
            # persist_failed event) and pushes wait until a retried commit shows the disk takes writes
            log.error("cannot save the contribution of %s to round %d of run %s: %s; the push is refused and pushes wait"
                      " until a save succeeds (retried every %.0f s)", domain, tag, run.run_id, error, SAVE_RETRY_S)
            self._retry_at = self.clock() + SAVE_RETRY_S
            self.persist_error = str(error)
            run.events.append(Event("persist_failed", run.consensus_round, elapsed_since(run.started_wall), message=str(error)))
            raise StateError("UNAVAILABLE", f"the aggregator cannot save the contribution: {error}") from error
        return run.accept_contribution(domain, tag, values)

    def round_due(self) -> bool:
        """Whether `poll` would close the open round now (never while a save is failing)."""
        return self.persist_error is None and self.run is not None and self.run.due(self.clock())

    def deadline_at(self) -> float | None:
        """Clock time when the open round's deadline passes (None: synchronous or not running)."""
        return None if self.run is None else self.run.deadline_at()

    def seconds_to_deadline(self) -> float | None:
        """Seconds until the open round's deadline or the next save retry (0 once passed; None: neither)."""
        deadline = self.deadline_at()
        if self.persist_error is not None:
            deadline = self._retry_at if deadline is None else min(deadline, self._retry_at)
        return None if deadline is None else max(0.0, deadline - self.clock())

    def poll(self) -> int | None:
        """Close the open round when its rule says so (saving the run); returns the closed round or None.

        While a save is failing it only retries the save (when SAVE_RETRY_S passed).
        """
        run = self.run
        if self.persist_error is not None:
            if run is not None and self.clock() >= self._retry_at:
                self._save_run()
            return None
        if run is None or not run.due(self.clock()):
            return None
        closed = run.close_round(self.clock())
        self._save_run()
        # the consensus blocks' temporaries and, in synchronous runs, the contributions just let go
        release_freed_memory()
        return closed

    def pull(self, run_id: str, domain: str, min_round: int) -> Pulled | None:
        """A pull's answer: the newest Z of round >= min_round (ready), None (wait), or StateError (refused).

        A Z whose round is not saved yet is never served: the pull waits for the save.
        """
        run = self._run(run_id)
        if self.persist_error is not None:
            run.membership(domain)
            return None
        return run.pull(domain, min_round)

    def report_metrics(self, run_id: str, domain: str, round_index: int, metrics: dict[str, float]) -> None:
        """Record a domain's validation metrics for a round (once per domain and round).

        Saved with the next round; once the run ended there is no next round, so those are saved now.
        """
        run = self._run(run_id)
        run.report_metrics(domain, round_index, metrics)
        if run.state != "running" and self.persist_error is None:
            self._save_run()

    # ----- what the control API shows -----

    def status(self) -> Status:
        """The current run and every registered domain, as plain numbers (cold-start counts over every registration)."""
        run = self.run
        domains = []
        counts = self.cold_start_counts()
        for name, registration in sorted(self.registrations.items()):
            base = DomainStatus(name, len(registration.holder), admitted=False, served_to=counts.served_to(name),
                                received_from=counts.received_from(name), cold_start=registration.cold_start,
                                max_served_rows=served_cap(registration))
            mine = run.memberships.get(name) if run is not None else None
            if run is None or mine is None:
                domains.append(base)
                continue
            reported = run.metrics.get(name, {})
            domains.append(
                replace(
                    base,
                    admitted=True,
                    shared_rows=len(mine.shared_rows),
                    receiver_rows=len(mine.receiver_rows),
                    latest_contribution_round=run.tags.get(name, 0),
                    contributions=run.contribution_counts.get(name, 0),
                    latest_metrics=dict(reported[max(reported)]) if reported else {},
                )
            )
        return Status(run, run.exchanged_rows if run is not None else 0, tuple(domains), self.persist_error or "")

    def runs(self, run_id: str = "") -> list[SavedRun]:
        """Every run kept, oldest first (the current one with its live events), or only `run_id`; NOT_FOUND if unknown."""
        kept = {run.run_id: run for run in self.store.archived_runs()}
        if self.run is not None:
            kept[self.run.run_id] = self.run.saved({d: self.registrations[d].fingerprint for d in self.run.admitted})
        if run_id:
            if run_id not in kept:
                raise StateError("NOT_FOUND", f"unknown run {shown(run_id)}; kept runs: {', '.join(kept) or 'none'}")
            return [kept[run_id]]
        return sorted(kept.values(), key=lambda run: run.started_wall)

    def watched_run(self, run_id: str) -> Run:
        """The run a watch follows: the current one, if `run_id` is empty or names it; else NOT_FOUND."""
        run = self.run
        if run is None or (run_id and run.run_id != run_id):
            raise StateError("NOT_FOUND", f"unknown run {shown(run_id)}")
        return run

    def watch(self, run: Run, sent: int) -> RunWatch:
        """A watched run's events after the first `sent`, and whether it is still current and complete."""
        ended = run.state != "running"
        complete = ended and (run.state == "stopped" or run.final_metrics_in())
        return RunWatch(tuple(run.events[sent:]), self.run is run, ended, complete)

    # ----- persistence -----

    def _save_run(self) -> None:
        """Hand the run to the store (at its stop, each round boundary and the final metrics).

        A failure is recorded (persist_error, a persist_failed event) instead of raised: the
        caller's change is kept in memory, served only once a retry saved it.
        """
        run = self.run
        assert run is not None
        retrying = self.persist_error is not None
        if retrying:
            # saved with the round it recovers, so that the history on disk tells of the outage
            run.events.append(Event("persist_recovered", run.consensus_round, elapsed_since(run.started_wall)))
        try:
            self.store.save_run(run.saved({d: self.registrations[d].fingerprint for d in run.admitted}))
        except OSError as error:
            self._retry_at = self.clock() + SAVE_RETRY_S
            if retrying:
                run.events.pop()
            else:
                log.error("cannot save run %s at round %d: %s; its Z is held back and the save retried every %.0f s",
                          run.run_id, run.consensus_round, error, SAVE_RETRY_S)
                run.events.append(Event("persist_failed", run.consensus_round, elapsed_since(run.started_wall), message=str(error)))
            self.persist_error = str(error)
            return
        if retrying:
            log.warning("run %s saved again at round %d; serving its Z", run.run_id, run.consensus_round)
            self.persist_error = None

    def _restore(self) -> None:
        """Load the registrations and the run from the store (after a restart)."""
        self.registrations = self.store.load_registrations()
        saved = self.store.load_run()
        if saved is None:
            return
        lost = [d for d in saved.domains if d not in self.registrations]
        if lost:
            # a run never outlives its registrations: the registrations file was lost or replaced
            raise StateFileError(
                f"the stored run {saved.run_id} needs the registrations of {lost}, which the state folder lacks;"
                " restore the registrations file from a backup, or move the folder away to start over (its run is then lost)"
            )
        missing = [d for d in saved.domains if d not in self.registrations or self.registrations[d].fingerprint != saved.fingerprints[d]]
        if missing and saved.state != "running":
            return  # an ended run whose domains re-registered since: nothing to resume
        if missing:
            raise ValueError(f"run {saved.run_id} needs registrations of {missing} that the store lacks or holds differently")
        memberships = memberships_of({d: self.registrations[d] for d in saved.domains})
        try:
            self.run = Run.resumed(saved, memberships, self.clock())
        except StateError as error:
            raise StateFileError(f"the contributions saved for run {saved.run_id} do not fit it ({error.message}); {_MOVE_AWAY}") from error
        if saved.arrived:
            log.info("run %s resumed at round %d with the contributions acked before the restart: %s", saved.run_id, self.run.current_round,
                     ", ".join(f"{d} (round {tag})" for d, (tag, _) in sorted(saved.arrived.items())))
        release_freed_memory()
        # every contribution of the open round was acked before the restart: finish its close now
        self.poll()
