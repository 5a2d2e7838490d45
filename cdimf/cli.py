"""The `cdimf` command line: one subcommand per job, each mapping onto a pydantic config model."""

import argparse
import json
import sys
from collections.abc import Sequence

from cdimf.common.config import ConfigError
from cdimf.reproduce_config import load_reproduce_config
from cdimf.resources import config_path, shipped_configs


def _reproduce(args: argparse.Namespace) -> int:
    """Train the three models on a pair and print the table (or JSON)."""
    from dataclasses import asdict

    from cdimf.reproduce import format_table, reproduce

    config = load_reproduce_config(config_path(args.config))
    progress = None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    results = reproduce(config, progress)
    if args.json:
        print(json.dumps({"title": config.title, "results": [asdict(r) for r in results], "paper": config.paper}, indent=2))
    else:
        print(format_table(results, config))
    return 0


def _tune(args: argparse.Namespace) -> int:
    """Hand the rest of the command line to the tuner, which has its own flags."""
    from cdimf import tune

    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    return tune.main(arguments)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="cdimf", description="Federated cross-domain implicit matrix factorisation.")
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("reproduce", help="train ALS-separate, ALS-joined and CDIMF on a pair and compare with the paper")
    rep.add_argument("config", help=f"a shipped config by name ({', '.join(shipped_configs())}) or the path of a reproduction config (TOML)")
    rep.add_argument("--json", action="store_true", help="print machine-readable results")
    rep.set_defaults(handler=_reproduce)
    tune = commands.add_parser("tune", add_help=False, help="choose reproduce hyperparameters on validation rows (`cdimf tune --help`)")
    tune.add_argument("arguments", nargs=argparse.REMAINDER)
    tune.set_defaults(handler=_tune)
    from cdimf import certs, runtime_cli, simulate

    runtime_cli.add_parsers(commands)
    simulate.add_parser(commands)
    certs.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if arguments[:1] == ["tune"]:
        # the tuner parses its own flags (argparse's REMAINDER would not pass a leading --help on)
        arguments = ["tune", "--", *arguments[1:]]
    args = parser.parse_args(arguments)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except (ConfigError, ValueError, OSError) as error:
        print(f"cdimf: error: {error}", file=sys.stderr)
        return 2
