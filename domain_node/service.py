"""The node's own grpc.aio server: DomainNode (status, evaluate, recommend) and the gRPC health service.

It serves the model as of the last applied consensus. Only the operator (or this domain's own
certificate) may call it under mutual TLS: recommendations derive from the domain's private
interactions. Cold-start users (registered here without interactions, held elsewhere) are
scored with their consensus vector Z.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdimf.common.config import NodeConfig
from cdimf.common.core.evaluation import evaluate, top_k
from cdimf.common.core.metrics import full_catalog_metrics
from cdimf.common.rpc import metrics
from cdimf.common.rpc.auth import Authorizer
from cdimf.common.rpc.channels import bind_port, create_server, serve_until_signalled
from cdimf.common.security.names import shown
from cdimf.domain_node.checkpoint import CheckpointError
from cdimf.domain_node.node_data import NodeData, load_node_data
from cdimf.domain_node.runner import Model, NodeRunner, Progress
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cdimf.node")
MAX_K = 10_000
# The longest user key Recommend looks up: keys are ids or e-mail addresses, and a longer one is
# refused before it is compared with anything (a comparison widens every key to its length).
MAX_USER_KEY_CHARS = 1024


class DomainNodeService(pb_grpc.DomainNodeServicer):
    """Answers from the runner's progress and published model; never touches the aggregator."""

    def __init__(self, domain: str, data: NodeData, progress: Progress, authorizer: Authorizer) -> None:
        self.domain = domain
        self.data = data
        self.progress = progress
        self.authorizer = authorizer

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Operator, aggregator or this domain's own certificate; plaintext servers skip the check."""
        await self.authorizer.require_node_reader(context, self.domain)

    async def _model(self, context: grpc.aio.ServicerContext, k: int) -> Model:
        """The published model, aborting for a bad k or before the first applied round."""
        if k > MAX_K:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be at most {MAX_K}, got {k}")
        model = self.progress.model
        if model is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"domain {self.domain} has no trained model yet")
            raise AssertionError("unreachable")
        return model

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.NodeStatus:
        """Phase, run, round, latest validation metrics and cold-start counts of this node."""
        await self._authorize(context)
        progress = self.progress
        return pb.NodeStatus(
            domain=self.domain,
            run_id=progress.run_id,
            round=progress.round,
            epochs=progress.epochs,
            users=self.data.train.shape[0],
            items=self.data.train.shape[1],
            shared_rows=progress.shared_rows,
            receiver_rows=progress.receiver_rows,
            phase=progress.phase,
            latest_metrics=progress.latest_metrics,
            connected=progress.connected,
            solver_backend=progress.solver_backend,
            error=progress.error,
            served_to=progress.served_to,
            received_from=progress.received_from,
            registration_refused=progress.registration_refused,
            dp_epsilon=progress.dp_epsilon,
            dp_delta=progress.dp_delta,
        )

    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateReply:
        """HR@k / NDCG@k of the current model on this node's valid or test split (paper protocol)."""
        await self._authorize(context)
        split = request.split or "test"
        k = request.k or 10
        try:
            held = self.data.split(split)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT if split not in ("valid", "test") else grpc.StatusCode.NOT_FOUND, str(error))
            raise
        protocol = request.protocol or "sampled"
        if protocol not in ("sampled", "full"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"protocol must be 'sampled' or 'full', got {shown(protocol)}")
        model = await self._model(context, k)
        if protocol == "full":
            full = await asyncio.to_thread(full_catalog_metrics, model.users, model.items, self.data.train, held.users, held.items, k,
                                           np.arange(self.data.train.shape[1]))
            metrics = {name: value for name, value in full.items() if name != "users"}
            negatives = 0
        else:
            metrics = await asyncio.to_thread(evaluate, held, model.users, model.items, self.data.train, k)
            negatives = held.candidates.shape[1] - 1
        # kept in the map for clients of earlier versions; the reply's own field is `round`
        metrics["round"] = float(model.round)
        return pb.EvaluateReply(split=split, k=k, metrics=metrics, users=len(held.users), protocol=protocol, negatives=negatives,
                                round=model.round)

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendReply:
        """Top-k items for one of this domain's user keys (cold-start users via their consensus vector)."""
        await self._authorize(context)
        k = request.k or 10
        if len(request.user_key) > MAX_USER_KEY_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"user_key is {len(request.user_key)} characters, at most {MAX_USER_KEY_CHARS}: {shown(request.user_key)}")
        model = await self._model(context, k)
        row = int(self.data.users.index_of(np.array([request.user_key]), missing=-1)[0])
        if row < 0:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"user {shown(request.user_key)} is unknown to domain {self.domain}")
        train = self.data.train
        seen = np.zeros(0, dtype=np.int64) if request.include_seen else train.indices[train.indptr[row]:train.indptr[row + 1]]
        items, scores = top_k(model.users[row], model.items, seen.astype(np.int64), k)
        return pb.RecommendReply(
            user_key=request.user_key,
            items=[str(key) for key in self.data.items.key_of(items)],
            scores=scores.tolist(),
            cold_start=bool(model.cold[row]),
        )


