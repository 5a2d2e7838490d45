"""`python -m cdimf.aggregator [--config FILE]`: serve the aggregator (config from TOML + CDIMF_* variables)."""

import sys

from cdimf.aggregator.service import serve
from cdimf.common.config import AggregatorConfig
from cdimf.common.rpc.server_main import server_main


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the configuration and serve until SIGINT/SIGTERM."""
    return server_main("python -m cdimf.aggregator", __doc__ or "", AggregatorConfig, serve, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
