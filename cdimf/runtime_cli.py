"""The runtime subcommands of `cdimf`: serve-aggregator, serve-node, train, status, stop, recommend, health.

Each takes `--config FILE` (TOML) and one flag per field of its pydantic model (cdimf.config_flags);
flags override the file and CDIMF_* variables. Exit status: 0 success, 1 the run or call failed,
2 bad configuration or arguments.
"""

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import grpc
from pydantic import Field, field_validator

from cdimf.common.config import (
    AggregatorConfig,
    NodeConfig,
    RunParams,
    TLSConfig,
    check_address,
)
from cdimf.common.core.params import StrictModel
from cdimf.common.logs import LOG_FORMATS, configure_logging
from cdimf.config_flags import add_model_flags, load_with_flags

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TLS_FLATTEN = frozenset({"tls", "run"})


class TrainConfig(StrictModel):
    """What `cdimf train`, `status` and `stop` need: the aggregator, the operator's TLS material, the run."""

    aggregator: str = Field("127.0.0.1:7070", description="host:port of the aggregator")
    tls: TLSConfig
    run: RunParams = Field(default_factory=RunParams)
    rpc_timeout_s: float = Field(30.0, gt=0, description="deadline of each control call")

    @field_validator("aggregator")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value, allow_port_zero=False)


def _logging(args: argparse.Namespace) -> None:
    """Log to stderr at --log-level in --log-format."""
    configure_logging(args.log_level, args.log_format)


def _tls_only(config_file: str | None, args: argparse.Namespace, fields: dict) -> TLSConfig:
    """The [tls] table of any of our config files (aggregator, node or run), overridden by the TLS flags."""
    return load_with_flags(TLSConfig, config_file, args, fields, table="tls")


# ----- serve-aggregator / serve-node -----


def _serve_aggregator(args: argparse.Namespace) -> int:
    """Serve the aggregator until SIGINT/SIGTERM; prints `LISTENING host:port` once bound."""
    from cdimf.aggregator.service import serve

    config = load_with_flags(AggregatorConfig, args.config, args, args.fields)
    _logging(args)
    serve(config, on_ready=lambda running: print(f"LISTENING {running.address}", flush=True))
    return EXIT_OK


def _serve_node(args: argparse.Namespace) -> int:
    """Serve one domain node until SIGINT/SIGTERM; prints `LISTENING host:port` once bound."""
    from cdimf.domain_node.service import serve_node

    config = load_with_flags(NodeConfig, args.config, args, args.fields)
    _logging(args)
    serve_node(config, on_ready=lambda running: print(f"LISTENING {running.address}", flush=True))
    return EXIT_OK


# ----- train / status / stop -----


def _progress_bar(done: int, total: int, elapsed: float, width: int = 30) -> str:
    """One progress-bar line for `done` of `total` rounds."""
    filled = int(width * done / max(total, 1))
    return f"\r[{'#' * filled}{'.' * (width - filled)}] round {done}/{total}  {elapsed:6.1f} s"


async def follow_run(client: Any, run_id: str, rounds: int, as_json: bool) -> int:
    """Print the run's events until it ends; EXIT_OK when it finished, EXIT_FAILED when stopped."""
    from cdimf.common.wire.serde import event_kind_name, event_to_json

    outcome = EXIT_FAILED
    started = time.monotonic()
    tty = sys.stderr.isatty()
    async for event in client.watch_run(run_id):
        kind = event_kind_name(event.kind)
        if as_json:
            print(json.dumps(event_to_json(event)), flush=True)
        elif kind == "metrics" and event.metrics:
            # an empty set only says the domain is done with the round (it does not validate it)
            shown = "  ".join(f"{name} {value:.4f}" for name, value in sorted(event.metrics.items()))
            print(f"round {event.round:4d}  {event.domain:<12} {shown}", flush=True)
        elif kind == "round_closed" and event.missing:
            print(f"round {event.round:4d}  closed without {', '.join(event.missing)}", flush=True)
        if kind == "round_closed":
            bar = _progress_bar(event.round, rounds, time.monotonic() - started)
            sys.stderr.write(bar if tty else bar.lstrip("\r") + "\n")
            sys.stderr.flush()
        if kind == "run_finished":
            outcome = EXIT_OK
        elif kind == "run_stopped":
            outcome = EXIT_FAILED
    if tty:
        sys.stderr.write("\n")
    print(f"run {run_id} {'finished' if outcome == EXIT_OK else 'did not finish'}", file=sys.stderr)
    return outcome


