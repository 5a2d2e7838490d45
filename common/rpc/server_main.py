"""The shared `python -m <server>` entry: parse --config, load the pydantic config, serve, print LISTENING."""

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from cdimf.common.config import ConfigError, load_config
from cdimf.common.core.params import StrictModel
from cdimf.common.logs import LOG_FORMATS, configure_logging

Config = TypeVar("Config", bound=StrictModel)


def server_main(
    prog: str,
    description: str,
    model: type[Config],
    serve: Callable[..., None],
    startup_errors: tuple[type[BaseException], ...] = (),
    argv: list[str] | None = None,
) -> int:
    """Load `model` from --config (+ CDIMF_* variables) and run serve(config, on_ready=...); exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", help=f"TOML file with the {model.__name__} fields")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text lines or one JSON object per line")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = load_config(model, args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def ready(running: Any) -> None:
        # one machine-readable line, so a launcher that asked for port 0 learns the real port
        print(f"LISTENING {running.address}", flush=True)

    try:
        serve(config, on_ready=ready)
    except startup_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
