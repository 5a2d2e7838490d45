"""The `cdimf` command line: one subcommand per job, each mapping onto a pydantic config model."""

import argparse
import difflib
import json
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from cdimf.arg_types import positive_int
from cdimf.common.config import ConfigError
from cdimf.reproduce_config import load_reproduce_config
from cdimf.resources import config_path, shipped_configs


def _reproduce(args: argparse.Namespace) -> int:
    """Train the three models on the config's domains and print the table (or JSON); progress goes to stderr either way."""
    from cdimf.reproduce import format_table, paper_json, reproduce, result_json

    config = load_reproduce_config(config_path(args.config))
    if args.figures is not None:
        from cdimf.plotting import require_matplotlib

        require_matplotlib()  # before minutes of training, not after
    results = reproduce(config, show_progress=True)
    if args.json:
        print(json.dumps({"ok": True, "title": config.title, "unit": "%", "results": [result_json(r, config) for r in results],
                          "paper": paper_json(config)}, indent=2))
    else:
        print(format_table(results, config))
    if args.figures is not None:
        from cdimf.figures import write_figures

        for path in write_figures(config, args.figures, args.figures_epochs, results):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _tune(args: argparse.Namespace) -> int:
    """Hand the rest of the command line to the tuner, which has its own flags."""
    from cdimf import tune

    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    return tune.main(arguments)


class WholeNamesHelpFormatter(argparse.HelpFormatter):
    """argparse's help layout, but a line never breaks inside a hyphenated name (`warm-sport-cloth`, `--figures-epochs`)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse with suggestions: an unknown flag or command names the closest known ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", WholeNamesHelpFormatter)
        # a prefix must not pass for a flag: `--secret x` silently taken as `--secret-file x` would
        # read a file named after the secret
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Exit 2 with the message and, for a typo, `did you mean ...?`."""
        hint = ""
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        choice = re.match(r"argument \S+: invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if unknown:
            known = [option for action in self._all_actions() for option in action.option_strings]
            guesses = {word: difflib.get_close_matches(word.split("=")[0], known, n=2) for word in unknown.group(1).split() if word.startswith("-")}
            hint = "; ".join(f"{word}: did you mean {' or '.join(found)}?" for word, found in guesses.items() if found)
        elif choice:
            found = difflib.get_close_matches(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=2)
            hint = f"did you mean {' or '.join(found)}?" if found else ""
        super().error(f"{message}{' (' + hint + ')' if hint else ''}")

    def _all_actions(self) -> list[argparse.Action]:
        """This parser's actions and those of the subcommand being parsed."""
        actions = list(self._actions)
        command = getattr(self, "chosen_command", None)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                actions += action.choices[command]._actions
        return actions


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from cdimf import __version__

    parser = Parser(prog="cdimf", description="Federated cross-domain implicit matrix factorisation.")
    parser.add_argument("--version", action="version", version=f"cdimf {__version__}", help="print the version and exit")
    commands = cast("argparse._SubParsersAction[argparse.ArgumentParser]", parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    rep = commands.add_parser("reproduce", help="train ALS-separate, ALS-joined and CDIMF on a pair and compare with the paper")
    rep.add_argument("config", help=f"a shipped config by name ({', '.join(shipped_configs())}) or the path of a reproduction config (TOML)")
    rep.add_argument("--json", action="store_true", help="print machine-readable results (one JSON object)")
    rep.add_argument("--figures", type=Path, metavar="DIR",
                     help="also write the paper's Figures 2-4 for this pair (validation NDCG over epochs by rho, prox, aggregation period) as PNGs; "
                          "needs the [plot] extra")
    rep.add_argument("--figures-epochs", type=positive_int, metavar="N", help="local epochs of each figure curve (default: [stopping] max_rounds)")
    rep.set_defaults(handler=_reproduce)
    tune = commands.add_parser("tune", add_help=False, help="choose reproduce hyperparameters on validation rows (`cdimf tune --help`)")
    tune.add_argument("arguments", nargs=argparse.REMAINDER)
    tune.set_defaults(handler=_tune)
    from cdimf import certs, plot_cli, runtime_cli, simulate

    runtime_cli.add_parsers(commands)
    plot_cli.add_parser(commands)
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
    parser.chosen_command = next((word for word in arguments if not word.startswith("-")), None)  # type: ignore[attr-defined]
    args = parser.parse_args(arguments)
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`cdimf status | head -1`): nothing left to say, and no flush at exit to fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ConfigError, ValueError, OSError) as error:
        from cdimf.runtime_cli import report_error

        report_error(str(error), as_json)
        return 2