async def start_run(client: Any, params: RunParams, wait_for_domains_s: float) -> Any:
    """StartRun, retried while fewer than min_domains domains registered (nodes still starting)."""
    from cdimf.common.rpc.aggregator_client import AggregatorError

    give_up = time.monotonic() + wait_for_domains_s
    while True:
        try:
            return await client.start_run(params)
        except AggregatorError as error:
            if error.code != grpc.StatusCode.FAILED_PRECONDITION or "domains registered" not in error.details:
                raise
            if time.monotonic() >= give_up:
                raise
        await asyncio.sleep(0.2)


def _control_client(config: TrainConfig) -> Any:
    """An operator's client of the aggregator from a TrainConfig."""
    from cdimf.common.rpc.aggregator_client import AggregatorClient
    from cdimf.common.rpc.channels import credentials_for

    return AggregatorClient(config.aggregator, "", credentials_for(config.tls), rpc_timeout_s=config.rpc_timeout_s,
                            retry_for_s=config.rpc_timeout_s)


def _train(args: argparse.Namespace) -> int:
    """Start a run and (with --follow) follow it to its end."""
    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> int:
        """Start the run and optionally follow it; the exit status."""
        client = _control_client(config)
        try:
            info = await start_run(client, config.run, args.wait_for_domains_s)
            if args.json and not args.follow:
                print(json.dumps({"run_id": info.run_id, "state": info.state, "domains": list(info.admitted_domains)}))
            else:
                print(f"run {info.run_id} started over {', '.join(info.admitted_domains)}", file=sys.stderr)
            if not args.follow:
                return EXIT_OK
            return await follow_run(client, info.run_id, info.rounds, args.json)
        finally:
            await client.close()

    return _with_aggregator_errors(main)


def _with_aggregator_errors(main: Any) -> int:
    """Run a coroutine function; an AggregatorError prints and exits 1."""
    from cdimf.common.rpc.aggregator_client import AggregatorError

    try:
        return asyncio.run(main())
    except AggregatorError as error:
        print(f"cdimf: {error}", file=sys.stderr)
        return EXIT_FAILED


def _status(args: argparse.Namespace) -> int:
    """Print the aggregator's run and domains."""
    from cdimf.common.wire.serde import run_state_name, status_to_json

    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> int:
        """Fetch the status and print it as a table or JSON."""
        client = _control_client(config)
        try:
            status = await client.get_status()
        finally:
            await client.close()
        if args.json:
            print(json.dumps(status_to_json(status), indent=2))
            return EXIT_OK
        run = status.run
        state = run_state_name(run.state)
        print(f"run {run.run_id or '-'}: {state}, round {run.current_round}/{run.params.rounds}, "
              f"latest consensus {run.latest_consensus_round}, shared users {status.shared_users}")
        for domain in status.domains:
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(domain.latest_metrics.items()))
            print(f"  {domain.domain:<12} rows {domain.rows:>8}  shared {domain.shared_rows:>8}  "
                  f"admitted {str(domain.admitted).lower():<5}  last push {domain.latest_contribution_round:>4}  {metrics}")
        return EXIT_OK

    return _with_aggregator_errors(main)


def _stop(args: argparse.Namespace) -> int:
    """Stop the current (or the named) run."""
    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> int:
        """Stop the configured run, or the current one when none is named."""
        client = _control_client(config)
        try:
            run_id = config.run.run_id or (await client.get_status()).run.run_id
            if not run_id:
                print("cdimf: no run to stop", file=sys.stderr)
                return EXIT_FAILED
            info = await client.stop_run(run_id, args.reason)
        finally:
            await client.close()
        print(f"run {info.run_id} {info.state}", file=sys.stderr)
        return EXIT_OK

    return _with_aggregator_errors(main)


# ----- recommend / health -----


def _recommend(args: argparse.Namespace) -> int:
    """Top-k items of a user key from a node's DomainNode service."""
    from cdimf.common.rpc.channels import open_channel
    from cdimf.protos.v1 import federation_pb2 as pb
    from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

    check_address(args.node, allow_port_zero=False)
    tls = _tls_only(args.config, args, args.fields)

    async def main() -> int:
        """Call Recommend and print the items."""
        async with open_channel(args.node, tls) as channel:
            stub = pb_grpc.DomainNodeStub(channel)
            try:
                reply = await stub.Recommend(pb.RecommendRequest(user_key=args.user, k=args.k, include_seen=args.include_seen),
                                             timeout=args.timeout_s)
            except grpc.aio.AioRpcError as error:
                print(f"cdimf: Recommend: {error.code().name}: {error.details()}", file=sys.stderr)
                return EXIT_FAILED
        if args.json:
            print(json.dumps({"user": reply.user_key, "cold_start": reply.cold_start,
                              "items": [{"item": i, "score": s} for i, s in zip(reply.items, reply.scores)]}))
        else:
            print(f"user {reply.user_key}{' (cold start: scored with its consensus vector)' if reply.cold_start else ''}")
            for rank, (item, score) in enumerate(zip(reply.items, reply.scores), 1):
                print(f"{rank:4d}  {item:<24} {score:.4f}")
        return EXIT_OK

    return asyncio.run(main())


