"""docker-compose.yml without Docker: schema, wiring, mounts, configs, TLS material, the real CLI, a real run.

Docker cannot run here, so each service's view of the file system is rebuilt in a temporary
folder from the compose file's own volume list (tests/compose_local.py) and its config and
command are checked against that view; finally every service runs as local processes, each in
its own network namespace named after the service.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import netns  # tests/netns.py: pytest's default "prepend" import mode puts tests/ (no __init__.py) on sys.path
import pytest
from compose_local import REPO, build_view, in_view, is_bind, load_compose, run_stack, volume_mounts
from cryptography import x509

from cdimf.cli import build_parser
from cdimf.cli import main as cdimf_main
from cdimf.common.config import AggregatorConfig, NodeConfig, load_config
from cdimf.common.rpc import channels
from cdimf.common.security import pki
from cdimf.runtime_cli import TrainConfig

DOCKERFILE = REPO / "deploy" / "Dockerfile"
SCHEMA_FILE = REPO / "deploy" / "compose-spec.json"
LONG_RUNNING = {"aggregator", "node-sport", "node-cloth"}
ONE_SHOT = {"certs", "launcher"}
DOMAIN_FOLDERS = {
    "sport": REPO / "data/amazon-cdr/warm-start_sport_cloth/sport_cloth",
    "cloth": REPO / "data/amazon-cdr/warm-start_sport_cloth/cloth_sport",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed compose file (YAML anchors and merge keys applied, as Compose applies them)."""
    return load_compose()


def option(command: list[str], flag: str) -> str:
    """The value after `flag` in a command line (the flag must be present exactly once)."""
    assert command.count(flag) == 1, f"{flag} must appear once in {command}"
    return command[command.index(flag) + 1]


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    """docker-compose.yml validates against the Compose Specification's JSON schema."""
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda error: list(error.path))
    assert not errors, "\n".join(f"{list(error.path)}: {error.message}" for error in errors)


def load_service_config(name: str, service: dict[str, Any]) -> str:
    """Load the config a long-running service is started with; return its listen address."""
    config = option(service["command"], "--config")
    host_file = next(
        (REPO / source) for source, target, _ in volume_mounts(service) if str(target) == config
    )
    model = AggregatorConfig if name == "aggregator" else NodeConfig
    return load_config(model, host_file, environ={}).listen


def test_services_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    """Long-running services probe themselves through `cdimf health`; the launcher waits for all
    of them to be healthy, and everything waits for the certificates."""
    services = compose["services"]
    assert set(services) == LONG_RUNNING | ONE_SHOT
    for name in LONG_RUNNING:
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "cdimf", "health"], (name, test)
        listen = load_service_config(name, services[name])
        port = listen.split(":")[-1]
        assert option(test, "--target") == f"127.0.0.1:{port}", f"{name} probes a port it does not listen on"
        assert services[name]["expose"] == [port]
        assert services[name]["depends_on"]["certs"] == {"condition": "service_completed_successfully"}
    for name in ONE_SHOT:
        assert services[name]["healthcheck"] == {"disable": True}
        assert services[name]["restart"] == "no"
    assert services["launcher"]["depends_on"] == {name: {"condition": "service_healthy"} for name in LONG_RUNNING}
    for node in ("node-sport", "node-cloth"):
        assert services[node]["depends_on"]["aggregator"] == {"condition": "service_healthy"}


def test_each_node_mounts_only_its_own_domain_data_read_only(compose: dict[str, Any], tmp_path: Path) -> None:
    """A node sees exactly one data folder, its own domain's, read-only; no other service sees it;
    its config's data files exist there."""
    services = compose["services"]
    data_mounts = {
        name: [(source, target, read_only) for source, target, read_only in volume_mounts(service)
               if is_bind(source) and (REPO / source).resolve().is_relative_to(REPO / "data")]
        for name, service in services.items()
    }
    for domain, folder in DOMAIN_FOLDERS.items():
        node = f"node-{domain}"
        assert len(data_mounts[node]) == 1, data_mounts[node]
        source, target, read_only = data_mounts[node][0]
        assert (REPO / source).resolve() == folder and read_only, data_mounts[node]
        root = build_view(node, services[node], tmp_path)
        config = load_config(NodeConfig, in_view(root, option(services[node]["command"], "--config")), environ={})
        assert config.domain == domain
        for path in (config.train_path, config.test_path):
            assert path is not None and path.is_file(), path
            # the path is inside the mounted data folder, not reached some other way
            assert Path(os.path.normpath(path)).parent == root / target.relative_to("/")
    for name in set(services) - {"node-sport", "node-cloth"}:
        assert data_mounts[name] == [], f"{name} must not mount domain data"
    for name, service in services.items():
        writable = [source for source, _, read_only in volume_mounts(service) if is_bind(source) and not read_only]
        assert writable == [], f"{name} writes into the repository: {writable}"


