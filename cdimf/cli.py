"""The `cdimf` command line: one subcommand per job, each mapping onto a pydantic config model."""

import argparse
import json
import sys
from collections.abc import Sequence

from cdimf.common.config import ConfigError
from cdimf.reproduce_config import load_reproduce_config


def _reproduce(args: argparse.Namespace) -> int:
    """Train the three models on a pair and print the table (or JSON)."""
    from dataclasses import asdict

    from cdimf.reproduce import format_table, reproduce

    config = load_reproduce_config(args.config)
    progress = None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    results = reproduce(config, progress)
    if args.json:
        print(json.dumps({"title": config.title, "results": [asdict(r) for r in results], "paper": config.paper}, indent=2))
    else:
        print(format_table(results, config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="cdimf", description="Federated cross-domain implicit matrix factorisation.")
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("reproduce", help="train ALS-separate, ALS-joined and CDIMF on a pair and compare with the paper")
    rep.add_argument("config", help="reproduction config (TOML), e.g. configs/warm-sport-cloth.toml")
    rep.add_argument("--json", action="store_true", help="print machine-readable results")
    rep.set_defaults(handler=_reproduce)
    from cdimf import certs, runtime_cli, simulate

    runtime_cli.add_parsers(commands)
    simulate.add_parser(commands)
    certs.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except (ConfigError, ValueError, OSError) as error:
        print(f"cdimf: error: {error}", file=sys.stderr)
        return 2
