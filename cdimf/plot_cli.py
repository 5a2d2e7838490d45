"""`cdimf plot`: metrics over rounds as a PNG, from a run's history (a JSON file, or fetched from the aggregator) or a reproduce JSON.

Inputs it reads, told apart by their keys: `cdimf log RUN --json` and `cdimf simulate --json`
(the run's events: one panel per labelled metric, a line per domain), the lines of
`cdimf train --follow --json`, and `cdimf reproduce --json` (each model's validation curve).
"""

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cdimf.plotting import Line, Panel, render, require_matplotlib


def event_panels(events: Iterable[dict[str, Any]]) -> list[Panel]:
    """One panel per labelled metric of the run's `metrics` events, a line per domain over rounds (a later report of a round wins)."""
    points: dict[str, dict[str, dict[int, float]]] = {}
    for event in events:
        if event.get("kind") != "metrics" or not event.get("domain"):
            continue
        for label, value in (event.get("metrics") or {}).items():
            points.setdefault(label, {}).setdefault(event["domain"], {})[int(event["round"])] = float(value)
    return [
        Panel(label, "%", "round", [Line(domain, [float(r) for r in sorted(by_round)], [by_round[r] for r in sorted(by_round)])
                                    for domain, by_round in sorted(domains.items())])
        for label, domains in sorted(points.items())
    ]


def reproduce_panels(document: dict[str, Any]) -> list[Panel]:
    """Each model's per-round validation metric in %, one line per model.

    A document without `"unit": "%"` is the earlier reproduce JSON, whose `validation` held fractions
    and no label (docs/results held such files until they were re-run in the labelled format).
    """
    from cdimf.figures import model_panel

    results = document["results"]
    if document.get("unit") == "%":
        return [model_panel(results, str(results[0].get("validation_metric", "mean valid NDCG")) if results else "")]
    return [model_panel(results, "valid NDCG@10, mean over domains", 100.0)]


def panels_of(text: str, source: str) -> tuple[list[Panel], str]:
    """The panels and a title for one input's text; ValueError naming `source` when it is none of the known documents."""
    try:
        documents = [json.loads(text)]
    except json.JSONDecodeError:
        try:  # `train --follow --json`: one event per line
            documents = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not JSON (line {error.lineno}: {error.msg})") from None
    if len(documents) == 1 and isinstance(documents[0], dict):
        document = documents[0]
        if isinstance(document.get("results"), list):
            return reproduce_panels(document), str(document.get("title", source))
        if isinstance(document.get("events"), list):
            return event_panels(document["events"]), f"run {document.get('run_id') or source}"
        if isinstance(document.get("history"), list):
            return event_panels(document["history"]), f"run {document.get('run_id') or source}"
    if all(isinstance(d, dict) and "kind" in d for d in documents):
        run = next((d["run_id"] for d in documents if d.get("run_id")), source)
        return event_panels(documents), f"run {run}"
    raise ValueError(f"{source}: expected the JSON of `cdimf log --json`, `simulate --json`, `train --follow --json` or `reproduce --json`")


def fetch_run(args: argparse.Namespace) -> str:
    """The run's history from the aggregator, as `cdimf log RUN --json` prints it."""
    import asyncio

    from cdimf.common.wire.serde import run_record_to_json
    from cdimf.config_flags import load_with_flags
    from cdimf.runtime_cli import TrainConfig, _control_client

    config = load_with_flags(TrainConfig, args.config, args, args.fields)

    async def main() -> dict[str, Any]:
        """ListRuns for one run with its events."""
        client = _control_client(config)
        try:
            return run_record_to_json((await client.list_runs(args.run, with_events=True)).runs[0])
        finally:
            await client.close()

    return json.dumps(asyncio.run(main()))


def _plot(args: argparse.Namespace) -> int:
    """Read the history, draw it, say where the PNG went."""
    from cdimf.common.rpc.aggregator_client import AggregatorError
    from cdimf.runtime_cli import print_json, report_error

    require_matplotlib()
    if (args.input is None) == (args.run is None):
        raise ValueError("give either an INPUT file ('-' for stdin) or --run RUN_ID, not both")
    try:
        if args.run is not None:
            text, source = fetch_run(args), f"run {args.run}"
        else:
            source = "stdin" if args.input == "-" else args.input
            text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
    except AggregatorError as error:
        report_error(str(error), args.json)
        return 1
    panels, title = panels_of(text, source)
    path = render(panels, args.out, args.title or title)
    if args.json:
        print_json({"path": str(path), "panels": [{"title": p.title, "lines": [line.label for line in p.lines]} for p in panels]})
    else:
        print(f"wrote {path} ({len(panels)} panel{'s' if len(panels) != 1 else ''})", file=sys.stderr)
    return 0


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `cdimf plot`."""
    from cdimf.config_flags import add_model_flags
    from cdimf.runtime_cli import TLS_FLATTEN, ControlConfig

    what = "draw metrics over rounds (a run's history or a reproduce JSON) as a PNG (needs the [plot] extra)"
    plot = commands.add_parser("plot", help=what, description=what[0].upper() + what[1:] + ".")
    plot.add_argument("input", nargs="?",
                      help="JSON of `cdimf log RUN --json`, `simulate --json`, `train --follow --json` or `reproduce --json`; '-' reads stdin")
    plot.add_argument("--run", help="fetch this run's history from the aggregator instead (control flags below, as for `cdimf log`)")
    plot.add_argument("--out", type=Path, required=True, help="the PNG file to write (folders created)")
    plot.add_argument("--title", default="", help="the figure's title (default: the run id or the reproduce title)")
    plot.add_argument("--config", help="with --run: TOML file with aggregator and [tls] (operator certificate)")
    plot.add_argument("--json", action="store_true", help="print one JSON object: the PNG's path and its panels")
    plot.set_defaults(handler=_plot, fields=add_model_flags(plot, ControlConfig, TLS_FLATTEN))
