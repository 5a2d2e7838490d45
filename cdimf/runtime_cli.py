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
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, field_validator

from cdimf.arg_types import positive_int, positive_seconds
from cdimf.common.config import (
    AggregatorConfig,
    ColdStartPolicy,
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


class ControlConfig(StrictModel):
    """What every control command needs: the aggregator and the operator's TLS material."""

    aggregator: str = Field("127.0.0.1:7070", description="host:port of the aggregator")
    tls: TLSConfig
    rpc_timeout_s: float = Field(30.0, gt=0, description="deadline of each control call in seconds")

    @field_validator("aggregator")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value, allow_port_zero=False)


class TrainConfig(ControlConfig):
    """What `cdimf train` needs (and the file `status`, `stop`, `runs` and `log` read): the control settings and the run."""

    run: RunParams = Field(default_factory=RunParams)


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


# how long `train --follow` keeps retrying an unreachable aggregator (restarts, pauses) by default
FOLLOW_OUTAGE_S = 86_400.0


async def follow_run(client: Any, run_id: str, rounds: int, as_json: bool, outage_s: float = FOLLOW_OUTAGE_S) -> int:
    """Print the run's events until it ends; EXIT_OK when it finished, EXIT_FAILED when stopped.

    An aggregator unreachable for up to `outage_s` at a time (a restart, a pause) is waited for.
    Text: a progress bar of rounds on a terminal (one line per round elsewhere), each domain's
    validation metrics labelled with split and protocol, in %. JSON: one event per line, the
    run's end (run_finished or run_stopped) always last, after the final round's metrics.
    """
    from cdimf.progress import Progress

    ending: list[dict[str, Any]] = []
    with Progress(f"run {run_id}", rounds, "rounds", enabled=not as_json) as progress:
        waiting = None if as_json else asyncio.create_task(announce_waiting(client, run_id, progress.write))
        try:
            outcome = await _print_events(client, run_id, as_json, outage_s, progress, ending)
        finally:
            if waiting is not None:
                waiting.cancel()
    for line in ending[-1:]:
        print(json.dumps(line), flush=True)
    if not as_json:
        print(f"run {run_id} {'finished' if outcome == EXIT_OK else 'did not finish'}", file=sys.stderr)
    return outcome


# a round open this long (two polls of the aggregator's status) gets a "waiting for DOMAIN" line
WAITING_POLL_S = 2.0


async def announce_waiting(client: Any, run_id: str, write: Any, poll_s: float = WAITING_POLL_S) -> None:
    """Every `poll_s`, from the aggregator's status: a line naming the domains the open round still waits for, once per round and set."""
    from cdimf.common.rpc.aggregator_client import AggregatorError
    from cdimf.protos.v1 import federation_pb2 as pb

    seen_open = 0
    said: tuple[int, list[str]] | None = None
    while True:
        await asyncio.sleep(poll_s)
        try:
            status = await client.get_status()
        except AggregatorError:
            continue  # the client says what it retries; the events stream reports the outage too
        run = status.run
        if run.run_id != run_id or run.state != pb.RUN_STATE_RUNNING:
            continue
        open_round = int(run.current_round)
        late = sorted(d.domain for d in status.domains if d.admitted and d.latest_contribution_round < open_round)
        if late and open_round == seen_open and (open_round, late) != said:
            write(f"round {open_round:4d}  waiting for {', '.join(late)}")
            said = (open_round, late)
        seen_open = open_round