def test_certs_service_makes_exactly_the_tls_material_the_services_use(compose: dict[str, Any], tmp_path: Path) -> None:
    """Run the certs service's own arguments, then load every service's TLS files as it would:
    identities match the configs, server names cover the host names dialled, and only the
    domains' configs name the federation secret."""
    services = compose["services"]
    certs_command = services["certs"]["command"]
    assert certs_command[0] == "certs"
    certs_root = build_view("certs", services["certs"], tmp_path)
    assert cdimf_main([in_view(certs_root, argument) for argument in certs_command]) == 0

    roots = {name: build_view(name, service, tmp_path) for name, service in services.items() if name != "certs"}
    aggregator = load_config(
        AggregatorConfig, in_view(roots["aggregator"], option(services["aggregator"]["command"], "--config")), environ={}
    )
    assert not aggregator.tls.insecure
    channels.server_credentials(aggregator.tls.cert_file, aggregator.tls.key_file, aggregator.tls.ca_file)
    aggregator_names = pki.load_certificate(aggregator.tls.cert_file).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    aggregator_toml = (REPO / "deploy/config/aggregator.toml").read_text()
    assert "secret" not in aggregator_toml, "the aggregator must not be given the federation secret"

    for domain in DOMAIN_FOLDERS:
        node = f"node-{domain}"
        config = load_config(NodeConfig, in_view(roots[node], option(services[node]["command"], "--config")), environ={})
        assert not config.tls.insecure
        channels.server_credentials(config.tls.cert_file, config.tls.key_file, config.tls.ca_file)
        certificate = pki.load_certificate(config.tls.cert_file)
        assert pki.party_identity(certificate) == pki.PartyIdentity("domain", config.domain)
        node_names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert node in node_names, f"{node}'s certificate does not name its compose host"
        assert config.aggregator.rsplit(":", 1)[0] in aggregator_names
        assert len(config.federation_secret()) >= 32

    launcher = services["launcher"]["command"]
    run_file = in_view(roots["launcher"], option(launcher, "--config"))
    train = load_config(TrainConfig, run_file, environ={"CDIMF_AGGREGATOR": option(launcher, "--aggregator")})
    assert train.aggregator.rsplit(":", 1)[0] in aggregator_names
    assert train.aggregator.rsplit(":", 1)[1] == aggregator.listen.rsplit(":", 1)[1]
    assert not train.tls.insecure
    channels.channel_credentials(train.tls.ca_file, train.tls.cert_file, train.tls.key_file)  # type: ignore[arg-type]
    assert pki.party_identity(pki.load_certificate(train.tls.cert_file)).kind == "operator"  # type: ignore[arg-type]
    assert train.run.min_domains == len(DOMAIN_FOLDERS)


def image_healthcheck() -> list[str]:
    """The Dockerfile's HEALTHCHECK command with the image's ENV defaults substituted."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"(HEALTHCHECK_[A-Z]+)=(\S+)", text))
    found = re.search(r"^HEALTHCHECK .*? CMD (.*?) \|\| exit 1$", text, re.MULTILINE)
    assert found is not None and defaults, "deploy/Dockerfile has no HEALTHCHECK with ENV defaults"
    command = found.group(1)
    for name, value in defaults.items():
        command = command.replace(f'"${name}"', value)
    return command.split()


def test_every_command_is_a_valid_cdimf_invocation(compose: dict[str, Any]) -> None:
    """Each service command and health probe, and the image's default probe, parse with the real
    CLI (a missing subcommand or option fails here)."""
    parser = build_parser()
    invocations = [("Dockerfile HEALTHCHECK", image_healthcheck())]
    for name, service in compose["services"].items():
        invocations.append((f"{name} command", ["cdimf", *service["command"]]))
        test = service["healthcheck"].get("test")
        if test is not None:
            assert test[0] == "CMD", (name, test)
            invocations.append((f"{name} healthcheck", test[1:]))
    assert len(invocations) == 1 + len(compose["services"]) + len(LONG_RUNNING)
    for where, argv in invocations:
        assert argv[0] == "cdimf", where
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit as exit_:
            pytest.fail(f"{where}: `{' '.join(argv)}` is rejected by cdimf's parser (status {exit_.code})")
        assert callable(args.handler), where


# Shrinks the run so the test stays short: the same commands, files and network, fewer rounds
# and a smaller rank (the run's, so the nodes follow). The full run is `tests/compose_local.py`
# (see deploy/README.md).
SHORT_RUN = {
    "launcher": {"CDIMF_RUN__ROUNDS": "1", "CDIMF_RUN__RANK": "8"},
}


def test_compose_stack_runs_as_local_processes(compose: dict[str, Any], tmp_path: Path) -> None:
    """certs, aggregator, both nodes and the launcher run with exactly their compose commands and
    mounts, each in its own network namespace and over mutual TLS; the launcher's round finishes
    with metrics from both domains, state lands in the volumes, and the servers stop on SIGTERM."""
    reason = netns.unavailable_reason()
    assert reason is None, f"this test runs the services in network namespaces: {reason}"
    run = run_stack(tmp_path, compose, extra_env=SHORT_RUN, one_shot_deadline_s=120)
    launcher = run.finished["launcher"]
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    assert re.search(r"run \S+ finished", launcher.stderr), launcher.stderr[-2000:]
    for domain in DOMAIN_FOLDERS:
        # labelled with split and protocol, in %, on stderr with the progress lines
        assert re.search(rf"round\s+1\s+{domain}\s+valid HR@10 \(\d+ neg\) \d+\.\d\d%", launcher.stderr), launcher.stderr
    for volume in ("aggregator-state", "sport-state", "cloth-state"):
        assert any((tmp_path / "volumes" / volume).iterdir()), f"{volume} is empty"
    assert run.stop_status == {name: 0 for name in LONG_RUNNING}, run.stop_status
