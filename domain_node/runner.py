"""The node's training loop as a client of the aggregator: register, wait for a run, train rounds, checkpoint.

Per round r (the engine's order, so that synchronous runs reproduce `CDIMFEngine` exactly):
local epochs (NodeConfig.period: the node's own aggregation period, else the run's for this domain), push X + U of the shared rows
(sent as soon as the last epoch solved the users: its item half-step runs meanwhile),
pull Z (synchronous runs wait for it; with a round deadline the node waits at most that long
and otherwise keeps training on the last Z), apply Z (dual step), checkpoint atomically,
evaluate on its own validation split and report HR@k/NDCG@k (NodeConfig.validation: every N
rounds and after the last one, against `negatives` negatives per row; off with every = 0). A
node that does not validate the last round reports an empty metrics set for it, so that
followers of the run (WatchRun) learn it is done without waiting out the grace period. A node
late for the last round (closed without it, its push refused because the run finished) pulls
and applies the final Z instead of ending early.

The round's checkpoint is written in a worker thread while the next round's epochs run; it is
awaited before the next push (and before the last round's report), so the aggregator never
sees round r + 1 from a node whose round r is not on disk.

What leaves this process: headers, HMAC pseudonyms with holder flags, X + U of shared rows and
validation metrics. Interaction data and user keys never do. With NodeConfig.privacy the rows
of X + U are clipped and noised before they leave (`_outgoing`), and every round's epsilon at
the configured delta is reported in GetStatus, the log, /metrics and the metrics report. In a
secure run X + U leaves only masked (cdimf.domain_node.secure_exchange; noise first, then the
mask) and the pulled masked sum is unmasked here; a sum that does not unmask is refused (not applied, logged, shown in status), pulled again up to
MAX_REFUSED_SUMS times, then the node stops (health NOT_SERVING).

Cold start: the node registers with its config's cold_start policy (whether, and how many of, its
users other domains may receive as receiver rows). A registration the aggregator refuses for a
holder's cap (this node's own, or another's) is reported in the phase "registration refused",
in GetStatus and the log, and tried again every REFUSED_RETRY_S: the other side may re-register.
How many of its users each other domain receives, and how many it receives, is logged and shown
in GetStatus after each registration and at each run's start.

Restarts: the checkpoint holds the state after the last applied Z; a restarted node redoes
that round's local epochs (deterministic) and pushes again (the aggregator answers
ALREADY_EXISTS when it already had the push), so the run equals the uninterrupted one. A
checkpoint of the current run trained on other data or users, or a damaged one, is never
resumed nor silently replaced: the node exits naming the file and how to start over
(cdimf.domain_node.checkpoint, which also holds the retry-or-exit rule of a failing write).
"""

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdimf.common.atomic_files import remove_stale_temporaries
from cdimf.common.config import NodeConfig
from cdimf.common.core.evaluation import evaluate
from cdimf.common.core.ials import resolve_backend
from cdimf.common.core.membership import Membership
from cdimf.common.core.model import DomainTrainer
from cdimf.common.core.privacy import noise_std, release
from cdimf.common.metric_labels import DP_DELTA_KEY, DP_EPSILON_KEY, NEGATIVES_KEY, labelled_percent, shown
from cdimf.common.privacy_accounting import check_accountant, gaussian_epsilon
from cdimf.common.rpc import metrics as prometheus
from cdimf.common.rpc.aggregator_client import (
    AggregatorClient,
    AggregatorError,
    AggregatorUnreachable,
    AlreadyAccepted,
    Backoff,
    NotAcceptedNow,
    OverLimit,
    data_mismatch,
    gave_up,
    node_client,
)
from cdimf.common.security.masks import MaskedSumMismatch
from cdimf.common.security.pseudonyms import membership_fingerprint, pseudonymize
from cdimf.common.wire.serde import RunInfo
from cdimf.domain_node.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_resumable,
    check_same_data,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint_retrying,
    training_digest,
)
from cdimf.domain_node.node_data import NodeData
from cdimf.domain_node.secure_exchange import masked_contribution, unmasked_consensus

