"""The suite's own guard: a CDIMF_* variable exported in the caller's shell reaches neither the tests nor their children."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SUITE_SWITCHES
from tests.federation_harness import REPO_ROOT


def test_no_cdimf_configuration_variable_is_set_inside_the_suite() -> None:
    """Whatever the shell exported, only the suite's own switches are left (conftest removed the rest)."""
    assert [name for name in os.environ if name.startswith("CDIMF_") and name not in SUITE_SWITCHES] == []


def test_a_variable_exported_by_the_caller_does_not_reach_a_child(tmp_path: Path) -> None:
    """pytest started with CDIMF_RUN__ROUNDS and CDIMF_TLS__INSECURE exported: inside, the check above holds, and a
    child `python` started the plain way (inheriting the environment) sees neither."""
    inner = (
        "import os, subprocess, sys\n"
        "def test_inner():\n"
        "    assert 'CDIMF_RUN__ROUNDS' not in os.environ and 'CDIMF_TLS__INSECURE' not in os.environ\n"
        "    probe = 'import os; print(sorted(n for n in os.environ if n in (\"CDIMF_RUN__ROUNDS\", \"CDIMF_TLS__INSECURE\")))'\n"
        "    seen = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True).stdout.strip()\n"
        "    assert seen == '[]', seen\n"
    )
    path = tmp_path / "test_inner.py"
    path.write_text(inner)
    # the suite's conftest loaded as a plugin: the inner test lives outside tests/
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", str(path)], cwd=REPO_ROOT,
        env={**os.environ, "CDIMF_RUN__ROUNDS": "7", "CDIMF_TLS__INSECURE": "true"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