async def _print_events(client: Any, run_id: str, as_json: bool, outage_s: float, progress: Any, ending: list[dict[str, Any]]) -> int:
    """Print (or collect, for JSON) each event of the run until it ends; EXIT_OK when it finished."""
    from cdimf.common.metric_labels import shown
    from cdimf.common.wire.serde import event_kind_name, event_to_json

    outcome = EXIT_FAILED
    async for event in client.watch_run(run_id, outage_s=outage_s):
        kind = event_kind_name(event.kind)
        if kind == "run_finished":
            outcome = EXIT_OK
        if as_json:
            line = event_to_json(event)
            if kind in ("run_finished", "run_stopped"):
                # the final round's metrics may come after the run ended: the end goes last
                ending.append(line)
            else:
                print(json.dumps(line), flush=True)
        elif kind == "persist_failed":
            progress.write(f"round {event.round:4d}  the aggregator cannot save its state: {event.message} (Z held back, retrying)")
        elif kind == "persist_recovered":
            progress.write(f"round {event.round:4d}  the aggregator saved its state again")
        elif kind == "metrics" and event.metrics:
            # an empty set only says the domain is done with the round (it does not validate it)
            progress.write(f"round {event.round:4d}  {event.domain:<12} {shown(event.metrics, 'valid')}")
        elif kind == "round_closed" and event.missing:
            progress.write(f"round {event.round:4d}  closed without {', '.join(event.missing)}")
        if kind == "round_closed" and not as_json:
            progress.update(1)
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
    from cdimf.progress import say

    return AggregatorClient(config.aggregator, "", credentials_for(config.tls), rpc_timeout_s=config.rpc_timeout_s,
                            retry_for_s=config.rpc_timeout_s, on_retry=lambda message: say(f"cdimf: {message}"))


def _train(args: argparse.Namespace) -> int:
    """Start a run and (with --follow) follow it to its end."""
    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> int:
        """Start the run and optionally follow it; the exit status."""
        client = _control_client(config)
        try:
            info = await start_run(client, config.run, args.wait_for_domains_s)
            if args.json and not args.follow:
                print_json({"run_id": info.run_id, "state": info.state, "domains": list(info.admitted_domains)})
            elif not args.json:
                print(f"run {info.run_id} started over {', '.join(info.admitted_domains)}", file=sys.stderr)
            if not args.follow:
                return EXIT_OK
            return await follow_run(client, info.run_id, info.rounds, args.json, args.follow_timeout_s)
        finally:
            await client.close()

    return _with_aggregator_errors(main, args.json)


def _with_aggregator_errors(main: Any, as_json: bool = False) -> int:
    """Run a coroutine function; an AggregatorError prints (as {"ok": false, "error": ...} with --json) and exits 1."""
    from cdimf.common.rpc.aggregator_client import AggregatorError

    try:
        return asyncio.run(main())
    except AggregatorError as error:
        report_error(str(error), as_json)
        return EXIT_FAILED


def report_error(message: str, as_json: bool) -> None:
    """An error on stderr, or as the JSON schema's failure object on stdout."""
    if as_json:
        print(json.dumps({"ok": False, "error": message}), flush=True)
    else:
        print(f"cdimf: error: {message}", file=sys.stderr)


def print_json(payload: dict[str, Any]) -> None:
    """A successful command's JSON object: {"ok": true, ...}."""
    print(json.dumps({"ok": True, **payload}, indent=2), flush=True)


def _status(args: argparse.Namespace) -> int:
    """Print the aggregator's run and domains."""
    from cdimf.common.metric_labels import shown
    from cdimf.common.wire.serde import status_to_json

    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> int:
        """Fetch the status and print it as a table or JSON."""
        client = _control_client(config)
        try:
            status = await client.get_status()
        finally:
            await client.close()
        view = status_to_json(status)
        if args.json:
            print_json(view)
            return EXIT_OK
        run = view["run"]
        print(f"run {run['run_id'] or '-'}: {run['state']}, round {run['round']}/{run['rounds']}, "
              f"latest consensus {run['consensus_round']}, shared users {view['shared_users']}")
        for domain in status.domains:
            print(f"  {domain.domain:<12} rows {domain.rows:>8}  shared {domain.shared_rows:>8}  "
                  f"admitted {str(domain.admitted).lower():<5}  last push {domain.latest_contribution_round:>4}  "
                  f"{shown(domain.latest_metrics, 'valid')}")
        print("\n".join(cold_start_table(view["domains"])))
        return EXIT_OK

    return _with_aggregator_errors(main, args.json)


def _per_domain(counts: Any) -> str:
    """{domain: count} as "cloth 40, music 0" (or "none")."""
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "none"