log = logging.getLogger("cdimf.node")
# a synchronous pull is re-issued this often so that a dead stream is noticed and retried
SYNC_PULL_WAIT_S = 30.0
WAIT_FOR_RUN_S = 30.0
# a node retries the aggregator sooner than an operator's client: rounds wait on it
NODE_BACKOFF = Backoff(initial_s=0.1, max_s=2.0)
# masked sums in a row that do not unmask before the node gives up on the run (each is pulled again after a backoff)
MAX_REFUSED_SUMS = 5
# a registration refused for a cold-start cap is tried again this often (not at the backoff's
# pace: it stays refused until a domain re-registers, and each try sends every pseudonym)
REFUSED_RETRY_S = 30.0


@dataclass(frozen=True)
class Model:
    """The factors as of the last applied Z: what Evaluate and Recommend score with."""

    run_id: str
    round: int
    users: np.ndarray
    items: np.ndarray
    cold: np.ndarray


@dataclass
class Progress:
    """What the node's GetStatus reports; updated by the runner, read by the server."""

    phase: str = "starting"
    run_id: str = ""
    round: int = 0
    epochs: int = 0
    shared_rows: int = 0
    receiver_rows: int = 0
    connected: bool = False
    latest_metrics: dict[str, float] = field(default_factory=dict)
    model: Model | None = None
    solver_backend: str = ""
    error: str = ""  # why the node cannot do its job now (status shows it); empty: nothing wrong
    # cold start as the aggregator last said: how many of our users each domain receives, and we from each
    served_to: dict[str, int] = field(default_factory=dict)
    received_from: dict[str, int] = field(default_factory=dict)
    registration_refused: str = ""
    # (epsilon, delta) of what this node pushed in the run so far; delta 0: no noise, no guarantee
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0


class RunEnded(Exception):
    """The run was stopped (or ended) while this node was still in it."""


class MaskedSumRefused(RuntimeError):
    """Masked sums kept failing to unmask: this node cannot take part in the secure run (fatal)."""