@dataclass
class RunningNode:
    """A started node: its server, port, health service and the training task."""

    server: grpc.aio.Server
    port: int
    host: str
    runner: NodeRunner
    health: health.aio.HealthServicer
    task: asyncio.Task[None]

    @property
    def address(self) -> str:
        """host:port of the node's own server."""
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float = 1.0) -> None:
        """Stop training and serving."""
        await self.health.enter_graceful_shutdown()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.runner.close()
        await self.server.stop(grace)


async def start_node(config: NodeConfig, data: NodeData | None = None, runner: NodeRunner | None = None) -> RunningNode:
    """Load this domain's data, bind config.listen, start serving and start the training loop."""
    if data is None:
        files = ", ".join(str(path) for path in (config.train_path, config.valid_path, config.test_path) if path is not None)
        log.info("domain %s: loading %s", config.domain, files)
        started = time.perf_counter()
        data = await asyncio.to_thread(
            load_node_data, config.domain, config.train_path, config.valid_path, config.test_path, config.data_format,
            valid_negatives=config.validation.negatives,
        )
        log.info("domain %s: loaded %d interactions of %d users x %d items in %.1f s", config.domain, data.train.nnz,
                 data.train.shape[0], data.train.shape[1], time.perf_counter() - started)
    if runner is None:
        runner = NodeRunner(config, data)
    server = create_server(config.tls)
    service = DomainNodeService(config.domain, data, runner.progress, Authorizer(config.tls.insecure))
    pb_grpc.add_DomainNodeServicer_to_server(service, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    port = bind_port(server, config.listen, config.tls, f"node {config.domain}")
    await server.start()
    await health_service.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_service.set("cdimf.v1.DomainNode", health_pb2.HealthCheckResponse.SERVING)

    async def train() -> None:
        """The training loop; a crash marks the server NOT_SERVING before it propagates."""
        try:
            await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if isinstance(error, CheckpointError | OSError):
                # a refusal that names its file and what to do: a traceback adds nothing
                log.error("the training loop stopped: %s", error)
            else:
                log.exception("the training loop failed")
            await health_service.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            raise

    task = asyncio.ensure_future(train())
    host = config.listen.rsplit(":", 1)[0]
    if config.metrics_listen:
        log.info("metrics on http://%s:%d/metrics", config.metrics_listen.rsplit(":", 1)[0],
                 metrics.start_metrics_server(config.metrics_listen, f"node {config.domain}"))
    log.info("node %s listening on %s:%d", config.domain, host, port)
    return RunningNode(server, port, host, runner, health_service, task)


def serve_node(config: NodeConfig, on_ready: Callable[[RunningNode], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM (on uvloop where available); `on_ready` gets the started node.

    A training loop that crashed ends the process too (status != 0 via the logged error).
    """
    serve_until_signalled(lambda: start_node(config), on_ready, ends_early=lambda running: running.task, what=f"node {config.domain}")
