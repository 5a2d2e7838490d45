"""Cold-start counts per domain pair on real processes: equal to those of the id sets, shown by the aggregator, each node and the CLI.

The defaults (serve, no cap) let the shipped cold-start pair register and train as before.
"""

import asyncio
import json
from pathlib import Path

import pytest

from cdimf.common.config import RunParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.protos.v1 import federation_pb2 as pb
from tests.cold_start_helpers import CLOTH_COLD, cold_files, domains_status, expected_served, launch_node, user_ids
from tests.federation_harness import REPO_ROOT, SECRET, Processes, wait_for_checkpoints, wait_for_domains
from tests.test_cli import cdimf_all

pytestmark = pytest.mark.timeout(120)
COLD_PAIR = REPO_ROOT / "data" / "amazon-cdr" / "cold-start_sport_cloth"


def test_counts_per_pair_equal_the_id_sets_and_nodes_read_them(tmp_path: Path, processes: Processes) -> None:
    """Defaults serve every receiver; GetStatus, both nodes' node-status and `cdimf status` show the per-pair counts
    computed here from the files' id sets, after a one-round run on them."""
    files = cold_files(tmp_path)
    _, aggregator = processes.aggregator()
    launched = {domain: launch_node(processes, files, domain, aggregator) for domain in ("sport", "cloth")}
    nodes = {domain: processes.listening(f"node-{domain}", process) for domain, process in launched.items()}
    held = {domain: user_ids(files[domain]["train"], csv=True) for domain in nodes}
    registered = {domain: held[domain] | user_ids(files[domain]["test"], csv=True) for domain in nodes}
    expected = expected_served(held, registered)
    assert expected == {"sport": {"cloth": len(CLOTH_COLD)}, "cloth": {"sport": 2}}  # the data's design: users 90, 91 are cold in sport

    async def main() -> dict[str, pb.DomainStatus]:
        async with AggregatorClient(aggregator) as control:
            await wait_for_domains(control, 2)
            await control.start_run(RunParams(run_id="cold-counts", rounds=1, rank=6, min_domains=2))
            await wait_for_checkpoints(tmp_path, 1, timeout_s=60)
            return await domains_status(control)

    status = asyncio.run(main())
    for domain in nodes:
        assert dict(status[domain].served_to) == expected[domain]
        assert dict(status[domain].received_from) == {other: expected[other][domain] for other in expected if other != domain}
        assert not status[domain].HasField("max_served_rows") and status[domain].cold_start.serve
    *shown, table = cdimf_all(*(["node-status", "--node", nodes[domain], "--insecure", "--json"] for domain in nodes),
                              ["status", "--aggregator", aggregator, "--insecure"])
    for domain, done in zip(nodes, shown, strict=True):
        assert done.returncode == 0, done
        reply = json.loads(done.stdout)
        assert reply["served_to"] == expected[domain] and reply["registration_refused"] is None
        assert reply["received_from"] == {other: expected[other][domain] for other in expected if other != domain}
    assert table.returncode == 0, table
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.startswith("  ") and "no cap" in line}
    # columns: holder, policy ("serve, no cap"), cap, then one count per domain (cloth, sport: sorted names)
    assert rows["cloth"][-2:] == ["-", str(expected["cloth"]["sport"])] and rows["sport"][-2:] == [str(expected["sport"]["cloth"]), "-"]


def test_the_shipped_cold_start_pair_registers_and_trains_with_defaults(tmp_path: Path, processes: Processes) -> None:
    """The shipped cold-start Sport & Cloth pair, nodes with default config: both register, the counts per pair equal
    those of the files' id sets, and a one-round run finishes on every node."""
    folders = {"sport": COLD_PAIR / "sport_cloth", "cloth": COLD_PAIR / "cloth_sport"}
    _, aggregator = processes.aggregator()
    launched = {}
    for domain, folder in folders.items():
        arguments = ["serve-node", "--domain", domain, "--data-format", "paper", "--train-path", str(folder / "train.txt"),
                     "--valid-path", str(folder / "valid.txt"), "--test-path", str(folder / "test.txt"), "--listen", "127.0.0.1:0",
                     "--aggregator", aggregator, "--state-dir", str(tmp_path / domain), "--insecure", "--ials-threads", "1",
                     "--validation-every", "0"]
        launched[domain] = processes.launch(f"node-{domain}", arguments, {"CDIMF_SECRET": SECRET})
    for domain, process in launched.items():
        processes.listening(f"node-{domain}", process)
    held = {domain: user_ids(folder / "train.txt", csv=False) for domain, folder in folders.items()}
    registered = {domain: held[domain] | user_ids(folder / "valid.txt", csv=False) | user_ids(folder / "test.txt", csv=False)
                  for domain, folder in folders.items()}
    expected = expected_served(held, registered)
    assert min(expected["sport"]["cloth"], expected["cloth"]["sport"]) > 500  # hundreds of cold users on both sides

    async def main() -> None:
        async with AggregatorClient(aggregator) as control:
            await wait_for_domains(control, 2, timeout_s=60)
            status = await domains_status(control)
            assert {domain: dict(status[domain].served_to) for domain in folders} == expected
            await control.start_run(RunParams(run_id="cold-pair", rounds=1, rank=4, min_domains=2))
            await wait_for_checkpoints(tmp_path, 1, timeout_s=90)
            assert (await control.get_status()).run.state == pb.RUN_STATE_FINISHED

    asyncio.run(main())