class NodeRunner:
    """Drives one domain through the aggregator's runs; `progress` is shared with the node server."""

    def __init__(
        self,
        config: NodeConfig,
        data: NodeData,
        client: AggregatorClient | None = None,
        backoff: Backoff = NODE_BACKOFF,
    ) -> None:
        self.config = config
        self.data = data
        self.backoff = backoff
        self._rng = random.Random()
        self._secret = config.federation_secret()
        self.pseudonyms = pseudonymize(data.users.keys, self._secret)
        self.holder = data.holder
        self.fingerprint = membership_fingerprint(self.pseudonyms, self.holder)
        self.data_digest = training_digest(data.train)
        remove_stale_temporaries(checkpoint_path(config.state_dir))
        # the transport is injected (tests wrap it); by default, the node's own client
        self.client = client if client is not None else node_client(config, backoff=backoff)
        self.progress = Progress(solver_backend=resolve_backend(config.ials.backend))
        log.info("domain %s: solver backend %s", config.domain, self.progress.solver_backend)
        prometheus.on_solver_backend(config.domain, self.progress.solver_backend)
        self._announce_privacy()
        self._checkpoint_task: asyncio.Future[Path] | None = None
        self._items_task: asyncio.Future[None] | None = None
        self._registered = False
        # the pseudonyms of the shared rows while a secure run is taken part in (None: plain pushes)
        self._masked_rows: np.ndarray | None = None
        self._restore_model()

    # ----- differential privacy -----

    def _announce_privacy(self) -> None:
        """Log what is done to the pushed rows; with noise, fail now when the accountant is missing."""
        privacy = self.config.privacy
        if privacy.clip_norm is None:
            return
        if not privacy.noisy:
            log.warning("domain %s: rows clipped to norm %g but no noise: no differential privacy", self.config.domain, privacy.clip_norm)
            return
        check_accountant()
        self.progress.dp_delta = privacy.delta
        log.info("domain %s: differential privacy: rows clipped to norm %g, Gaussian noise multiplier %g (std %g), delta %g%s",
                 self.config.domain, privacy.clip_norm, privacy.noise_multiplier, noise_std(privacy.clip_norm, privacy.noise_multiplier),
                 privacy.delta, ", seeded noise (experiments only)" if privacy.noise_seed is not None else "")
        prometheus.on_privacy(self.config.domain, 0.0, privacy.delta)

    def _outgoing(self, round_index: int, contribution: np.ndarray) -> np.ndarray:
        """The contribution as it leaves this node for round `round_index`: clipped and noised under NodeConfig.privacy."""
        return release(contribution, self.config.privacy, self.config.domain, round_index)

    def _account(self, rounds_released: int) -> dict[str, float]:
        """Epsilon after `rounds_released` pushes, into progress, the log and /metrics; the keys for the metrics report."""
        privacy = self.config.privacy
        if not privacy.noisy:
            return {}
        epsilon = gaussian_epsilon(privacy.noise_multiplier, rounds_released, privacy.delta)
        self.progress.dp_epsilon = epsilon
        log.info("round %d: DP epsilon %.4f at delta %g", rounds_released, epsilon, privacy.delta)
        prometheus.on_privacy(self.config.domain, epsilon, privacy.delta)
        return {DP_EPSILON_KEY: epsilon, DP_DELTA_KEY: privacy.delta}

    # ----- model snapshots -----

    def _publish(self, run_id: str, round_index: int, trainer: DomainTrainer) -> None:
        """Publish the factors as of this round for the node server (cold rows scored with Z)."""
        state = trainer.state
        cold = np.zeros(self.data.train.shape[0], dtype=bool)
        cold[trainer.receiver_rows] = state.receiver_consensus is not None
        # the trainer replaces its arrays and never writes into them, so the model may share
        # them; only cold rows need a copy of the users to be scored with their consensus
        users = trainer.scoring_users() if cold.any() else state.users
        self.progress.model = Model(run_id, round_index, users, state.items, cold)

    def _restore_model(self) -> None:
        """Serve the checkpointed model right after a restart, before the aggregator is reached."""
        try:
            checkpoint = load_checkpoint(self.config.state_dir)
        except CheckpointError as error:
            log.warning("ignoring the checkpoint: %s", error)
            return
        if checkpoint is None or checkpoint.fingerprint != self.fingerprint or checkpoint.data_digest not in ("", self.data_digest):
            return
        state = checkpoint.trainer
        users = state.users.copy()
        cold = np.zeros(len(users), dtype=bool)
        if state.receiver_consensus is not None and len(checkpoint.receiver_rows):
            users[checkpoint.receiver_rows] = state.receiver_consensus
            cold[checkpoint.receiver_rows] = True
        self.progress.model = Model(checkpoint.run_id, checkpoint.round, users, state.items, cold)
        self.progress.run_id, self.progress.round, self.progress.epochs = checkpoint.run_id, checkpoint.round, state.epochs

    # ----- top level -----

    async def run(self) -> None:
        """Take part in runs until cancelled; aggregator outages are retried with backoff and jitter."""
        finished_run = ""
        failures = 0
        while True:
            try:
                finished_run = await self._session(finished_run)
                failures = 0
                if self.config.exit_after_run and self.progress.phase in ("finished", "stopped"):
                    if self.progress.phase == "finished":
                        await asyncio.to_thread(self.print_test_table)
                    log.info("run %s %s: exiting (exit_after_run)", finished_run, self.progress.phase)
                    return
            except OverLimit:
                self._registered = False
                await asyncio.sleep(REFUSED_RETRY_S)
            except AggregatorError as error:
                # the aggregator may have lost its state: register again before anything else
                self._registered = False
                self.progress.connected = not isinstance(error, AggregatorUnreachable)
                log.warning("aggregator call failed (%s); retrying", error)
                await asyncio.sleep(self.backoff.delay(failures, self._rng))
                failures += 1

    async def _session(self, finished_run: str) -> str:
        """Register, wait for a run other than finished_run, take part in it; returns its id."""
        if not self._registered:
            self.progress.phase = "registering"
            log.info("registering %d users with the aggregator at %s", len(self.pseudonyms), self.config.aggregator)
            try:
                registered = await self.client.register(self.pseudonyms, self.holder, self.config.cold_start)
            except NotAcceptedNow:
                # the running run holds other rows of ours: with a checkpoint of it, our data
                # changed under it, which no retry mends
                self._refuse_changed_data()
                raise
            except OverLimit as error:
                self.progress.connected = True
                self.progress.phase = "registration refused"
                if error.details != self.progress.registration_refused:
                    log.error("the aggregator refused our registration: %s; trying again every %.0f s", error.details, REFUSED_RETRY_S)
                self.progress.registration_refused = error.details
                raise
            self.progress.connected = True
            self.progress.registration_refused = ""
            if registered.fingerprint != self.fingerprint:
                raise data_mismatch("Register", "the aggregator's fingerprint differs from ours")
            log.info("registered %d rows (%d shared, %d receivers); waiting for a run", registered.rows, registered.shared_rows,
                     registered.receiver_rows)
            self._cold_start_counts(dict(registered.served_to), dict(registered.received_from))
            self._registered = True
        while True:
            if self.progress.phase not in ("finished", "stopped"):
                self.progress.phase = "idle"
            info = await self.client.wait_for_run(WAIT_FOR_RUN_S, after_run_id=finished_run)
            if info is None or not info.run_id or info.params is None:
                continue
            if self.config.domain not in info.admitted_domains:
                log.info("run %s started without this domain; waiting for the next one", info.run_id)
                return info.run_id
            await self._take_part(info)
            return info.run_id

    def _cold_start_counts(self, served_to: dict[str, int], received_from: dict[str, int]) -> None:
        """Keep and log the aggregator's cold-start counts when they changed."""
        if (served_to, received_from) == (self.progress.served_to, self.progress.received_from):
            return
        self.progress.served_to, self.progress.received_from = served_to, received_from
        log.info("cold start (%s): others receive %d of our users (%s); we receive %d rows (%s)", self.config.cold_start.describe(),
                 sum(served_to.values()), _per_domain(served_to), sum(received_from.values()), _per_domain(received_from))

    def print_test_table(self) -> None:
        """Print the current model's test HR@k / NDCG@k (the paper's protocol) as a labelled table on stdout."""
        model, held = self.progress.model, self.data.test
        if model is None or held is None:
            log.info("no test table: %s", "no model" if model is None else "no test split")
            return
        k = self.config.validation.k
        scores = evaluate(held, model.users, model.items, self.data.train, k)
        negatives = held.candidates.shape[1] - 1
        lines = [f"TEST {self.config.domain}: run {model.run_id} round {model.round}, {len(held.users)} users,"
                 f" each test item ranked against {negatives} sampled negatives"]
        lines += [f"TEST {self.config.domain}:   {label:<24} {value:6.2f}%" for label, value in labelled_percent(scores, "test", negatives).items()]
        print("\n".join(lines), flush=True)

    # ----- one run -----

    async def _take_part(self, info: RunInfo) -> None:
        """Train the rounds of one run (resuming from the checkpoint when it is of this run)."""
        assert info.params is not None
        params = info.params
        view = await self.client.get_membership(info.run_id)
        self._cold_start_counts(dict(view.served_to), dict(view.received_from))
        trainer = DomainTrainer(self.config.domain, self.data.train, self.config.model_params(params), params.admm.rho,
                                view.shared_rows, view.receiver_rows)
        applied = self._resume(info, trainer, view)
        if applied is None:
            return
        self.progress.run_id = info.run_id
        self.progress.shared_rows, self.progress.receiver_rows = len(view.shared_rows), len(view.receiver_rows)
        if applied >= params.rounds:
            self._publish(info.run_id, applied, trainer)
            self.progress.phase = "finished"
            return
        period = self.config.period(params)
        try:
            await self._rounds(info, trainer, view, applied, period)
            self.progress.phase = "finished"
        except RunEnded as ended:
            log.info("run %s ended: %s", info.run_id, ended)
            self.progress.phase = "stopped"
        finally:
            await self._checkpoint_written()

    def _refuse_changed_data(self) -> None:
        """CheckpointMismatch when the checkpoint in the state folder was trained on other data than ours."""
        checkpoint = load_checkpoint(self.config.state_dir)
        if checkpoint is not None:
            check_same_data(checkpoint, checkpoint_path(self.config.state_dir), self.fingerprint, self.data_digest)

    def _resume(self, info: RunInfo, trainer: DomainTrainer, view: Membership) -> int | None:
        """Rounds already applied (0 for a fresh start); None when there is nothing to do in this run.

        A damaged checkpoint, or one of this run on other data, raises CheckpointError (fatal).
        """
        checkpoint = load_checkpoint(self.config.state_dir)
        if checkpoint is not None and checkpoint.run_id == info.run_id:
            check_same_data(checkpoint, checkpoint_path(self.config.state_dir), self.fingerprint, self.data_digest)
            assert info.params is not None
            check_resumable(checkpoint, self.data.train.shape[0], self.data.train.shape[1], len(view.shared_rows), info.params.rank)
            if not (np.array_equal(checkpoint.shared_rows, view.shared_rows)
                    and np.array_equal(checkpoint.receiver_rows, view.receiver_rows)):
                raise CheckpointError(f"checkpoint of run {info.run_id} has another membership than the aggregator's")
            trainer.state = checkpoint.trainer
            log.info("resuming run %s after round %d", info.run_id, checkpoint.round)
            return checkpoint.round
        if info.state != "running":
            return None  # an ended run this node has no state of
        return 0

    async def _rounds(self, info: RunInfo, trainer: DomainTrainer, view: Membership, applied: int, period: int) -> None:
        """The round loop; returns once the last round's Z is applied."""
        try:
            await self._round_loop(info, trainer, view, applied, period)
        finally:
            # leaving the run (ended, failed, cancelled): no solver thread may outlive it unseen
            if self._items_task is not None:
                await asyncio.wait([self._items_task])
                self._items_task = None

    async def _round_loop(self, info: RunInfo, trainer: DomainTrainer, view: Membership, applied: int, period: int) -> None:
        """Rounds from `applied` + 1 until the last round's Z is applied (see _rounds)."""
        assert info.params is not None
        params = info.params
        run_id = info.run_id
        deadline_s = params.round_deadline_s
        open_round = applied + 1
        pushed_round = 0
        need_epochs = True
        refused = 0
        # a secure run masks each push over the pseudonyms of the shared rows
        self._masked_rows = self.pseudonyms[view.shared_rows] if params.secure_aggregation else None
        while applied < params.rounds:
            if need_epochs:
                await self._epoch_finished(trainer)
                self.progress.phase = "training"
                await asyncio.to_thread(trainer.epochs_to_contribution, period)
                # X + U is final once the users are solved: the last item half-step runs
                # while it is pushed and Z is awaited (the same values as local_epochs)
                self._items_task = asyncio.ensure_future(asyncio.to_thread(trainer.items_half_step))
                need_epochs = False
            if pushed_round < open_round:
                # never let the aggregator see round r+1 before round r is on disk: a node
                # killed now resumes from the last checkpoint, as if it had never pushed
                await self._checkpoint_written()
                open_round = await self._push(run_id, open_round, self._outgoing(open_round, trainer.contribution()))
                pushed_round = open_round
            # a refusal stays shown until a sum unmasks
            self.progress.phase = "refusing-masked-sum" if refused else "waiting"
            wait_s = deadline_s if deadline_s > 0 else SYNC_PULL_WAIT_S
            try:
                z = await self.client.pull_consensus(run_id, applied + 1, wait_s, len(view.shared_rows), len(view.receiver_rows),
                                                     dtype="ring64" if params.secure_aggregation else "float32")
            except NotAcceptedNow:
                current = await self._current(run_id)
                # the aggregator restarted from an older state and lost our push: send it again
                pushed_round, open_round = 0, current.current_round
                continue
            if z is None:
                # asynchronous tolerance: no Z before the deadline, keep training on the last one
                need_epochs = deadline_s > 0
                continue
            if params.secure_aggregation:
                try:
                    z = await asyncio.to_thread(unmasked_consensus, z, view, self.pseudonyms, self._secret, run_id, params)
                except MaskedSumMismatch as error:
                    refused += 1
                    await self._refuse_sum(z.round, error, refused)
                    continue
                refused = 0
                self.progress.error = ""
            await self._epoch_finished(trainer)
            trainer.receive_consensus(z.shared, z.receivers)
            applied = z.round
            prometheus.on_pull(self.config.domain, z.shared.nbytes + z.receivers.nbytes)
            prometheus.on_round_applied(self.config.domain)
            open_round = max(open_round, applied + 1)
            if pushed_round >= open_round:
                pushed_round = open_round - 1
            need_epochs = True
            await self._end_of_round(run_id, applied, params.rounds, trainer, view)

    async def _refuse_sum(self, round_index: int, error: MaskedSumMismatch, refused: int) -> None:
        """Say that a masked sum was refused (log, status); pull again after a backoff, or stop after MAX_REFUSED_SUMS."""
        self.progress.phase = "refusing-masked-sum"
        self.progress.error = f"refused the masked sum of round {round_index} ({refused} of {MAX_REFUSED_SUMS}): {error}"
        log.error("domain %s: %s", self.config.domain, self.progress.error)
        if refused >= MAX_REFUSED_SUMS:
            raise MaskedSumRefused(f"{MAX_REFUSED_SUMS} masked sums in a row did not unmask (last: round {round_index}: {error});"
                                   " the aggregator's sums or contributor lists are wrong, or the nodes do not share one federation secret")
        await asyncio.sleep(self.backoff.delay(refused, self._rng))

    async def _epoch_finished(self, trainer: DomainTrainer) -> None:
        """Wait for the item half-step that ran during the exchange, if any (its errors surface here)."""
        task, self._items_task = self._items_task, None
        if task is not None:
            await task
            self.progress.epochs = trainer.state.epochs

    async def _wire_contribution(self, values: np.ndarray, run_id: str, round_index: int) -> tuple[np.ndarray, str]:
        """What goes on the wire for X + U pushed as `round_index`, and its dtype: masked ring rows in a secure run, else X + U itself."""
        if self._masked_rows is None:
            return values, "float32"
        # AES over every shared row: off the event loop, like the solver
        masked = await asyncio.to_thread(masked_contribution, values, self._masked_rows, self._secret, run_id, self.config.domain, round_index)
        return masked, "ring64"

    async def _push(self, run_id: str, round_index: int, values: np.ndarray) -> int:
        """Push a contribution for the open round; returns the round it was pushed as."""
        for _ in range(3):
            try:
                # masked per round tag: a push moved to the open round is masked for that round
                wire, dtype = await self._wire_contribution(values, run_id, round_index)
                await self.client.push_contribution(run_id, round_index, wire, dtype)
                prometheus.on_push(self.config.domain, wire.nbytes)
                return round_index
            except AlreadyAccepted:
                return round_index  # pushed before a restart (ours or the aggregator's)
            except NotAcceptedNow:
                current = await self._current(run_id, finished_ok=True)
                if current.state == "finished":
                    # Late for the last round: it closed without us and the run finished. Pull
                    # the final Z instead (the caller's pull gets it, or ends the run when this
                    # node already applied it), so that the node ends on the run's consensus
                    # and reports the last round like the others.
                    return round_index
                # stale or not yet open (we were paused or restarted): push as the open round
                round_index = current.current_round
        raise gave_up("PushContribution", f"round {round_index} kept moving")

    async def _current(self, run_id: str, finished_ok: bool = False) -> RunInfo:
        """The run as the aggregator sees it now; RunEnded when it is no longer running (or finished, unless finished_ok)."""
        info = await self.client.wait_for_run(0.0)
        if info is None or info.run_id != run_id:
            raise RunEnded(f"the aggregator's current run is {info.run_id if info else 'none'}")
        if info.state != "running" and not (finished_ok and info.state == "finished"):
            raise RunEnded(f"run {run_id} is {info.state}")
        return info

    async def _end_of_round(self, run_id: str, round_index: int, rounds: int, trainer: DomainTrainer, view: Membership) -> None:
        """Checkpoint, publish the model, then validate and report the metrics when this round is due."""
        # A snapshot: the trainer replaces (never mutates) its arrays, so a shallow copy of its
        # state stays this round's while the next round's epochs run. Writing it in the
        # background overlaps the disk with those epochs (it was most of a round's overhead).
        await self._checkpoint_written()
        snapshot = dataclasses.replace(trainer.state)
        checkpoint = Checkpoint(run_id, round_index, self.fingerprint, view.shared_rows, view.receiver_rows, snapshot, self.data_digest)
        self._checkpoint_task = asyncio.ensure_future(
            asyncio.to_thread(save_checkpoint_retrying, self.config.state_dir, checkpoint, self.config.checkpoint_retry_s)
        )
        if round_index >= rounds:
            await self._checkpoint_written()
        self._publish(run_id, round_index, trainer)
        self.progress.round = round_index
        # each round released every shared row once (a re-push after a restart resends that round)
        privacy_report = self._account(round_index)
        validation = self.config.validation
        metrics: dict[str, float] = {}
        if self.data.valid is not None and validation.due(round_index, rounds):
            model = self.progress.model
            assert model is not None
            started = time.perf_counter()
            metrics = await asyncio.to_thread(evaluate, self.data.valid, model.users, model.items, self.data.train, validation.k)
            # the protocol travels with the numbers, so that whoever shows them can say so
            metrics[NEGATIVES_KEY] = float(self.data.valid.candidates.shape[1] - 1)
            log.info("round %d: %s (%.2f s)", round_index, shown(metrics, "valid"), time.perf_counter() - started)
            self.progress.latest_metrics = metrics
            prometheus.on_validation(self.config.domain, metrics)
        elif round_index < rounds:
            return
        try:
            await self.client.report_metrics(run_id, round_index, {**metrics, **privacy_report})
        except (AlreadyAccepted, NotAcceptedNow) as error:
            # metrics are informative: a duplicate after a restart or an ended run must not stop training
            log.info("metrics of round %d not recorded: %s", round_index, error)

    async def _checkpoint_written(self) -> None:
        """Wait for the checkpoint being written in the background, if any (its errors surface here)."""
        task, self._checkpoint_task = self._checkpoint_task, None
        if task is not None:
            await task

    async def close(self) -> None:
        """Close the aggregator channel."""
        await self.client.close()


def _per_domain(counts: dict[str, int]) -> str:
    """{domain: count} as "cloth 40, music 0" (or "none")."""
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "none"
