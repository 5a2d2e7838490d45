"""README and deploy/README promises with no test of their own: the image's user and health check, the services'
hardening, the CA's validity, the roles' import rule, the secret that is never a flag."""

import datetime
import re
import subprocess
import sys
from pathlib import Path

from compose_local import REPO, load_compose

from cdimf.common.security import pki
from cdimf.simulate import write_throwaway_certificates
from tests.federation_harness import Processes


def test_the_image_runs_as_uid_10001_with_cdimf_as_its_entrypoint() -> None:
    """deploy/README: the image runs as the unprivileged user cdimf (uid 10001) with `cdimf` as its entrypoint."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"useradd [^\n]*--uid 10001 [^\n]*cdimf", dockerfile)
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] in ("cdimf", "10001"), users
    assert re.findall(r"^ENTRYPOINT (.+)$", dockerfile, flags=re.MULTILINE)[-1].strip() == '["cdimf"]'


def test_every_service_runs_read_only_without_capabilities_or_new_privileges() -> None:
    """deploy/README: Compose runs each service with a read-only root, no capabilities and no-new-privileges."""
    services = load_compose()["services"]
    assert set(services) >= {"certs", "aggregator", "node-sport", "node-cloth", "launcher"}
    for name, service in services.items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name


def test_the_ca_is_valid_ten_times_days_and_each_party_days(tmp_path: Path) -> None:
    """deploy/README step 2: `cdimf certs --days 7` writes a CA valid 70 days and party certificates valid 7."""
    out = tmp_path / "pki"
    finished = subprocess.run([sys.executable, "-m", "cdimf.certs", "--out", str(out), "--domains", "sport", "--days", "7"],
                              capture_output=True, text=True, timeout=60, check=False)
    assert finished.returncode == 0, finished.stderr
    ca = pki.load_certificate(out / "ca.pem")
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == datetime.timedelta(days=70)
    for party in ("aggregator", "sport", "operator"):
        issued = pki.load_certificate(out / f"{party}.pem")
        assert issued.not_valid_after_utc - issued.not_valid_before_utc == datetime.timedelta(days=7), party


def test_the_images_health_check_probes_a_real_aggregator_with_its_own_certificate(tmp_path: Path) -> None:
    """deploy/README: the image's HEALTHCHECK runs `cdimf health` on HEALTHCHECK_TARGET with the
    [tls] table of HEALTHCHECK_CONFIG (defaults 127.0.0.1:7070 and /srv/cdimf/config/cdimf.toml).
    Its CMD, run by a shell as Docker does, exits 0 against a live mutual-TLS aggregator and 1 once it is gone."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"(HEALTHCHECK_\w+)=(\S+)", re.search(r"^ENV HEALTHCHECK_.*$", dockerfile, flags=re.MULTILINE)[0]))
    assert defaults == {"HEALTHCHECK_TARGET": "127.0.0.1:7070", "HEALTHCHECK_CONFIG": "/srv/cdimf/config/cdimf.toml"}
    command = re.search(r"^HEALTHCHECK .*? CMD (.+)$", dockerfile, flags=re.MULTILINE)[1].strip()
    certificates = write_throwaway_certificates(tmp_path / "pki", ["sport"])
    own = certificates["aggregator"]
    config = tmp_path / "cdimf.toml"
    config.write_text(f"[tls]\nca_file = '{own.ca_file}'\ncert_file = '{own.cert_file}'\nkey_file = '{own.key_file}'\n")
    processes = Processes(tmp_path)
    try:
        aggregator, address = processes.spawn("aggregator", [
            "serve-aggregator", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "agg"),
            "--ca-file", str(own.ca_file), "--cert-file", str(own.cert_file), "--key-file", str(own.key_file)])
        environ = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
                   "HEALTHCHECK_TARGET": address, "HEALTHCHECK_CONFIG": str(config)}
        probe = subprocess.run(["sh", "-c", command], env=environ, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0 and probe.stdout.strip() == "SERVING", probe
        aggregator.kill()
        aggregator.wait(10)
        probe = subprocess.run(["sh", "-c", command.replace('health --target', 'health --timeout-s 2 --target')],
                               env=environ, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 1, probe
    finally:
        processes.close()


ROLES = {"aggregator": "cdimf.aggregator", "domain_node": "cdimf.domain_node"}


def test_the_aggregator_and_the_node_never_import_each_other() -> None:
    """README: the two roles never import each other, directly or through anything they import:
    importing every module of one role in a fresh interpreter loads no module of the other."""
    for role, other in (("aggregator", "domain_node"), ("domain_node", "aggregator")):
        modules = [f"{ROLES[role]}.{path.stem}" for path in sorted((REPO / role).glob("*.py")) if path.stem != "__init__"]
        assert len(modules) >= 4, modules
        script = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
                  f"print(sorted(m for m in sys.modules if m == {ROLES[other]!r} or m.startswith({ROLES[other] + '.'!r})))")
        loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.strip() == "[]", (role, loaded.stdout)


def test_the_secret_is_never_a_flag() -> None:
    """README: the federation secret comes from `secret_file` or CDIMF_SECRET, never a flag (a flag shows in `ps`)."""
    helped = subprocess.run([sys.executable, "-m", "cdimf", "serve-node", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--secret-file" in helped.stdout
    assert not re.search(r"--secret(?![-\w])", helped.stdout), helped.stdout
