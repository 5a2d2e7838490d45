"""README.md stays true: CI runs its test command verbatim, the main one names a shipped config, its results table is the committed runs' output."""

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of README.md's first shell block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README.md must open with a ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands() -> None:
    """Exactly two commands: the main job and the tests."""
    commands = readme_commands()
    assert len(commands) == 2
    assert "cdimf reproduce" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run contains README's test command as one of its lines."""
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert readme_commands()[1] in ci_lines


def test_main_command_config_exists() -> None:
    """The config the main command trains on is shipped: named after `reproduce`, a file of configs/."""
    words = shlex.split(readme_commands()[0])
    name = words[words.index("reproduce") + 1]
    assert (ROOT / "configs" / f"{name}.toml").is_file()


def test_results_table_is_the_committed_reproduce_output() -> None:
    """README's results table holds the committed `cdimf reproduce ... --json` runs cell by cell: both sampled protocols and the full catalog."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (warm|cold) \| ([A-Za-z-]+)[^|]*\|(.*)\|$", text, re.M)
    assert len(rows) == 5, rows
    for pair, model, cells in rows:
        run = json.loads((ROOT / "docs" / "results" / f"{pair}-sport-cloth.json").read_text(encoding="utf-8"))
        assert run["unit"] == "%"  # the labelled format: values in %, each named by split and protocol
        result = next(r for r in run["results"] if r["model"] == model)
        shown = [cell.strip() for cell in cells.split("|")]
        expected = []
        for domain in ("sport", "cloth"):
            m = result["metrics"][domain]
            paper = run["paper"].get(model, {}).get(domain) if model == "CDIMF" else None
            paper_cell = f" ({paper['test HR@10 (999 neg)']:.2f} / {paper['test NDCG@10 (999 neg)']:.2f})" if paper else ""
            for protocol in ("999 neg", "999 unseen neg", "full catalog"):
                expected.append(f"{m[f'test HR@10 ({protocol})']:.2f} / {m[f'test NDCG@10 ({protocol})']:.2f}"
                                + (paper_cell if protocol == "999 neg" else ""))
        # the validation score of the round the run chose (what the configs were chosen on), with its protocol
        best = result["validation"][result["rounds"] - 1]
        negatives = re.fullmatch(r"mean valid NDCG@10 \((\d+) neg\)", result["validation_metric"])
        assert negatives, result["validation_metric"]
        expected.append(f"{best:.2f} ({negatives.group(1)})")
        assert shown == [*expected, str(result["rounds"]), f"{result['seconds']:.0f}"], (pair, model)
