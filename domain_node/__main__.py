"""`python -m domain_node [--config FILE]`: serve one domain node (config from TOML + CDIMF_* variables)."""

import argparse
import logging
import sys

from common.config import ConfigError, NodeConfig, load_config
from domain_node.data import DataError
from domain_node.server import RunningNode, serve_node


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the configuration and serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m domain_node", description=__doc__)
    parser.add_argument("--config", help="TOML file with the NodeConfig fields")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(NodeConfig, args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def ready(running: RunningNode) -> None:
        # one machine-readable line, so a launcher that asked for port 0 learns the real port
        print(f"LISTENING {running.address}", flush=True)

    try:
        serve_node(config, on_ready=ready)
    except (DataError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