def cold_start_table(domains: list[dict[str, Any]]) -> list[str]:
    """`cdimf status`'s cold-start lines: per holder its policy and cap, then the receiver rows each other domain takes of its users."""
    names = [entry["domain"] for entry in domains]
    lines = ["cold start: receiver rows served (row: holder, column: receiving domain)",
             "  " + f"{'holder':<12} {'policy':<28} {'cap':>8} " + " ".join(f"{name:>10}" for name in names)]
    for entry in domains:
        described = ColdStartPolicy.model_validate(entry["cold_start"] or {}).describe()
        cap = "-" if entry["max_served_rows"] is None else str(entry["max_served_rows"])
        cells = " ".join(f"{'-' if name == entry['domain'] else entry['served_to'].get(name, 0):>10}" for name in names)
        lines.append(f"  {entry['domain']:<12} {described:<28} {cap:>8} {cells}")
    return lines


def _stop(args: argparse.Namespace) -> int:
    """Stop the current (or the named) run."""
    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> int:
        """Stop the configured run, or the current one when none is named."""
        client = _control_client(config)
        try:
            run_id = config.run.run_id or (await client.get_status()).run.run_id
            if not run_id:
                report_error("no run to stop", args.json)
                return EXIT_FAILED
            info = await client.stop_run(run_id, args.reason)
        finally:
            await client.close()
        if args.json:
            print_json({"run_id": info.run_id, "state": info.state})
        else:
            print(f"run {info.run_id} {info.state}", file=sys.stderr)
        return EXIT_OK

    return _with_aggregator_errors(main, args.json)


def _runs(args: argparse.Namespace) -> int:
    """List the aggregator's kept runs (current and ended)."""
    from cdimf.common.wire.serde import run_record_to_json

    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> int:
        """ListRuns without events."""
        client = _control_client(config)
        try:
            runs = [run_record_to_json(record) for record in (await client.list_runs()).runs]
        finally:
            await client.close()
        if args.json:
            print_json({"runs": [{key: value for key, value in run.items() if key != "events"} for run in runs]})
            return EXIT_OK
        print(f"{'run':<20} {'state':<9} {'round':>9} {'domains'}")
        for run in runs:
            print(f"{run['run_id']:<20} {run['state']:<9} {str(run['round']) + '/' + str(run['rounds']):>9} {', '.join(run['domains'])}")
        return EXIT_OK

    return _with_aggregator_errors(main, args.json)


def _log(args: argparse.Namespace) -> int:
    """A run's per-round history (also after it ended): its events, metrics labelled and in %."""
    from cdimf.common.metric_labels import shown
    from cdimf.common.wire.serde import ended_last, event_kind_name, run_record_to_json

    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> int:
        """ListRuns for one run with its events."""
        client = _control_client(config)
        try:
            record = (await client.list_runs(args.run, with_events=True)).runs[0]
        finally:
            await client.close()
        if args.json:
            print_json(run_record_to_json(record))
            return EXIT_OK
        view = run_record_to_json(record)
        print(f"run {view['run_id']}: {view['state']}, round {view['round']}/{view['rounds']}, domains {', '.join(view['domains'])}"
              + (f", stopped: {view['stop_reason']}" if view["stop_reason"] else ""))
        for event in ended_last(record.events):
            kind = event_kind_name(event.kind)
            detail = {"metrics": f"{event.domain:<12} {shown(event.metrics, 'valid')}",
                      "round_closed": f"closed by {', '.join(event.contributors)}" + (f", without {', '.join(event.missing)}" if event.missing else "")
                      }.get(kind, "")
            print(f"{event.elapsed_s:8.1f} s  round {event.round:4d}  {kind:<13} {detail}".rstrip())
        return EXIT_OK

    return _with_aggregator_errors(main, args.json)


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
                report_error(f"Recommend: {error.code().name}: {error.details()}", args.json)
                return EXIT_FAILED
        if args.json:
            print_json({"user": reply.user_key, "cold_start": reply.cold_start,
                        "items": [{"item": i, "score": round(float(s), 6)} for i, s in zip(reply.items, reply.scores)]})
        else:
            print(f"user {reply.user_key}{' (cold start: scored with its consensus vector)' if reply.cold_start else ''}")
            for rank, (item, score) in enumerate(zip(reply.items, reply.scores), 1):
                print(f"{rank:4d}  {item:<24} {score:.4f}")
        return EXIT_OK

    return asyncio.run(main())


