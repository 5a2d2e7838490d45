"""Suite-wide set-up: no CDIMF_* configuration from the caller's shell reaches the tests or the processes they start,
the `processes` fixture (real `cdimf` processes of one test) and `aggregator_processes` (aggregator
processes a test starts and kills itself) for every test file.

The config loader reads CDIMF_<FIELD> variables, and every `cdimf` child inherits this process's
environment unless a test builds its own, so one exported CDIMF_ROUNDS or CDIMF_TLS__INSECURE
in a developer's shell would change what many tests run. They are removed before collection
(and put back at the end); the switches of the suite itself stay.
"""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.federation_harness import Processes, processes_fixture

ENV_PREFIX = "CDIMF_"
# variables the suite and CI read for themselves (not configuration of a cdimf process)
SUITE_SWITCHES = frozenset({"CDIMF_REQUIRE_DOCKER", "CDIMF_BASE_IMAGE", "CDIMF_CACHE_DIR"})
_removed: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Drop the caller's CDIMF_* configuration variables from this process's environment."""
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX) and name not in SUITE_SWITCHES]:
        _removed[name] = os.environ.pop(name)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Put them back (for whatever runs pytest in-process)."""
    os.environ.update(_removed)
    _removed.clear()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Real processes, killed at the end of the test."""
    yield from processes_fixture(tmp_path)


@pytest.fixture
def aggregator_processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Aggregator processes a test starts (and may kill and restart) itself, killed at its end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(5)
