"""Shared pieces of the cold-start cap tests: small domains with cold users on both sides, nodes with extra flags, counts from id sets."""

import subprocess
from pathlib import Path

from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.protos.v1 import federation_pb2 as pb
from tests.federation_harness import SECRET, Processes, item_key, user_key, write_domains

# cloth trains on users 35..99 (tests.federation_harness.write_domains)
CLOTH_USERS = range(35, 100)
# users only sport trains on, in cloth's test file: cold in cloth, held by sport
CLOTH_COLD = (0, 1, 2, 5, 8, 13, 21)


def cold_files(tmp_path: Path) -> dict[str, dict[str, Path]]:
    """The two small CSV domains, cloth also with a test file of sport-only users and one user nobody holds (500)."""
    files = write_domains(tmp_path / "data")
    test = tmp_path / "data" / "cloth_test.csv"
    test.write_text("user,item\n" + "".join(f"{user_key(u)},{item_key('cloth', u % 7)}\n" for u in (*CLOTH_COLD, 500)))
    files["cloth"]["test"] = test
    return files


def user_ids(path: Path, csv: bool) -> set[str]:
    """The user keys of an interaction file: its first column (a CSV header line skipped)."""
    lines = path.read_text().splitlines()[1:] if csv else path.read_text().splitlines()
    return {line.replace("\t", ",").split(",", 1)[0] for line in lines if line}


def expected_served(held: dict[str, set[str]], registered: dict[str, set[str]]) -> dict[str, dict[str, int]]:
    """{holder: {receiving domain: its rows with no interactions there whose user the holder holds}}, from the id sets."""
    return {holder: {other: len((registered[other] - held[other]) & held[holder]) for other in held if other != holder} for holder in held}


def cold_node(processes: Processes, files: dict[str, dict[str, Path]], domain: str, aggregator: str, *extra: str,
              name: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`cdimf serve-node` of a test domain with extra flags, once it listens (argparse keeps a repeated flag's last value)."""
    process = launch_node(processes, files, domain, aggregator, *extra, name=name)
    return process, processes.listening(name or f"node-{domain}", process)


def launch_node(processes: Processes, files: dict[str, dict[str, Path]], domain: str, aggregator: str, *extra: str,
                name: str | None = None) -> subprocess.Popen[bytes]:
    """Start `cdimf serve-node` of a test domain with extra flags (without waiting: nodes load their data in parallel)."""
    return processes.launch(name or f"node-{domain}", [*processes._node_arguments(domain, files, aggregator), *extra], {"CDIMF_SECRET": SECRET})


async def domains_status(client: AggregatorClient) -> dict[str, pb.DomainStatus]:
    """The aggregator's DomainStatus per registered domain."""
    return {entry.domain: entry for entry in (await client.get_status()).domains}