def _evaluate(args: argparse.Namespace) -> int:
    """A node's current model on its test or valid split, by the sampled or the full-catalog protocol."""
    from cdimf.common.metric_labels import labelled_percent, shown
    from cdimf.common.rpc.channels import open_channel
    from cdimf.protos.v1 import federation_pb2 as pb
    from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

    tls = _tls_only(args.config, args, args.fields)

    async def main() -> int:
        """Call Evaluate and print the labelled metrics."""
        async with open_channel(args.node, tls) as channel:
            try:
                reply = await pb_grpc.DomainNodeStub(channel).Evaluate(
                    pb.EvaluateRequest(split=args.split, k=args.k, protocol=args.protocol), timeout=args.timeout_s)
            except grpc.aio.AioRpcError as error:
                report_error(f"Evaluate: {error.code().name}: {error.details()}", args.json)
                return EXIT_FAILED
        negatives = reply.negatives if reply.protocol == "sampled" else None
        if args.json:
            print_json({"split": reply.split, "protocol": reply.protocol, "negatives": reply.negatives, "k": reply.k, "users": reply.users,
                        "round": reply.round, "metrics": labelled_percent(reply.metrics, reply.split, negatives)})
        else:
            print(f"round {reply.round}, {reply.users} users: {shown(reply.metrics, reply.split, negatives)}")
        return EXIT_OK

    return asyncio.run(main())


def _export(args: argparse.Namespace) -> int:
    """Write a saved model's or a node's factors and id maps as .npy files or Parquet tables."""
    from cdimf.export import model_factors, node_factors, write_factors

    if (args.model is None) == (args.node_config is None):
        raise ValueError("give exactly one of --model DIR (a saved model) or --node-config FILE (a node's config and state_dir)")
    factors = model_factors(args.model) if args.model is not None else node_factors(load_with_flags(NodeConfig, args.node_config, args, {}))
    written = write_factors(factors, args.out, args.format)
    if args.json:
        print_json({"out": str(args.out), "format": args.format, "domains": sorted(factors), "files": [path.name for path in written]})
    else:
        print(f"wrote {len(written)} files for {', '.join(sorted(factors))} into {args.out}", file=sys.stderr)
    return EXIT_OK


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


def _node_status(args: argparse.Namespace) -> int:
    """A domain node's phase, run, round and solver backend from its DomainNode service."""
    from cdimf.common.metric_labels import labelled_percent, privacy_shown, shown
    from cdimf.common.rpc.channels import open_channel
    from cdimf.protos.v1 import federation_pb2 as pb
    from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

    check_address(args.node, allow_port_zero=False)
    tls = _tls_only(args.config, args, args.fields)

    async def main() -> int:
        """Call GetStatus and print it as one line or JSON."""
        async with open_channel(args.node, tls) as channel:
            try:
                status = await pb_grpc.DomainNodeStub(channel).GetStatus(pb.StatusRequest(), timeout=args.timeout_s)
            except grpc.aio.AioRpcError as error:
                report_error(f"GetStatus: {error.code().name}: {error.details()}", args.json)
                return EXIT_FAILED
        if args.json:
            print_json({"domain": status.domain, "run_id": status.run_id, "phase": status.phase, "round": status.round,
                        "epochs": status.epochs, "users": status.users, "items": status.items, "shared_rows": status.shared_rows,
                        "receiver_rows": status.receiver_rows, "connected": status.connected,
                        "solver_backend": status.solver_backend, "latest_metrics": labelled_percent(status.latest_metrics, "valid"),
                        "served_to": dict(sorted(status.served_to.items())), "received_from": dict(sorted(status.received_from.items())),
                        "registration_refused": status.registration_refused or None, "error": status.error or None,
                        "dp_epsilon": status.dp_epsilon, "dp_delta": status.dp_delta})
        else:
            print(f"domain {status.domain}: {status.phase}, run {status.run_id or '-'} round {status.round}, "
                  f"{status.users} users x {status.items} items, solver backend {status.solver_backend}, "
                  f"{'connected' if status.connected else 'not connected'}  {shown(status.latest_metrics, 'valid')}"
                  f"  {privacy_shown(status.dp_epsilon, status.dp_delta)}".rstrip())
            print(f"  cold start: others receive {sum(status.served_to.values())} of its users ({_per_domain(status.served_to)}); "
                  f"it receives {sum(status.received_from.values())} rows ({_per_domain(status.received_from)})")
            if status.error:
                print(f"  error: {status.error}")
            if status.registration_refused:
                print(f"  registration refused: {status.registration_refused}")
        return EXIT_OK

    return asyncio.run(main())


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




LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _control_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, what: str, handler: Any,
                    json_help: str = "print one JSON object (README: machine-readable output)") -> argparse.ArgumentParser:
    """A control command: --config, --json and the ControlConfig flags only (the file may also hold [run])."""
    sub = commands.add_parser(name, help=what, description=what)
    sub.add_argument("--config", help="TOML file: aggregator and [tls] (operator certificate); a train file's [run] is allowed")
    sub.add_argument("--json", action="store_true", help=json_help)
    sub.set_defaults(handler=handler, fields=add_model_flags(sub, ControlConfig, TLS_FLATTEN))
    return sub


def add_parsers(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the runtime subcommands on the `cdimf` parser."""
    agg = commands.add_parser("serve-aggregator", help="serve the aggregator (AggregatorConfig)", description="Serve the aggregator.")
    agg.add_argument("--config", help="TOML file with the AggregatorConfig fields")
    agg.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log messages at this level and above on stderr (default: INFO)")
    agg.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text lines or one JSON object per line")
    agg.set_defaults(handler=_serve_aggregator, fields=add_model_flags(agg, AggregatorConfig, TLS_FLATTEN))

    node = commands.add_parser("serve-node", help="serve one domain node (NodeConfig); the secret comes from secret_file or CDIMF_SECRET",
                               description="Serve one domain node.")
    node.add_argument("--config", help="TOML file with the NodeConfig fields")
    node.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log messages at this level and above on stderr (default: INFO)")
    node.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text lines or one JSON object per line")
    node.set_defaults(handler=_serve_node, fields=add_model_flags(node, NodeConfig, TLS_FLATTEN))

    train = commands.add_parser("train", help="start a training run (RunParams) and follow it", description="Start a training run.")
    train.add_argument("--config", help="TOML file: aggregator, [tls] (operator certificate) and [run] (RunParams)")
    train.add_argument("--follow", action="store_true", help="follow the run: progress of rounds on stderr, per-round validation metrics per domain")
    train.add_argument("--json", action="store_true", help="machine-readable output (with --follow: one JSON event per line, the run's end last)")
    train.add_argument("--follow-timeout-s", type=positive_seconds, default=FOLLOW_OUTAGE_S,
                       help="with --follow: how long an unreachable aggregator (restart, pause) is waited for, in seconds")
    train.add_argument("--wait-for-domains-s", type=float, default=120.0,
                       help="retry starting the run this long while fewer than min_domains domains registered (default: 120)")
    train.set_defaults(handler=_train, fields=add_model_flags(train, TrainConfig, TLS_FLATTEN))

    _control_parser(commands, "status", "show the aggregator's run and domains", _status)
    stop = _control_parser(commands, "stop", "stop the current run (or the one --run-id names)", _stop)
    stop.add_argument("--run-id", dest="field__run__run_id", metavar="RUN_ID", help="the run to stop (default: the current one)")
    stop.add_argument("--reason", default="stopped by the operator", help="why, kept with the run and shown by `cdimf log` (default: %(default)s)")
    stop.get_default("fields")["field__run__run_id"] = (("run", "run_id"), "--run-id")
    _control_parser(commands, "runs", "list the aggregator's runs, the current one and those that ended", _runs)
    log = _control_parser(commands, "log", "show a run's per-round history (also after it ended)", _log)
    log.add_argument("run", help="the run's id (see `cdimf runs`)")

    rec = commands.add_parser("recommend", help="top-k items for a user key from a domain node", description="Top-k items for a user key.")
    rec.add_argument("--node", required=True, type=_address_argument, help="host:port of the node's server")
    rec.add_argument("--user", required=True, help="the domain's own user key")
    rec.add_argument("-k", type=positive_int, default=10, help="number of items (default: 10)")
    rec.add_argument("--include-seen", action="store_true", help="keep items the user already interacted with")
    rec.add_argument("--json", action="store_true", help="print one JSON object")
    rec.add_argument("--timeout-s", type=float, default=10.0, help="deadline of the call in seconds (default: 10)")
    rec.add_argument("--config", help="any cdimf TOML file; only its [tls] table is used")
    rec.set_defaults(handler=_recommend, fields=add_model_flags(rec, TLSConfig))

    ev = commands.add_parser("evaluate", help="evaluate a node's current model on its test or valid split",
                             description="Evaluate a node's current model: HR@k / NDCG@k (full: also Recall and Coverage), in %%.")
    ev.add_argument("--node", required=True, type=_address_argument, help="host:port of the node's server")
    ev.add_argument("--split", choices=("test", "valid"), default="test", help="held-out split (default: test)")
    ev.add_argument("--protocol", choices=("sampled", "full"), default="sampled",
                    help="sampled: target among the split's fixed negatives (test 999, valid 99); full: the whole catalog (default: sampled)")
    ev.add_argument("-k", type=positive_int, default=10, help="cut-off (default: 10)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--timeout-s", type=float, default=600.0, help="deadline of the call in seconds (default: 600)")
    ev.add_argument("--config", help="any cdimf TOML file; only its [tls] table is used")
    ev.set_defaults(handler=_evaluate, fields=add_model_flags(ev, TLSConfig))

    ex = commands.add_parser("export", help="write a saved model's or a node's factors and id maps (.npy or Parquet)",
                             description="Export factors with their id maps: row i of <domain>.user_factors belongs to <domain>.user_ids[i].")
    ex.add_argument("--model", type=Path, help="a model folder written by the Python API's save()")
    ex.add_argument("--node-config", type=Path, help="a node's TOML config: its files give the ids, its state_dir's checkpoint the factors")
    ex.add_argument("--out", type=Path, required=True, help="folder to write into (created)")
    ex.add_argument("--format", choices=("npy", "parquet"), default="npy", help="npy files, or Parquet tables (needs pyarrow) (default: npy)")
    ex.add_argument("--json", action="store_true", help="print one JSON object")
    ex.set_defaults(handler=_export)

    ns = commands.add_parser("node-status", help="a domain node's phase, round and solver backend",
                             description="A domain node's phase, run, round and solver backend (its GetStatus).")
    ns.add_argument("--node", required=True, type=_address_argument, help="host:port of the node's server")
    ns.add_argument("--json", action="store_true", help="print one JSON object")
    ns.add_argument("--timeout-s", type=float, default=10.0, help="deadline of the call in seconds (default: 10)")
    ns.add_argument("--config", help="any cdimf TOML file; only its [tls] table is used")
    ns.set_defaults(handler=_node_status, fields=add_model_flags(ns, TLSConfig))

    health = commands.add_parser("health", help="gRPC health check; exit 0 when SERVING", description="gRPC health check.")
    health.add_argument("--target", required=True, type=_address_argument, help="host:port of a node or the aggregator")
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout-s", type=float, default=5.0, help="deadline of the check in seconds (default: 5)")
    health.add_argument("--config", help="any cdimf TOML file; only its [tls] table is used")
    health.set_defaults(handler=_health, fields=add_model_flags(health, TLSConfig))
