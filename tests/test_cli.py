"""Every runtime subcommand of `cdimf` run as a real process against real servers on 127.0.0.1."""

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdimf.common.config import TLSConfig
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.common.rpc.channels import create_channel
from cdimf.common.rpc.client_proof import ProvingCredentials
from cdimf.common.security.pki import load_certificate, load_private_key
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.simulate import write_throwaway_certificates
from tests.federation_harness import REPO_ROOT, Processes, closed_port, user_key, write_domains

pytestmark = pytest.mark.timeout(120)



def cdimf(*arguments: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `cdimf ARGUMENTS` to its end."""
    return subprocess.run([sys.executable, "-m", "cdimf", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)


def cdimf_all(*commands: list[str], timeout_s: float = 60.0) -> list[subprocess.CompletedProcess[str]]:
    """Run several independent `cdimf` commands at once (each pays the interpreter start-up)."""
    started = [(command, subprocess.Popen([sys.executable, "-m", "cdimf", *command], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)) for command in commands]
    finished = []
    for command, process in started:
        out, err = process.communicate(timeout=timeout_s)
        finished.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return finished


def _federation(tmp_path: Path, processes: Processes) -> tuple[str, str]:
    """`cdimf serve-aggregator` and two `cdimf serve-node` processes; (aggregator, sport node) addresses."""
    files = write_domains(tmp_path / "data")
    _, aggregator = processes.aggregator()
    _, sport = processes.nodes(files, aggregator)["sport"]
    return aggregator, sport


def test_train_follow_status_recommend_and_health(tmp_path: Path, processes: Processes) -> None:
    """serve-aggregator + serve-node processes driven by train/status/recommend/health/stop processes."""
    aggregator, sport = _federation(tmp_path, processes)

    for checked in cdimf_all(*(["health", "--target", target, "--insecure"] for target in (aggregator, sport))):
        assert checked.returncode == 0 and "SERVING" in checked.stdout, checked

    trained = cdimf("train", "--aggregator", aggregator, "--insecure", "--rounds", "2", "--rank", "6", "--min-domains", "2",
                    "--run-id", "cli-run", "--follow", "--json")
    assert trained.returncode == 0, trained.stderr
    events = [json.loads(line) for line in trained.stdout.splitlines()]
    assert {(e["domain"], e["round"]) for e in events if e["kind"] == "metrics"} == {(d, r) for d in ("sport", "cloth") for r in (1, 2)}
    assert [e["kind"] for e in events].count("run_finished") == 1 and all(e["run_id"] == "cli-run" for e in events)
    assert events[-1]["kind"] == "run_finished", "the run's end comes after the final round's metrics"
    assert all(isinstance(e["round"], int) for e in events) and trained.stderr == ""

    status, table, warm, cold, unknown, finished = cdimf_all(
        ["status", "--aggregator", aggregator, "--insecure", "--json"],
        ["status", "--aggregator", aggregator, "--insecure"],
        ["recommend", "--node", sport, "--user", user_key(3), "-k", "3", "--insecure", "--json", "--include-seen"],
        ["recommend", "--node", sport, "--user", user_key(91), "--insecure", "--json", "--include-seen"],
        ["recommend", "--node", sport, "--user", "nobody", "--insecure"],
        ["stop", "--aggregator", aggregator, "--insecure", "--json"],
    )
    assert status.returncode == 0, status.stderr
    reply = json.loads(status.stdout)
    assert reply["ok"] is True and reply["run"]["state"] == "finished" and {d["domain"] for d in reply["domains"]} == {"sport", "cloth"}
    assert reply["run"]["round"] == 2 and reply["run"]["rounds"] == 2 and isinstance(reply["shared_users"], int) and reply["shared_users"] > 0
    assert all(set(d["latest_metrics"]) == {"valid HR@10 (59 neg)", "valid NDCG@10 (59 neg)"} for d in reply["domains"]), reply
    assert "cli-run: finished, round 2/2" in table.stdout and "valid NDCG@10 (59 neg)" in table.stdout
    assert warm.returncode == 0, warm.stderr
    warm_reply = json.loads(warm.stdout)
    assert len(warm_reply["items"]) == 3 and warm_reply["cold_start"] is False
    cold_reply = json.loads(cold.stdout)
    assert cold_reply["cold_start"] is True and len(cold_reply["items"]) == 10
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    assert finished.returncode == 1 and json.loads(finished.stdout)["ok"] is False and "already finished" in json.loads(finished.stdout)["error"]

    # a second run replaces the first, which `runs` and `log` still show with its per-round history
    second = cdimf("train", "--aggregator", aggregator, "--insecure", "--rounds", "1", "--rank", "6", "--min-domains", "2",
                   "--run-id", "cli-run-2", "--follow")
    assert second.returncode == 0, second.stderr
    assert "round    1  sport        valid HR@10 (59 neg) " in second.stderr and "%" in second.stderr
    assert "run cli-run-2: 1/1 rounds" in second.stderr, "one progress line per round on a non-terminal"
    runs, log, log_text, missing, test_eval, full_eval, full_test, exported, warm_now, cold_now = cdimf_all(
        ["runs", "--aggregator", aggregator, "--insecure", "--json"],
        ["log", "cli-run", "--aggregator", aggregator, "--insecure", "--json"],
        ["log", "cli-run", "--aggregator", aggregator, "--insecure"],
        ["log", "no-such-run", "--aggregator", aggregator, "--insecure", "--json"],
        ["evaluate", "--node", sport, "--insecure", "--json"],
        ["evaluate", "--node", sport, "--split", "valid", "--protocol", "full", "-k", "5", "--insecure", "--json"],
        ["evaluate", "--node", sport, "--split", "test", "--protocol", "full", "-k", "5", "--insecure", "--json"],
        ["export", "--node-config", str(_node_config(tmp_path)), "--out", str(tmp_path / "export"), "--json"],
        ["recommend", "--node", sport, "--user", user_key(3), "-k", "3", "--insecure", "--json", "--include-seen"],
        ["recommend", "--node", sport, "--user", user_key(91), "--insecure", "--json", "--include-seen"],
    )
    listed = json.loads(runs.stdout)["runs"]
    assert [(r["run_id"], r["state"], r["round"], r["rounds"]) for r in listed] == [("cli-run", "finished", 2, 2), ("cli-run-2", "finished", 1, 1)]
    history = json.loads(log.stdout)
    assert history["run_id"] == "cli-run"
    # the final round's metrics may be logged before or after run_finished; everything else is fixed
    kinds = [e["kind"] for e in history["events"]]
    assert kinds[0] == "run_started" and sorted(kinds[1:]) == ["metrics"] * 4 + ["round_closed"] * 2 + ["run_finished"]
    assert kinds.index("run_finished") > max(i for i, kind in enumerate(kinds) if kind == "round_closed")
    assert kinds[kinds.index("run_finished") + 1:] in ([], ["metrics"], ["metrics", "metrics"])
    assert {(e["domain"], e["round"]) for e in history["events"] if e["kind"] == "metrics"} == {(d, r) for d in ("sport", "cloth") for r in (1, 2)}
    assert [e["round"] for e in history["events"] if e["kind"] == "round_closed"] == [1, 2]
    assert "round_closed" in log_text.stdout and "valid NDCG@10 (59 neg)" in log_text.stdout
    assert missing.returncode == 1 and json.loads(missing.stdout) == {"ok": False, "error": missing_error(missing.stdout)}
    assert "unknown run 'no-such-run'" in json.loads(missing.stdout)["error"]
    sampled = json.loads(test_eval.stdout)
    assert (sampled["split"], sampled["protocol"], sampled["round"], sampled["users"]) == ("test", "sampled", 1, 4)
    assert set(sampled["metrics"]) == {f"test HR@10 ({sampled['negatives']} neg)", f"test NDCG@10 ({sampled['negatives']} neg)"}
    full = json.loads(full_eval.stdout)
    assert full["protocol"] == "full" and "valid Recall@5 (full catalog)" in full["metrics"], full
    # a hit rate is hits over the 4 test rows
    assert sampled["metrics"][f"test HR@10 ({sampled['negatives']} neg)"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    _check_export(tmp_path / "export", json.loads(warm_now.stdout), json.loads(cold_now.stdout))
    expected = _full_catalog_by_brute_force(tmp_path / "export", tmp_path / "data", 5)
    reported = json.loads(full_test.stdout)["metrics"]
    for name, value in expected.items():
        assert reported[f"test {name} (full catalog)"] == pytest.approx(100 * value, abs=1e-3), (name, reported)


def missing_error(stdout: str) -> str:
    """The error text of a JSON failure object."""
    return str(json.loads(stdout)["error"])


def _node_config(tmp_path: Path) -> Path:
    """The sport node's settings (as the harness starts it) as a TOML file for `cdimf export`."""
    files = write_domains(tmp_path / "data")
    path = tmp_path / "node-sport.toml"
    path.write_text(f"""domain = "sport"
train_path = "{files['sport']['train']}"
test_path = "{files['sport']['test']}"
data_format = "csv"
state_dir = "{tmp_path / 'sport'}"
secret = "unused by export"
[tls]
insecure = true
""")
    return path


def _check_export(folder: Path, warm: dict, cold: dict) -> None:
    """Brute-force top-k over the exported factors equals the node's own Recommend (seen items included), ids included."""
    import numpy as np

    user_ids = np.load(folder / "sport.user_ids.npy").tolist()
    users, items = np.load(folder / "sport.user_factors.npy"), np.load(folder / "sport.item_factors.npy")
    item_ids = np.load(folder / "sport.item_ids.npy")
    for reply in (warm, cold):
        scores = items @ users[user_ids.index(reply["user"])]
        best = np.argsort(-scores, kind="stable")[: len(reply["items"])]
        assert item_ids[best].tolist() == [entry["item"] for entry in reply["items"]]
        np.testing.assert_allclose(scores[best], [entry["score"] for entry in reply["items"]], rtol=1e-4)


def _full_catalog_by_brute_force(export: Path, data: Path, k: int) -> dict[str, float]:
    """Full-catalog HR, NDCG, Recall and Coverage@k of sport's test file, from the exported factors:
    per test user, the k best items of the whole catalog less its training items."""
    import numpy as np

    user_ids = np.load(export / "sport.user_ids.npy").tolist()
    item_ids = np.load(export / "sport.item_ids.npy").tolist()
    users, items = np.load(export / "sport.user_factors.npy").astype(np.float64), np.load(export / "sport.item_factors.npy").astype(np.float64)

    def read(name: str) -> dict[int, set[int]]:
        rows: dict[int, set[int]] = {}
        for line in (data / name).read_text().splitlines()[1:]:
            user, item = line.split(",")
            rows.setdefault(user_ids.index(user), set()).add(item_ids.index(item))
        return rows

    trained, tested = read("sport_train.csv"), read("sport_test.csv")
    hr = ndcg = recall = 0.0
    shown: set[int] = set()
    for user, relevant in tested.items():
        scores = items @ users[user]
        scores[list(trained.get(user, ()))] = -np.inf
        top = [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
        shown |= set(top)
        hits = [position for position, item in enumerate(top) if item in relevant]
        hr += bool(hits)
        ndcg += sum(1 / np.log2(p + 2) for p in hits) / sum(1 / np.log2(p + 2) for p in range(min(len(relevant), k)))
        recall += len(hits) / len(relevant)
    n = len(tested)
    return {f"HR@{k}": hr / n, f"NDCG@{k}": ndcg / n, f"Recall@{k}": recall / n, f"Coverage@{k}": len(shown) / len(item_ids)}


async def _wait_until_running(aggregator: str) -> None:
    """Until the aggregator's current run is running (polled in-process: `cdimf status` has its own test)."""
    give_up = time.monotonic() + 30
    async with AggregatorClient(aggregator) as control:
        while (await control.get_status()).run.state != pb.RUN_STATE_RUNNING:
            assert time.monotonic() < give_up, "the long run did not start"
            await asyncio.sleep(0.05)


def _kernel_mapped(pid: int) -> bool:
    """Whether the process has the compiled iALS kernel (a built ials_kernel_*.so) mapped: its native solver runs."""
    return "/ials_kernel_" in Path(f"/proc/{pid}/maps").read_text()


def test_node_status_reports_the_solver_backend_that_runs(tmp_path: Path, processes: Processes) -> None:
    """`cdimf node-status`: each node's solver_backend is the one its process really solves with (the kernel
    library mapped into it or not); a node told to use numpy reports numpy."""
    processes.local = {"cloth": {"backend": "numpy"}}
    files = write_domains(tmp_path / "data")
    _, aggregator = processes.aggregator()
    nodes = processes.nodes(files, aggregator)
    trained = cdimf("train", "--aggregator", aggregator, "--insecure", "--rounds", "1", "--rank", "6", "--min-domains", "2", "--follow")
    assert trained.returncode == 0, trained.stderr
    replies = dict(zip(nodes, cdimf_all(*(["node-status", "--node", address, "--insecure", "--json"] for _, address in nodes.values()))))
    table = cdimf("node-status", "--node", nodes["sport"][1], "--insecure")
    for domain, (process, _) in nodes.items():
        reply = json.loads(replies[domain].stdout)
        expected = "native" if _kernel_mapped(process.pid) else "numpy"
        assert (reply["ok"], reply["domain"], reply["solver_backend"]) == (True, domain, expected), reply
        assert (reply["phase"], reply["round"]) == ("finished", 1), reply
    assert json.loads(replies["cloth"].stdout)["solver_backend"] == "numpy" and not _kernel_mapped(nodes["cloth"][0].pid)
    if shutil.which("gcc") or shutil.which("cc"):  # a C compiler here: "auto" builds and runs the kernel
        assert json.loads(replies["sport"].stdout)["solver_backend"] == "native"
    sport = json.loads(replies["sport"].stdout)
    assert table.returncode == 0 and f"domain sport: finished, run {sport['run_id']} round 1" in table.stdout, table
    assert f"solver backend {sport['solver_backend']}" in table.stdout and "valid HR@10" in table.stdout, table.stdout


def test_stop_ends_a_followed_run(tmp_path: Path, processes: Processes) -> None:
    """A long run followed by one `cdimf train --follow` and stopped by `cdimf stop`: the follower exits 1."""
    aggregator, _ = _federation(tmp_path, processes)
    follower = subprocess.Popen([sys.executable, "-m", "cdimf", "train", "--aggregator", aggregator, "--insecure", "--rounds", "100000",
                                 "--rank", "6", "--follow"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(_wait_until_running(aggregator))
        stopped = cdimf("stop", "--aggregator", aggregator, "--insecure", "--reason", "test")
        assert stopped.returncode == 0, stopped.stderr
        _, follower_err = follower.communicate(timeout=30)
        assert follower.returncode == 1 and "did not finish" in follower_err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()


def test_health_of_nothing_bad_options_and_certs(tmp_path: Path) -> None:
    """health fails on a closed port; a bad field names its option (run and validation); a flag's prefix is no flag; certs is wired."""
    with closed_port() as port:  # held bound, not listening, until every command ended
        closed, bad, bad_validation, missing, prefix, tune_prefix, certs = cdimf_all(
            ["health", "--target", f"127.0.0.1:{port}", "--insecure", "--timeout-s", "1"],
            ["train", "--aggregator", "127.0.0.1:1", "--insecure", "--rounds", "0"],
            ["simulate", "--insecure", "--validation-every", "-1"],
            ["serve-node", "--domain", "sport", "--insecure"],
            ["serve-node", "--domain", "sport", "--insecure", "--secret", "not-a-file"],
            ["tune", "warm-sport-cloth", "--trial", "1"],
            ["certs", "--out", str(tmp_path / "pki"), "--domains", "sport,cloth", "--federation-secret"],
        )
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stdout
    assert bad.returncode == 2 and "--rounds" in bad.stderr
    assert bad_validation.returncode == 2 and "--validation-every" in bad_validation.stderr
    assert missing.returncode == 2 and "train_path" in missing.stderr
    # argparse would otherwise take `--secret` for `--secret-file` and `--trial` for `--trials`
    assert prefix.returncode == 2 and "unrecognized arguments: --secret not-a-file" in prefix.stderr, prefix.stderr
    assert tune_prefix.returncode == 2 and "unrecognized arguments: --trial 1" in tune_prefix.stderr, tune_prefix.stderr
    assert certs.returncode == 0, certs.stderr
    assert {"ca.pem", "aggregator.pem", "sport.key", "cloth.pem", "operator.pem", "federation.secret"} <= {p.name for p in (tmp_path / "pki").iterdir()}



def _tls_flags(settings: TLSConfig) -> list[str]:
    """The --ca-file/--cert-file/--key-file flags of one party's TLS settings."""
    return ["--ca-file", str(settings.ca_file), "--cert-file", str(settings.cert_file), "--key-file", str(settings.key_file)]


async def _health_status(target: str, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    """The status a health Check over `credentials` gets (OK when answered)."""
    async with create_channel(target, credentials) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_health_of_a_mutual_tls_aggregator_process(tmp_path: Path, processes: Processes) -> None:
    """A real aggregator over mutual TLS answers the standard health check to every federation
    certificate (its own, the operator's, a domain's); no certificate or another CA's is UNAUTHENTICATED."""
    certificates = write_throwaway_certificates(tmp_path / "pki", ["sport"])
    strangers = write_throwaway_certificates(tmp_path / "other-pki", ["sport"])
    _, address = processes.spawn("aggregator", ["serve-aggregator", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "agg"),
                                                *_tls_flags(certificates["aggregator"])])
    own, operator, domain, by_name, unknown, stranger = cdimf_all(
        ["health", "--target", address, *_tls_flags(certificates["aggregator"])],
        ["health", "--target", address, *_tls_flags(certificates["operator"])],
        ["health", "--target", address, *_tls_flags(certificates["sport"])],
        ["health", "--target", address, "--service", "cdimf.v1.Aggregator", *_tls_flags(certificates["operator"])],
        ["health", "--target", address, "--service", "cdimf.v1.DomainNode", *_tls_flags(certificates["operator"])],
        ["health", "--target", address, "--timeout-s", "3", *_tls_flags(strangers["sport"])],
    )
    for checked in (own, operator, domain, by_name):
        assert checked.returncode == 0 and checked.stdout.strip() == "SERVING", checked
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout, unknown
    assert stranger.returncode == 1 and "UNAVAILABLE" in stranger.stdout, stranger
    # the server itself refuses: trusting its CA does not help without a certificate it issued
    ca_pem = Path(str(certificates["sport"].ca_file)).read_bytes()
    without = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    # a stranger's certificate proved with its key, over TLS that trusts the federation's CA
    foreign = ProvingCredentials(without, ca_pem, load_certificate(str(strangers["sport"].cert_file)),
                                 load_private_key(str(strangers["sport"].key_file)))
    assert asyncio.run(_health_status(address, without)) == grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(_health_status(address, foreign)) == grpc.StatusCode.UNAUTHENTICATED
