"""`python -m aggregator [--config FILE]`: serve the aggregator (config from TOML + CDIMF_* variables)."""

import argparse
import logging
import sys

from aggregator.server import RunningAggregator, serve
from common.config import AggregatorConfig, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the configuration and serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m aggregator", description=__doc__)
    parser.add_argument("--config", help="TOML file with the AggregatorConfig fields")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(AggregatorConfig, args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def ready(running: RunningAggregator) -> None:
        # one machine-readable line, so a launcher that asked for port 0 learns the real port
        print(f"LISTENING {running.address}", flush=True)

    serve(config, on_ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
