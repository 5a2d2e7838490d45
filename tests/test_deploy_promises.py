"""deploy/README.md promises with no test of their own: the image's user, the services' hardening, the CA's validity."""

import datetime
import re
import subprocess
import sys
from pathlib import Path

from compose_local import REPO, load_compose

from cdimf.common.security import pki


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
