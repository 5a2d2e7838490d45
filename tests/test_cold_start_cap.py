"""Cold start under the holder's control, on real processes: a cap refuses a probing registration, serve = false, restarts.

A domain holding the federation secret could register guessed user keys as receivers and read from
GetMembership which of them another domain holds; each such receiver row then receives the holder's
user factors. These tests run `cdimf serve-aggregator` and `cdimf serve-node` processes and a
probing client speaking the real protocol.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest

from cdimf.common.rpc.aggregator_client import AggregatorClient, AggregatorError, OverLimit
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.cold_start_helpers import CLOTH_USERS, cold_files, cold_node, domains_status
from tests.federation_harness import SECRET, Processes, user_key, wait_for_domains
from tests.test_cli import cdimf_all

pytestmark = pytest.mark.timeout(120)
Found = TypeVar("Found")


async def _node_status(address: str) -> pb.NodeStatus:
    """A node's GetStatus from its own server (plaintext)."""
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.DomainNodeStub(channel).GetStatus(pb.StatusRequest(), timeout=10)


async def _refused(address: str) -> pb.NodeStatus:
    """The node's status once it says its registration was refused (bounded)."""

    async def refused_phase() -> pb.NodeStatus | None:
        shown = await _node_status(address)
        return shown if shown.phase == "registration refused" else None

    return await _until(refused_phase)


def _files_of(folder: Path) -> dict[str, bytes]:
    """Every file under the aggregator's state folder, byte for byte."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


async def _snapshot(client: AggregatorClient, folder: Path) -> tuple[bytes, dict[str, bytes]]:
    """What the aggregator shows and keeps: its status message (deterministic bytes) and its state files."""
    return (await client.get_status()).SerializeToString(deterministic=True), _files_of(folder)


def _probe(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A prober's registration: guessed keys pseudonymized with the federation secret, none with interactions."""
    return pseudonymize(keys, SECRET.encode()), np.zeros(len(keys), dtype=bool)


async def _until(check: Callable[[], Awaitable[Found | None]], timeout_s: float = 30.0) -> Found:
    """Poll an async check until it returns a value (bounded): a node's phase is only visible through its status."""
    give_up = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found is not None:
            return found
        assert time.monotonic() < give_up, "condition not reached in time"
        await asyncio.sleep(0.1)


def test_probing_registration_over_a_cap_is_refused_learns_nothing_and_a_restart_keeps_the_cap(tmp_path: Path, processes: Processes) -> None:
    """The membership-probing attack against a holder with max_served = 3: refused with the holder and its cap (not the
    count), the prober's registration and roles and the aggregator's status and files unchanged; the holder may not
    lower its cap under what is taken; after a restart of the aggregator the cap still refuses the probe."""
    files = cold_files(tmp_path)
    _, aggregator = processes.aggregator()
    cloth_process, _ = cold_node(processes, files, "cloth", aggregator, "--cold-start-max-served", "3")
    state_folder = tmp_path / "aggregator"
    held_by_cloth = [user_key(u) for u in CLOTH_USERS]
    guesses = [user_key(u) for u in range(300)]
    assert len(set(guesses) & set(held_by_cloth)) == 65

    async def main() -> None:
        async with AggregatorClient(aggregator) as control, AggregatorClient(aggregator, domain="probe", retry_for_s=5) as probe:
            await wait_for_domains(control, 1)
            # within the cap: two held guesses and one nobody holds; the prober learns those two
            small = await probe.register(*_probe([user_key(40), user_key(41), user_key(500)]))
            assert (small.receiver_rows, dict(small.received_from)) == (2, {"cloth": 2})
            roles_before = (await probe.get_membership()).roles.copy()
            before = await _snapshot(control, state_folder)
            with pytest.raises(OverLimit) as refused:
                await probe.register(*_probe(guesses))
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "holder cloth serves at most 3 receiver rows (max_served = 3)" in refused.value.details
            assert "65" not in refused.value.details  # the count stays in the aggregator's log
            assert await _snapshot(control, state_folder) == before
            view = await probe.get_membership()
            np.testing.assert_array_equal(view.roles, roles_before)
            assert len(view.roles) == 3 and dict(view.received_from) == {"cloth": 2}
            assert dict((await domains_status(control))["cloth"].served_to) == {"probe": 2}

            # the holder registering last with a cap below what is taken is refused too (its own count it may know)
            cloth_process.kill()
            cloth_process.wait(10)
            _, lowered = cold_node(processes, files, "cloth", aggregator, "--cold-start-max-served", "1", name="node-cloth-lowered")
            shown = await _refused(lowered)
            assert "cloth's own policy (max_served = 1, a cap of 1 rows) is below the 2 receiver rows" in shown.registration_refused
            assert (await _snapshot(control, state_folder)) == before
        log = (tmp_path / "aggregator.log").read_text()
        assert "cloth would serve 65 > cap 3 (probe 65)" in log  # the operator sees the count the prober does not

    asyncio.run(main())
    processes.close()
    processes.started.clear()
    _, restarted = processes.aggregator(name="aggregator-restarted")

    async def after_restart() -> None:
        async with AggregatorClient(restarted) as control, AggregatorClient(restarted, domain="probe", retry_for_s=5) as probe:
            cloth_status = (await domains_status(control))["cloth"]
            assert cloth_status.cold_start.max_served == 3 and cloth_status.max_served_rows == 3
            with pytest.raises(OverLimit) as refused:
                await probe.register(*_probe(guesses))
            assert "holder cloth serves at most 3 receiver rows" in refused.value.details
            assert dict((await domains_status(control))["cloth"].served_to) == {"probe": 2}

    asyncio.run(after_restart())


def test_serve_false_refuses_every_receiver_of_that_holder(tmp_path: Path, processes: Processes) -> None:
    """cloth with serve = false: sport's node, two of whose rows only cloth holds, is refused (its node-status says why,
    naming cloth); one receiver row of cloth is refused; receivers nobody holds, and rows sport holds, are not."""
    files = cold_files(tmp_path)
    _, aggregator = processes.aggregator()
    cold_node(processes, files, "cloth", aggregator, "--no-cold-start-serve")
    _, sport = cold_node(processes, files, "sport", aggregator)

    async def main() -> None:
        async with AggregatorClient(aggregator) as control, AggregatorClient(aggregator, domain="probe", retry_for_s=5) as probe:
            shown = await _refused(sport)
            assert "holder cloth does not serve its users to other domains (serve = false)" in shown.registration_refused
            [text] = await asyncio.to_thread(cdimf_all, ["node-status", "--node", sport, "--insecure"])
            assert "registration refused: cold start: holder cloth does not serve" in text.stdout, text
            assert set(await domains_status(control)) == {"cloth"}
            with pytest.raises(AggregatorError) as refused:
                await probe.register(*_probe([user_key(99)]))
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "holder cloth does not serve" in refused.value.details
            # a receiver nobody holds takes nothing from cloth
            accepted = await probe.register(*_probe([user_key(700)]))
            assert accepted.receiver_rows == 0 and dict(accepted.received_from) == {"cloth": 0}
            cloth_status = (await domains_status(control))["cloth"]
            assert (cloth_status.max_served_rows, dict(cloth_status.served_to)) == (0, {"probe": 0})

    asyncio.run(main())