async def check_health(target: str, tls: TLSConfig, service: str, timeout_s: float) -> tuple[bool, str]:
    """(serving, the status or error seen) from the standard gRPC health service of a node or the aggregator."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cdimf.common.rpc.channels import open_channel

    async with open_channel(target, tls) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    return reply.status == health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _health(args: argparse.Namespace) -> int:
    """gRPC health check of a node or the aggregator; exit 0 when SERVING."""
    check_address(args.target, allow_port_zero=False)
    tls = _tls_only(args.config, args, args.fields)
    serving, seen = asyncio.run(check_health(args.target, tls, args.service, args.timeout_s))
    print(seen)
    return EXIT_OK if serving else EXIT_FAILED


# ----- parsers -----


def _address_argument(text: str) -> str:
    """argparse type: a host:port with a non-zero port."""
    try:
        return check_address(text, allow_port_zero=False)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parsers(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the runtime subcommands on the `cdimf` parser."""
    agg = commands.add_parser("serve-aggregator", help="serve the aggregator (AggregatorConfig)")
    agg.add_argument("--config", help="TOML file with the AggregatorConfig fields")
    agg.add_argument("--log-level", default="INFO")
    agg.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text lines or one JSON object per line")
    agg.set_defaults(handler=_serve_aggregator, fields=add_model_flags(agg, AggregatorConfig, TLS_FLATTEN))

    node = commands.add_parser("serve-node", help="serve one domain node (NodeConfig); the secret comes from secret_file or CDIMF_SECRET")
    node.add_argument("--config", help="TOML file with the NodeConfig fields")
    node.add_argument("--log-level", default="INFO")
    node.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text lines or one JSON object per line")
    node.set_defaults(handler=_serve_node, fields=add_model_flags(node, NodeConfig, TLS_FLATTEN))

    train = commands.add_parser("train", help="start a training run (RunParams) and follow it")
    train.add_argument("--config", help="TOML file: aggregator, [tls] (operator certificate) and [run] (RunParams)")
    train.add_argument("--follow", action="store_true", help="follow the run: progress bar on stderr, per-round HR/NDCG per domain")
    train.add_argument("--json", action="store_true", help="machine-readable output (one JSON object per event)")
    train.add_argument("--wait-for-domains-s", type=float, default=120.0,
                       help="retry starting the run this long while fewer than min_domains domains registered")
    train.set_defaults(handler=_train, fields=add_model_flags(train, TrainConfig, TLS_FLATTEN))

    for name, handler, what in (("status", _status, "show the aggregator's run and domains"), ("stop", _stop, "stop the current run")):
        sub = commands.add_parser(name, help=what)
        sub.add_argument("--config", help="TOML file: aggregator and [tls] (operator certificate)")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "stop":
            sub.add_argument("--reason", default="stopped by the operator")
        sub.set_defaults(handler=handler, fields=add_model_flags(sub, TrainConfig, TLS_FLATTEN))

    rec = commands.add_parser("recommend", help="top-k items for a user key from a domain node")
    rec.add_argument("--node", required=True, type=_address_argument, help="host:port of the node's server")
    rec.add_argument("--user", required=True, help="the domain's own user key")
    rec.add_argument("-k", type=int, default=10, help="number of items")
    rec.add_argument("--include-seen", action="store_true", help="keep items the user already interacted with")
    rec.add_argument("--json", action="store_true")
    rec.add_argument("--timeout-s", type=float, default=10.0)
    rec.add_argument("--config", help="any cdimf TOML file; only its [tls] table is used")
    rec.set_defaults(handler=_recommend, fields=add_model_flags(rec, TLSConfig))

    health = commands.add_parser("health", help="gRPC health check; exit 0 when SERVING")
    health.add_argument("--target", required=True, type=_address_argument, help="host:port of a node or the aggregator")
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout-s", type=float, default=5.0)
    health.add_argument("--config", help="any cdimf TOML file; only its [tls] table is used")
    health.set_defaults(handler=_health, fields=add_model_flags(health, TLSConfig))

