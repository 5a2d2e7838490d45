"""docker-compose.yml without Docker: schema, wiring of services, mounts, configs and TLS material.

Docker cannot run here, so each service's view of the file system is rebuilt in a temporary
folder from the compose file's own volume list (bind mounts point at the repository, named
volumes at folders shared between services, as Docker shares them) and the service's config
and command are checked against that view.
"""

import json
import os
import shutil
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography import x509

from cdimf import certs
from common import tls
from common.config import AggregatorConfig, NodeConfig, RunParams, TLSConfig, load_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
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
    return yaml.safe_load(COMPOSE_FILE.read_text())


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, PurePosixPath, bool]]:
    """(source, container target, read-only) of each short-syntax volume of a service."""
    mounts = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax, got {entry!r}"
        source, target, *mode = entry.split(":")
        mounts.append((source, PurePosixPath(target), mode == ["ro"]))
    return mounts


def is_bind(source: str) -> bool:
    """Whether a volume source is a host path (bind mount) rather than a named volume."""
    return source.startswith((".", "/"))


def build_view(name: str, service: dict[str, Any], sandbox: Path) -> Path:
    """Recreate the service's mounts under sandbox/<name>/ and return that root."""
    root = sandbox / name
    for source, target, _ in volume_mounts(service):
        place = root / target.relative_to("/")
        place.parent.mkdir(parents=True, exist_ok=True)
        if is_bind(source):
            host = (REPO / source).resolve()
            assert host.exists(), f"{name}: bind source {source} does not exist"
            if host.is_file():
                # copied, not linked: the config loader resolves its own path to find relative files
                shutil.copy(host, place)
            else:
                place.symlink_to(host, target_is_directory=True)
        else:
            shared = sandbox / "volumes" / source
            shared.mkdir(parents=True, exist_ok=True)
            place.symlink_to(shared, target_is_directory=True)
    return root


def in_view(root: Path, argument: str) -> str:
    """Map an absolute container path in a command line onto the service's view."""
    return str(root / argument.lstrip("/")) if argument.startswith("/") else argument


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


def load_service_config(name: str, service: dict[str, Any]) -> str:
    """Load the config a long-running service is started with; return its listen address."""
    config = option(service["command"], "--config")
    host_file = next(
        (REPO / source) for source, target, _ in volume_mounts(service) if str(target) == config
    )
    model = AggregatorConfig if name == "aggregator" else NodeConfig
    return load_config(model, host_file, environ={}).listen


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
    assert certs.main([in_view(certs_root, argument) for argument in certs_command[1:]]) == 0

    roots = {name: build_view(name, service, tmp_path) for name, service in services.items() if name != "certs"}
    aggregator = load_config(
        AggregatorConfig, in_view(roots["aggregator"], option(services["aggregator"]["command"], "--config")), environ={}
    )
    assert not aggregator.tls.insecure
    tls.server_credentials(aggregator.tls.cert_file, aggregator.tls.key_file, aggregator.tls.ca_file)
    aggregator_names = tls.load_certificate(aggregator.tls.cert_file).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    aggregator_toml = (REPO / "deploy/config/aggregator.toml").read_text()
    assert "secret" not in aggregator_toml, "the aggregator must not be given the federation secret"

    for domain in DOMAIN_FOLDERS:
        node = f"node-{domain}"
        config = load_config(NodeConfig, in_view(roots[node], option(services[node]["command"], "--config")), environ={})
        assert not config.tls.insecure
        tls.server_credentials(config.tls.cert_file, config.tls.key_file, config.tls.ca_file)
        certificate = tls.load_certificate(config.tls.cert_file)
        assert tls.party_identity(certificate) == tls.PartyIdentity("domain", config.domain)
        node_names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert node in node_names, f"{node}'s certificate does not name its compose host"
        assert config.aggregator.rsplit(":", 1)[0] in aggregator_names
        assert len(config.federation_secret()) >= 32

    launcher = services["launcher"]["command"]
    assert option(launcher, "--aggregator").rsplit(":", 1)[0] in aggregator_names
    assert option(launcher, "--aggregator").rsplit(":", 1)[1] == aggregator.listen.rsplit(":", 1)[1]
    run_file = Path(in_view(roots["launcher"], option(launcher, "--config")))
    # PLACEHOLDER until `cdimf train` has its config model: [tls] and [run] checked separately
    run = tomllib.loads(run_file.read_text())
    RunParams.model_validate(run["run"])
    operator_files = {key: run_file.parent / value for key, value in run["tls"].items()}
    operator_tls = TLSConfig.model_validate(operator_files)
    tls.channel_credentials(operator_tls.ca_file, operator_tls.cert_file, operator_tls.key_file)
    assert tls.party_identity(tls.load_certificate(operator_tls.cert_file)).kind == "operator"
