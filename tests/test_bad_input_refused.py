"""Bad input refused cleanly: replayed pushes, undecodable bytes on every method, oversized keys and reports, a graceful stop, a taken port."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from cdimf.aggregator.service import MAX_METRICS_REPORT_BYTES, RunningAggregator, start_aggregator
from cdimf.common.config import AggregatorConfig, ConfigError, NodeConfig, RunParams, TLSConfig, load_config
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.common.rpc.channels import credentials_for
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.common.wire.chunks import CHUNK_BYTES, encode_matrix, encode_matrix_serialized
from cdimf.domain_node.data import IdMap
from cdimf.domain_node.service import MAX_USER_KEY_CHARS
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from cdimf.simulate import write_throwaway_certificates
from tests.federation_harness import RANK, REPO_ROOT, Processes, port_of, user_key, write_domains

pytestmark = pytest.mark.timeout(180)
SECRET = b"test-federation-secret-32-bytes!"
PUSH = "/cdimf.v1.Aggregator/PushContribution"
REPORT = "/cdimf.v1.Aggregator/ReportMetrics"
UNDECODABLE = b"\xff\xff\xff\xff\xff"  # a field tag whose varint never ends: no protobuf message parses it



@asynccontextmanager
async def _aggregator(folder: Path, tls: dict[str, TLSConfig] | None) -> AsyncIterator[RunningAggregator]:
    """An aggregator server on a free loopback port, plaintext or over mutual TLS."""
    settings = TLSConfig(insecure=True) if tls is None else tls["aggregator"]
    running = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=folder / "state", tls=settings))
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


def _client(address: str, domain: str, tls: dict[str, TLSConfig] | None) -> AggregatorClient:
    """A client of one party (the operator for domain "")."""
    credentials = None if tls is None else credentials_for(tls[domain or "operator"])
    return AggregatorClient(address, domain, credentials, retry_for_s=5)


async def _registered_run(address: str, tls: dict[str, TLSConfig] | None, rows: int, rank: int) -> tuple[AggregatorClient, AggregatorClient, str]:
    """sport holds u0..u(rows-1), cloth u3..u(rows+2): rows - 3 shared; a started run of `rank`."""
    sport, cloth = _client(address, "sport", tls), _client(address, "cloth", tls)
    await sport.register(pseudonymize(np.array([f"u{i}" for i in range(rows)]), SECRET), np.ones(rows, bool))
    await cloth.register(pseudonymize(np.array([f"u{i}" for i in range(3, rows + 3)]), SECRET), np.ones(rows, bool))
    async with _client(address, "", tls) as operator:
        run = await operator.start_run(RunParams(rounds=3, rank=rank))
    return sport, cloth, run.run_id


@pytest.mark.parametrize("mode", ["plaintext", "mutual TLS"])
def test_a_replayed_five_chunk_push_is_already_exists_every_time(tmp_path: Path, mode: str) -> None:
    """The same 5-chunk push sent again 20 times: ALREADY_EXISTS each time (never INTERNAL), state unchanged."""
    tls = write_throwaway_certificates(tmp_path / "pki", ["sport", "cloth"]) if mode == "mutual TLS" else None
    rank = 64
    rows = 5 * CHUNK_BYTES // (rank * 4) - 10 + 3  # 5 chunks of shared rows, the last one part full

    async def scenario() -> None:
        async with _aggregator(tmp_path, tls) as running:
            sport, cloth, run_id = await _registered_run(running.address, tls, rows, rank)
            chunks = list(encode_matrix_serialized(np.ones((rows - 3, rank), np.float32), pb.Header(run_id=run_id, domain="sport", round=1)))
            assert len(chunks) == 5
            push = sport.channel.stream_unary(PUSH, request_serializer=None, response_deserializer=pb.Ack.FromString)
            assert (await push(iter(chunks), timeout=30)).accepted_round == 1
            run = running.state.run
            assert run is not None
            held = {domain: values.tobytes() for domain, (_, values) in run.contributions.items()}
            outcomes = []
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await push(iter(chunks), timeout=30)
                outcomes.append((refused.value.code(), refused.value.details()))
            assert outcomes == [(grpc.StatusCode.ALREADY_EXISTS, "domain sport already contributed to round 1")] * 20
            assert {domain: values.tobytes() for domain, (_, values) in run.contributions.items()} == held
            for client in (sport, cloth):
                await client.close()

    asyncio.run(scenario())


def test_a_metrics_report_is_bounded_in_bytes_before_it_is_decoded(tmp_path: Path) -> None:
    """A report of one metric repeated 100,000 times on the wire (which protobuf would fold into one)
    and one with a megabyte of unknown field: INVALID_ARGUMENT naming the size, nothing recorded or
    written; a normal report then passes."""

    async def scenario() -> None:
        async with _aggregator(tmp_path, None) as running:
            sport, cloth, run_id = await _registered_run(running.address, None, 6, 4)
            for client in (sport, cloth):
                await client.push_contribution(run_id, 1, np.ones((3, 4), np.float32))
            await sport.get_status()  # the round closes after the last push's ack; a status waits for its save
            header = pb.MetricsReport(header=pb.Header(run_id=run_id, domain="sport", round=1)).SerializeToString()
            entry = pb.MetricsReport(metrics={"hr": 0.5}).SerializeToString()
            unknown_field = b"\xfa\x3e" + bytes([0x80, 0x80, 0x40]) + b"x" * (1 << 20)  # field 999, length 1 MiB
            files = {path: path.read_bytes() for path in (tmp_path / "state").rglob("*") if path.is_file()}
            report = sport.channel.unary_unary(REPORT, request_serializer=None, response_deserializer=pb.Ack.FromString)
            for label, message in (("repeated entry", header + entry * 100_000), ("unknown field", header + entry + unknown_field)):
                assert pb.MetricsReport.FromString(message).metrics == {"hr": 0.5}  # what a decoder would have let through
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await report(message, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
                assert refused.value.details() == f"the ReportMetrics request is {len(message)} bytes, at most {MAX_METRICS_REPORT_BYTES}"
            run = running.state.run
            assert run is not None and run.metrics == {}
            assert {path: path.read_bytes() for path in (tmp_path / "state").rglob("*") if path.is_file()} == files
            await sport.report_metrics(run_id, 1, {"hr": 0.5, "ndcg": 0.25})
            assert run.metrics == {"sport": {1: {"hr": 0.5, "ndcg": 0.25}}}
            for client in (sport, cloth):
                await client.close()

    asyncio.run(scenario())


def test_long_request_strings_are_never_echoed_whole(tmp_path: Path) -> None:
    """Megabyte run ids and domain names in every kind of aggregator request: the right status with a
    short detail (echoed whole, a detail over gRPC's 8 KB metadata limit came back as RESOURCE_EXHAUSTED)."""
    long_run, long_domain = "r" * 1_000_000, "d" * 1_000_000

    async def scenario() -> dict[str, tuple[grpc.StatusCode, str]]:
        async with _aggregator(tmp_path, None) as running:
            sport, cloth, run_id = await _registered_run(running.address, None, 6, 4)
            stub = pb_grpc.AggregatorStub(sport.channel)
            calls = {
                "StartRun run_id": stub.StartRun(pb.StartRunRequest(params=pb.RunParams(rounds=1, rank=4, run_id=long_run)), timeout=20),
                "ListRuns run_id": stub.ListRuns(pb.ListRunsRequest(header=pb.Header(run_id=long_run)), timeout=20),
                "StopRun run_id": stub.StopRun(pb.StopRunRequest(header=pb.Header(run_id=long_run)), timeout=20),
                "ReportMetrics run_id": stub.ReportMetrics(pb.MetricsReport(header=pb.Header(run_id="r" * 3000, domain="sport", round=1),
                                                                            metrics={"hr": 0.5}), timeout=20),
                "WaitForRun domain": stub.WaitForRun(pb.WaitForRunRequest(header=pb.Header(domain=long_domain)), timeout=20),
                "PushContribution domain": stub.PushContribution(iter(encode_matrix(np.ones((3, 4), np.float32),
                                                                                     pb.Header(run_id=run_id, domain=long_domain, round=1))),
                                                                 timeout=20),
                "PushContribution run_id": stub.PushContribution(iter(encode_matrix(np.ones((3, 4), np.float32),
                                                                                     pb.Header(run_id=long_run, domain="sport", round=1))),
                                                                 timeout=20),
            }
            outcomes = {}
            for label, call in calls.items():
                try:
                    await call
                    outcomes[label] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as error:
                    outcomes[label] = (error.code(), error.details() or "")
            for client in (sport, cloth):
                await client.close()
            return outcomes

    outcomes = asyncio.run(scenario())
    expected = {"StartRun run_id": grpc.StatusCode.INVALID_ARGUMENT, "ListRuns run_id": grpc.StatusCode.NOT_FOUND,
                "StopRun run_id": grpc.StatusCode.NOT_FOUND, "ReportMetrics run_id": grpc.StatusCode.NOT_FOUND,
                "WaitForRun domain": grpc.StatusCode.INVALID_ARGUMENT, "PushContribution domain": grpc.StatusCode.INVALID_ARGUMENT,
                "PushContribution run_id": grpc.StatusCode.NOT_FOUND}
    assert {label: code for label, (code, _) in outcomes.items()} == expected, outcomes
    for label, (_, detail) in outcomes.items():
        assert len(detail) < 300 and "characters)" in detail, (label, detail[:400])


def _methods(service: str) -> list[tuple[str, bool, bool]]:
    """(full path, request streaming, response streaming) of every method of a service."""
    if service == "grpc.health.v1.Health":
        return [("/grpc.health.v1.Health/Check", False, False), ("/grpc.health.v1.Health/Watch", False, True)]
    described = pb.DESCRIPTOR.services_by_name[service]
    return [(f"/{described.full_name}/{method.name}", method.client_streaming, method.server_streaming) for method in described.methods]


async def _send_undecodable(address: str, method: str, streams_in: bool, streams_out: bool) -> grpc.StatusCode:
    """The status a call of `method` gets whose one request message is UNDECODABLE."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            if streams_in and streams_out:
                async for _ in channel.stream_stream(method)(iter([UNDECODABLE]), timeout=10):
                    pass
            elif streams_in:
                await channel.stream_unary(method)(iter([UNDECODABLE]), timeout=10)
            elif streams_out:
                async for _ in channel.unary_stream(method)(UNDECODABLE, timeout=10):
                    pass
            else:
                await channel.unary_unary(method)(UNDECODABLE, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def _log_lines(path: Path) -> list[str]:
    """The lines a process wrote to its log."""
    return path.read_text().splitlines()


def test_undecodable_bytes_on_every_method_then_a_graceful_stop(tmp_path: Path, processes: Processes) -> None:
    """Real aggregator and node processes: bytes that decode as no message, sent to every method of
    both servers (and their health services), get INVALID_ARGUMENT with one WARNING line each and no
    traceback; SIGTERM with calls in flight then stops both with status 0 and no ERROR line."""
    files = write_domains(tmp_path / "data")
    aggregator_process, aggregator = processes.aggregator()
    node_process, node = processes.node("sport", files, aggregator)
    targets = {
        "aggregator": (aggregator, [*_methods("Aggregator"), *_methods("grpc.health.v1.Health")]),
        "node-sport": (node, [*_methods("DomainNode"), *_methods("grpc.health.v1.Health")]),
    }

    async def scenario() -> dict[str, dict[str, grpc.StatusCode]]:
        codes = {name: {method: await _send_undecodable(address, method, streams_in, streams_out) for method, streams_in, streams_out in methods}
                 for name, (address, methods) in targets.items()}
        # calls in flight when the signal comes: an operator waiting for a run, a watch
        async with grpc.aio.insecure_channel(aggregator) as channel:
            waiting = channel.unary_unary("/cdimf.v1.Aggregator/WaitForRun", request_serializer=pb.WaitForRunRequest.SerializeToString,
                                          response_deserializer=pb.RunInfo.FromString)(pb.WaitForRunRequest(wait_s=60), timeout=90)
            await asyncio.sleep(0.5)
            for process in (aggregator_process, node_process):
                process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError):
                await waiting
        return codes

    codes = asyncio.run(scenario())
    for name, by_method in codes.items():
        assert by_method == dict.fromkeys(by_method, grpc.StatusCode.INVALID_ARGUMENT), (name, by_method)
    assert len(codes["aggregator"]) == 13 and len(codes["node-sport"]) == 5
    for process in (aggregator_process, node_process):
        assert process.wait(30) == 0
    for name, (_, methods) in targets.items():
        lines = _log_lines(tmp_path / f"{name}.log")
        refused = [line for line in lines if " WARNING " in line and "refused" in line]
        assert len(refused) == len(methods), (name, refused)
        assert not [line for line in lines if " ERROR " in line or "Traceback" in line], (name, lines)


def _peak_rss_kib(pid: int) -> int:
    """VmHWM of a process: its peak resident memory so far, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert found is not None
    return int(found.group(1))


def test_recommend_refuses_long_keys_cheaply_and_never_echoes_them(tmp_path: Path, processes: Processes) -> None:
    """A trained node process: 20 KB and 1 MB user keys get INVALID_ARGUMENT, a long unknown key
    NOT_FOUND, each with a short detail; the node's peak RSS does not move (a 1 MB key once widened
    every known key to 4 MB)."""
    files = write_domains(tmp_path / "data")
    _, aggregator = processes.aggregator()
    node_process, node = processes.nodes(files, aggregator)["sport"]
    trained = subprocess.run([sys.executable, "-m", "cdimf", "train", "--aggregator", aggregator, "--insecure", "--rounds", "1",
                              "--rank", str(RANK), "--min-domains", "2", "--follow"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr

    async def recommend(channel: grpc.aio.Channel, key: str) -> tuple[grpc.StatusCode, str]:
        call = channel.unary_unary("/cdimf.v1.DomainNode/Recommend", request_serializer=pb.RecommendRequest.SerializeToString,
                                   response_deserializer=pb.RecommendReply.FromString)
        try:
            reply = await call(pb.RecommendRequest(user_key=key, k=5), timeout=20)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ",".join(reply.items)

    async def scenario() -> dict[str, tuple[grpc.StatusCode, str]]:
        async with grpc.aio.insecure_channel(node) as channel:
            known = await recommend(channel, user_key(3))
            assert known[0] == grpc.StatusCode.OK and len(known[1].split(",")) == 5, known
            before = _peak_rss_kib(node_process.pid)
            outcomes = {label: await recommend(channel, key) for label, key in (
                ("20 KB", "k" * 20_000), ("1 MB", "m" * 1_000_000),
                ("longest allowed, unknown", "u" * MAX_USER_KEY_CHARS), ("a known key plus a tail", user_key(3) + "x" * 900),
            )}
            evaluate = channel.unary_unary("/cdimf.v1.DomainNode/Evaluate", request_serializer=pb.EvaluateRequest.SerializeToString,
                                           response_deserializer=pb.EvaluateReply.FromString)
            for label, request in (("split", pb.EvaluateRequest(split="s" * 1_000_000)), ("protocol", pb.EvaluateRequest(protocol="p" * 1_000_000))):
                try:
                    await evaluate(request, timeout=20)
                    outcomes[label] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as error:
                    outcomes[label] = (error.code(), error.details() or "")
            outcomes["growth KiB"] = (grpc.StatusCode.OK, str(_peak_rss_kib(node_process.pid) - before))
            return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes["20 KB"][0] == outcomes["1 MB"][0] == grpc.StatusCode.INVALID_ARGUMENT, outcomes
    assert f"user_key is 1000000 characters, at most {MAX_USER_KEY_CHARS}" in outcomes["1 MB"][1]
    assert outcomes["longest allowed, unknown"][0] == outcomes["a known key plus a tail"][0] == grpc.StatusCode.NOT_FOUND
    assert outcomes["split"][0] == outcomes["protocol"][0] == grpc.StatusCode.INVALID_ARGUMENT, outcomes
    for label in ("20 KB", "1 MB", "longest allowed, unknown", "a known key plus a tail", "split", "protocol"):
        assert len(outcomes[label][1]) < 200, (label, outcomes[label][1][:400])
    # a widened comparison of 1 MB keys costs 4 MB per known key (62 here): well over this
    assert int(outcomes["growth KiB"][1]) < 32 * 1024, outcomes["growth KiB"]


def test_a_key_longer_than_every_known_key_is_unknown_without_widening() -> None:
    """IdMap: keys longer than the longest known one are not found (also when their start is a known
    key); known keys in the same query still are, and the comparison stays at the map's width."""
    ids = IdMap.from_keys(np.array(["alice", "bob", "carol"]))
    query = np.array(["bob", "alice" + "x" * 5000, "carol", "carolx"])
    np.testing.assert_array_equal(ids.index_of(query, missing=-1), [1, -1, 2, -1])
    numbers = IdMap.from_keys(np.array([7, 11, 12]))
    np.testing.assert_array_equal(numbers.index_of(np.array(["11", "1" * 3000]), missing=-1), [1, -1])
    many = IdMap.from_keys(np.array([f"user-{i:06d}" for i in range(100)]))
    huge = np.array(["h" * 1_000_000])  # 4 MB as numpy text
    tracemalloc.start()
    try:
        assert many.index_of(huge, missing=-1).tolist() == [-1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # widened to the query's width, the 100 known keys alone would take 400 MB
    assert peak < 16 * 1024 * 1024, peak


def test_a_taken_port_is_one_line_for_a_node_too(tmp_path: Path, processes: Processes) -> None:
    """A node told to listen on a port in use exits 2 with one `cdimf: error` line naming it, no traceback."""
    _, address = processes.aggregator()
    port = port_of(address)
    files = write_domains(tmp_path / "data")
    second = subprocess.run(
        [sys.executable, "-m", "cdimf", "serve-node", "--domain", "sport", "--train-path", str(files["sport"]["train"]), "--data-format", "csv",
         "--listen", f"127.0.0.1:{port}", "--aggregator", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "sport"), "--insecure"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "CDIMF_SECRET": "x" * 32},
    )
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("cdimf: error")]
    assert errors and f"127.0.0.1:{port}" in errors[0] and "Traceback" not in second.stderr, second.stderr


def test_binary_bytes_in_a_config_file_name_the_file(tmp_path: Path) -> None:
    """A config file with bytes that are no UTF-8 text: a ConfigError naming the file and the byte, and
    `serve-node --config` exits 2 with that one line, no traceback."""
    path = tmp_path / "node.toml"
    text = b'domain = "sport"\nsecret = "'
    path.write_bytes(text + b'\xff\xfe"\n')
    with pytest.raises(ConfigError) as refused:
        load_config(NodeConfig, path)
    # the bad byte is the first one after `text`, on its second line
    assert str(refused.value) == f"{path}:2: not a TOML text file: byte 0xff at offset {len(text)} is not UTF-8"
    started = subprocess.run([sys.executable, "-m", "cdimf", "serve-node", "--config", str(path)], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=60)
    assert started.returncode == 2 and str(path) in started.stderr and "Traceback" not in started.stderr, started.stderr
