"""Exchange throughput: push X+U and pull Z for N shared users x rank float32 over loopback.

    python benchmarks/exchange_throughput.py [--users 1000000] [--rank 64] [--repeat 5] [--warmup 1] [--secure]

Starts the aggregator (`python -m cdimf.aggregator`) and a baseline server as separate processes on
127.0.0.1. The baseline streams the same number of raw 1 MiB byte messages through gRPC with no
protobuf message, no checksum and no decoding (generic handlers, bytes in and out): what gRPC
itself costs. Prints MB/s of the real push (X+U, one domain, round not closing; it includes the
fsynced write of the contribution's file, which precedes every ack), the push that closes the
round, its ratio to the ordinary push (target >= 0.5x), the close that runs after that push's
ack (consensus, Z's file and the small commit record; timed as the wait of the status call
sent right after the ack, which the close holds back, since no call sees the state before the
close and its save are done), the pull of Z, the baseline both ways, the ratios, and the
aggregator's peak memory (VmHWM) over the matrices it holds (two contributions + Z). Throughputs are medians over the rounds (best also shown), and the
load average before and after is printed: other work on the machine skews single rounds.
The first --warmup rounds are run and shown but not in the medians: a fresh process's first
256 MB buffers touch memory the machine has not backed yet and gRPC's flow-control window is
still growing on a new channel (on our VMs the first pull ran at ~300 MB/s whatever the code,
and the raw baseline's first pull is also ~35% slower). The second push is often as slow for
the same reason; it is one of the measured rounds, so the medians include it.
Targets: >= 500 MB/s each way, peak <= 3x held.

--secure: after the plain run, a secure run (secure_aggregation) on the same aggregator, its rounds
interleaved with plain ones (so load hits both alike): the node's whole cost each way, masking
and pushing its X + U (ring64, rank + 1 columns), pulling the masked sum and unmasking it to Z
(cdimf.domain_node.secure_exchange), against the plain push and pull of the same round. MB/s are
of the float32 matrix in both modes, so the ratio is the cost of the masks.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cdimf.common.config import RunParams, TLSConfig  # noqa: E402
from cdimf.common.core.membership import ROLE_SHARED, Membership  # noqa: E402
from cdimf.common.rpc.aggregator_client import AggregatorClient  # noqa: E402
from cdimf.common.rpc.channels import bind_port, create_channel, create_server  # noqa: E402
from cdimf.domain_node.secure_exchange import masked_contribution, unmasked_consensus  # noqa: E402

BENCH_SECRET = b"exchange-throughput-benchmark-secret"

MB = 1e6
RAW_CHUNK = 1 << 20
SINK = "/bench.Raw/Sink"
SOURCE = "/bench.Raw/Source"


def _free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----- the baseline server: raw bytes, no decoding -----


async def _serve_baseline(port: int) -> None:
    """Sink: count incoming bytes. Source: stream `n` bytes (request = decimal n) of raw chunks."""

    async def sink(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        """Count the bytes of a pushed stream; reply with the count."""
        total = 0
        async for message in request_iterator:
            total += len(message)
        return str(total).encode()

    async def source(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Stream the requested number of bytes in raw chunks."""
        remaining = int(request.decode())
        payload = os.urandom(RAW_CHUNK)
        while remaining > 0:
            size = min(RAW_CHUNK, remaining)
            # a fresh bytes object per message, as a real server slicing a matrix would make
            yield payload[:size] if size < RAW_CHUNK else bytes(payload)
            remaining -= size

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Sink": grpc.stream_unary_rpc_method_handler(sink),
            "Source": grpc.unary_stream_rpc_method_handler(source),
        },
    )
    plaintext = TLSConfig(insecure=True)
    server = create_server(plaintext)
    server.add_generic_rpc_handlers((handler,))
    bind_port(server, f"127.0.0.1:{port}", plaintext, "baseline")
    await server.start()
    print("LISTENING", flush=True)
    await server.wait_for_termination()


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a server process and wait for its LISTENING line."""
    process = subprocess.Popen(args, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("LISTENING"):
        process.kill()
        raise RuntimeError(f"{args} did not start: {line!r}")
    return process


def _peak_rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process from /proc (Linux)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


class _Baseline:
    """Raw-bytes push and pull against the baseline server over one channel."""

    def __init__(self, address: str, nbytes: int) -> None:
        self.channel = create_channel(address, None)
        self.sink = self.channel.stream_unary(SINK)
        self.source = self.channel.unary_stream(SOURCE)
        self.nbytes = nbytes
        self.payload = np.random.default_rng(0).bytes(RAW_CHUNK)

    def _chunks(self) -> Iterator[bytes]:
        """nbytes of raw chunks, a fresh bytes object per message."""
        sent = 0
        while sent < self.nbytes:
            size = min(RAW_CHUNK, self.nbytes - sent)
            yield self.payload[:size] if size < RAW_CHUNK else bytes(self.payload)
            sent += size

    async def push(self) -> float:
        """Seconds to push nbytes of raw chunks."""
        start = time.perf_counter()
        received = int((await self.sink(self._chunks(), timeout=600)).decode())
        assert received == self.nbytes
        return time.perf_counter() - start

    async def pull(self) -> float:
        """Seconds to pull nbytes of raw chunks."""
        start = time.perf_counter()
        got = 0
        async for message in self.source(str(self.nbytes).encode(), timeout=600):
            got += len(message)
        assert got == self.nbytes
        return time.perf_counter() - start


async def _timed(work: Awaitable[object]) -> float:
    """Wall seconds an awaitable takes."""
    start = time.perf_counter()
    await work
    return time.perf_counter() - start


async def _measure(address: str, baseline_address: str, users: int, rank: int, repeat: int) -> dict[str, list[float]]:
    """Register two domains sharing every user; per round, interleaved with the raw baseline
    (so machine load hits both alike): raw push, push, push that closes the round, raw pull, pull."""
    rng = np.random.default_rng(1)
    digests = rng.integers(0, 256, (users, 32), dtype=np.uint8)  # stand-ins for pseudonyms
    sport = AggregatorClient(address, "sport", rpc_timeout_s=120)
    cloth = AggregatorClient(address, "cloth", rpc_timeout_s=120)
    await sport.register(digests, np.ones(users, bool))
    await cloth.register(digests, np.ones(users, bool))
    run = await AggregatorClient(address, rpc_timeout_s=300).start_run(RunParams(rounds=repeat, rank=rank))
    values = rng.standard_normal((users, rank)).astype(np.float32)
    raw = _Baseline(baseline_address, users * rank * 4)
    times: dict[str, list[float]] = {"raw_push": [], "push": [], "push_closing": [], "close_after_ack": [], "raw_pull": [], "pull": []}
    operator = AggregatorClient(address, rpc_timeout_s=300)
    for round_index in range(1, repeat + 1):
        times["raw_push"].append(await raw.push())
        times["push"].append(await _timed(sport.push_contribution(run.run_id, round_index, values)))
        times["push_closing"].append(await _timed(cloth.push_contribution(run.run_id, round_index, values)))
        times["close_after_ack"].append(await _timed(operator.get_status()))
        times["raw_pull"].append(await raw.pull())
        start = time.perf_counter()
        z = await sport.pull_consensus(run.run_id, round_index, 60.0, users, 0)
        times["pull"].append(time.perf_counter() - start)
        assert z is not None and z.shared.shape == (users, rank)
    for client in (sport, cloth, operator):
        await client.close()
    await raw.channel.close()
    return times


async def _measure_secure(address: str, users: int, rank: int, repeat: int) -> dict[str, list[float]]:
    """After _measure's run: per round a plain run's push and pull, then a secure run's mask + push and pull + unmask (same users)."""
    rng = np.random.default_rng(1)
    digests = rng.integers(0, 256, (users, 32), dtype=np.uint8)  # the same stand-in pseudonyms _measure registered
    sport, cloth = AggregatorClient(address, "sport", rpc_timeout_s=120), AggregatorClient(address, "cloth", rpc_timeout_s=120)
    operator = AggregatorClient(address, rpc_timeout_s=300)
    values = rng.standard_normal((users, rank)).astype(np.float32)
    # every row held by both domains: bit 0 cloth, bit 1 sport (domain-name order)
    view = Membership.from_roles(("cloth", "sport"), np.full(users, ROLE_SHARED, np.uint8), np.full(users, 3, np.uint64))
    times: dict[str, list[float]] = {"plain_push": [], "plain_pull": [], "secure_push": [], "secure_pull": []}
    for round_index in range(1, repeat + 1):
        for secure in (False, True):
            params = RunParams(run_id=f"{'secure' if secure else 'plain'}-{round_index}", rounds=1, rank=rank, secure_aggregation=secure)
            run_id = (await operator.start_run(params)).run_id
            start = time.perf_counter()
            if secure:
                wire = masked_contribution(values, digests, BENCH_SECRET, run_id, "sport", 1)
                await sport.push_contribution(run_id, 1, wire, "ring64")
            else:
                await sport.push_contribution(run_id, 1, values)
            times["secure_push" if secure else "plain_push"].append(time.perf_counter() - start)
            other = masked_contribution(values, digests, BENCH_SECRET, run_id, "cloth", 1) if secure else values
            await cloth.push_contribution(run_id, 1, other, "ring64" if secure else "float32")
            await operator.get_status()  # waits for the close and its save
            start = time.perf_counter()
            z = await sport.pull_consensus(run_id, 1, 60.0, users, 0, dtype="ring64" if secure else "float32")
            assert z is not None
            if secure:
                z = unmasked_consensus(z, view, digests, BENCH_SECRET, run_id, params)
            times["secure_pull" if secure else "plain_pull"].append(time.perf_counter() - start)
            assert z.shared.shape == (users, rank) and z.shared.dtype == np.float32
    for client in (sport, cloth, operator):
        await client.close()
    return times


