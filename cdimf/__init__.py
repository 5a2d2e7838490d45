"""cdimf command line and orchestration: in-process engine, reproduction, simulation, and the Python API (`from cdimf import CDIMF`)."""

from typing import Any

__all__ = ["CDIMF", "__version__"]


def _version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cdimf")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str) -> Any:
    """`cdimf.CDIMF` loads the API (numpy, scipy) only when asked for, so `python -m cdimf` stays light."""
    if name == "CDIMF":
        from cdimf.api import CDIMF

        return CDIMF
    raise AttributeError(f"module 'cdimf' has no attribute {name!r}")
