"""`python -m cdimf.domain_node [--config FILE]`: serve one domain node (config from TOML + CDIMF_* variables)."""

import sys

from cdimf.common.config import NodeConfig
from cdimf.common.rpc.server_main import server_main
from cdimf.domain_node.data import DataError
from cdimf.domain_node.service import serve_node


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the configuration and serve until SIGINT/SIGTERM."""
    return server_main(
        "python -m cdimf.domain_node", __doc__ or "", NodeConfig, serve_node, (DataError, ValueError, OSError), argv
    )


if __name__ == "__main__":
    sys.exit(main())
