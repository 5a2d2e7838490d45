"""The servers' log formats: text lines or one JSON object per line, metrics never as a dict repr."""

import json
import logging
import subprocess
import sys

from cdimf.common.logs import JsonFormatter, format_metrics
from tests.federation_harness import read_line


def test_json_formatter_writes_one_object_per_record() -> None:
    """A record with a newline in its message and an exception is still one line of JSON."""
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord("cdimf.node", logging.WARNING, __file__, 1, "round %d:\n%s", (3, "x"), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "cdimf.node"
    assert entry["message"] == "round 3:\nx"
    assert "ValueError: bad" in entry["exception"]


def test_format_metrics_is_not_a_dict_repr() -> None:
    """Sorted `name value` pairs with four decimals."""
    assert format_metrics({"NDCG@10": 0.25, "HR@10": 0.5}) == "HR@10 0.5000  NDCG@10 0.2500"


def test_serve_aggregator_logs_json_lines(tmp_path) -> None:
    """`cdimf serve-aggregator --log-format json` logs JSON lines (its start-up message among them)."""
    config = tmp_path / "aggregator.toml"
    config.write_text(f'listen = "127.0.0.1:0"\nstate_dir = "{tmp_path / "state"}"\n[tls]\ninsecure = true\n')
    process = subprocess.Popen([sys.executable, "-m", "cdimf", "serve-aggregator", "--config", str(config), "--log-format", "json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and read_line(process.stdout, 60, lambda: process.poll() is None).startswith("LISTENING ")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert any(entry["message"].startswith("aggregator listening on 127.0.0.1:") for entry in entries), stderr