def main() -> None:
    """Run the benchmark and print one results table (and --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="measured rounds (medians)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first, shown, not in the medians")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--secure", action="store_true", help="also measure secure aggregation (masked push, unmasked pull) against plain")
    parser.add_argument("--serve-baseline", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline is not None:
        asyncio.run(_serve_baseline(args.serve_baseline))
        return

    nbytes = args.users * args.rank * 4
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cdimf-bench-") as state_dir:
        aggregator_port, baseline_port = _free_port(), _free_port()
        aggregator = _spawn(
            [sys.executable, "-m", "cdimf.aggregator", "--log-level", "WARNING"],
            {"CDIMF_LISTEN": f"127.0.0.1:{aggregator_port}", "CDIMF_STATE_DIR": state_dir, "CDIMF_TLS__INSECURE": "true"},
        )
        baseline = _spawn([sys.executable, __file__, "--serve-baseline", str(baseline_port)])
        try:
            idle_rss, _ = _peak_rss_bytes(aggregator.pid)
            times = asyncio.run(
                _measure(f"127.0.0.1:{aggregator_port}", f"127.0.0.1:{baseline_port}", args.users, args.rank, args.warmup + args.repeat)
            )
            _, peak_rss = _peak_rss_bytes(aggregator.pid)
            secure_times = asyncio.run(_measure_secure(f"127.0.0.1:{aggregator_port}", args.users, args.rank, args.repeat)) if args.secure else {}
        finally:
            for process in (aggregator, baseline):
                process.terminate()
                process.wait(10)
    load_after = os.getloadavg()

    warmup_times = {name: values[: args.warmup] for name, values in times.items()}
    times = {name: values[args.warmup :] for name, values in times.items()}
    # medians over rounds: other work on the machine slows single rounds, not the typical one
    median = {name: float(np.median(values)) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    # per-round ratios (each against the baseline measured right before it), median over rounds
    push_ratio = float(np.median(np.array(times["raw_push"]) / np.array(times["push"])))
    pull_ratio = float(np.median(np.array(times["raw_pull"]) / np.array(times["pull"])))
    closing_ratio = float(np.median(np.array(times["push"]) / np.array(times["push_closing"])))
    # what a node waits from the start of the closing push until Z can be pulled
    round_end = np.array(times["push_closing"]) + np.array(times["close_after_ack"])
    held = 3 * nbytes  # two domains' contributions + Z
    results = {
        "users": args.users,
        "rank": args.rank,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "warmup_push_mb_s": [nbytes / MB / t for t in warmup_times["push"]],
        "warmup_pull_mb_s": [nbytes / MB / t for t in warmup_times["pull"]],
        "matrix_mb": nbytes / MB,
        "push_mb_s": nbytes / MB / median["push"],
        "push_closing_round_mb_s": nbytes / MB / median["push_closing"],
        "closing_vs_ordinary_push": closing_ratio,
        "close_after_ack_s": median["close_after_ack"],
        "closing_push_plus_close_mb_s": nbytes / MB / float(np.median(round_end)),
        "pull_mb_s": nbytes / MB / median["pull"],
        "baseline_raw_push_mb_s": nbytes / MB / median["raw_push"],
        "baseline_raw_pull_mb_s": nbytes / MB / median["raw_pull"],
        "push_best_mb_s": nbytes / MB / best["push"],
        "pull_best_mb_s": nbytes / MB / best["pull"],
        "push_rounds_mb_s": [nbytes / MB / t for t in times["push"]],
        "pull_rounds_mb_s": [nbytes / MB / t for t in times["pull"]],
        "push_vs_baseline": push_ratio,
        "pull_vs_baseline": pull_ratio,
        "aggregator_idle_rss_mb": idle_rss / MB,
        "aggregator_peak_rss_mb": peak_rss / MB,
        "held_matrices_mb": held / MB,
        "peak_over_held": peak_rss / held,
        "peak_above_idle_over_held": (peak_rss - idle_rss) / held,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    if secure_times:
        secure_median = {name: float(np.median(values)) for name, values in secure_times.items()}
        results.update({
            "secure_push_mb_s": nbytes / MB / secure_median["secure_push"],
            "secure_pull_mb_s": nbytes / MB / secure_median["secure_pull"],
            "plain_push_mb_s_same_rounds": nbytes / MB / secure_median["plain_push"],
            "plain_pull_mb_s_same_rounds": nbytes / MB / secure_median["plain_pull"],
            # per-round ratios of back-to-back plain and secure exchanges, median over rounds
            "secure_push_vs_plain": float(np.median(np.array(secure_times["plain_push"]) / np.array(secure_times["secure_push"]))),
            "secure_pull_vs_plain": float(np.median(np.array(secure_times["plain_pull"]) / np.array(secure_times["secure_pull"]))),
        })
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"exchange of {args.users} x {args.rank} float32 ({nbytes / MB:.0f} MB) over loopback, median of {args.repeat} rounds "
          f"after {args.warmup} warm-up (ratios: median over rounds of baseline time / our time, measured back to back)")
    print(f"  push X+U            {results['push_mb_s']:8.0f} MB/s   ({results['push_vs_baseline']:.2f}x the raw baseline, "
          f"best {results['push_best_mb_s']:.0f}, target >= 500 MB/s)")
    print(f"  push closing round  {results['push_closing_round_mb_s']:8.0f} MB/s   ({results['closing_vs_ordinary_push']:.2f}x the ordinary push, "
          "target >= 0.5x; the close runs after its ack)")
    print(f"  close after the ack {results['close_after_ack_s']:8.2f} s      (consensus + fsynced Z file and commit record; pulls wait for it; "
          f"push + close {results['closing_push_plus_close_mb_s']:.0f} MB/s)")
    print(f"  pull Z              {results['pull_mb_s']:8.0f} MB/s   ({results['pull_vs_baseline']:.2f}x the raw baseline, "
          f"best {results['pull_best_mb_s']:.0f}, target >= 500 MB/s)")
    print(f"  baseline raw bytes  {results['baseline_raw_push_mb_s']:8.0f} MB/s push, {results['baseline_raw_pull_mb_s']:.0f} MB/s pull (gRPC, no decoding)")
    print(f"  aggregator memory   peak {results['aggregator_peak_rss_mb']:.0f} MB (idle {results['aggregator_idle_rss_mb']:.0f} MB) "
          f"for {results['held_matrices_mb']:.0f} MB held: {results['peak_over_held']:.2f}x (target <= 3x), "
          f"{results['peak_above_idle_over_held']:.2f}x above the idle interpreter")
    if args.warmup:
        shown = ", ".join(f"push {a:.0f} pull {b:.0f}" for a, b in zip(results["warmup_push_mb_s"], results["warmup_pull_mb_s"]))
        print(f"  warm-up rounds      {shown} MB/s (not in the medians)")
        print(f"  measured rounds     push {' '.join(f'{v:.0f}' for v in results['push_rounds_mb_s'])}, "
              f"pull {' '.join(f'{v:.0f}' for v in results['pull_rounds_mb_s'])} MB/s")
    if secure_times:
        print(f"  secure push         {results['secure_push_mb_s']:8.0f} MB/s   (mask + push; {results['secure_push_vs_plain']:.2f}x the plain push "
              f"of the same rounds, {results['plain_push_mb_s_same_rounds']:.0f} MB/s)")
        print(f"  secure pull         {results['secure_pull_mb_s']:8.0f} MB/s   (pull + unmask + prox; {results['secure_pull_vs_plain']:.2f}x the plain "
              f"pull of the same rounds, {results['plain_pull_mb_s_same_rounds']:.0f} MB/s)")
    print("  load average        before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f} (1/5/15 min; 2 cores)".format(*load_before, *load_after))


if __name__ == "__main__":
    main()
