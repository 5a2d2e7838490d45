"""`cdimf plot` and `cdimf reproduce --figures` for real: real runs, real JSON, PNG files checked pixel by pixel."""

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from test_reproduce import CONFIG, write_pair
from test_tune import OPENED, RECORDING, brute_force_ndcg

from cdimf.common.core.model import DomainTrainer
from cdimf.figures import write_figures
from cdimf.reproduce import held_out, load_splits
from cdimf.reproduce_config import load_reproduce_config
from tests.federation_harness import REPO_ROOT, Processes, write_domains

pytestmark = pytest.mark.timeout(180)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# matplotlib's default colour cycle: the n-th curve of a panel is drawn in the n-th colour
CYCLE = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28), (0x94, 0x67, 0xBD)]


def command_line(arguments: Sequence[str], hide_matplotlib: bool = False) -> list[str]:
    """`cdimf ARGUMENTS` as a process command line; with `hide_matplotlib`, as on a machine without the [plot] extra."""
    hide = "sys.modules['matplotlib'] = None; " if hide_matplotlib else ""
    return [sys.executable, "-c", f"import sys; {hide}from cdimf.cli import main; sys.exit(main(sys.argv[1:]))", *arguments]


def cdimf(*arguments: str, stdin: str | None = None, hide_matplotlib: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `cdimf ARGUMENTS` to its end."""
    return subprocess.run(command_line(arguments, hide_matplotlib), cwd=REPO_ROOT, capture_output=True, text=True, timeout=150, input=stdin)


def cdimf_all(*runs: tuple[list[str], str | None, bool]) -> list[subprocess.CompletedProcess[str]]:
    """Several independent `cdimf` runs (arguments, stdin, hide_matplotlib) at once: each pays the interpreter start-up."""
    started = [(arguments, stdin, subprocess.Popen(command_line(arguments, hide), cwd=REPO_ROOT, stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
               for arguments, stdin, hide in runs]
    finished = []
    for arguments, stdin, process in started:
        out, err = process.communicate(stdin, timeout=150)
        finished.append(subprocess.CompletedProcess(arguments, process.returncode, out, err))
    return finished


def check_png(path: Path, width: int, height: int, colours: int) -> np.ndarray:
    """A real, non-blank PNG of the given size whose pixels include the first `colours` curve colours; its RGB pixels."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (width, height)
    assert 5_000 < len(data) < 400_000, f"{path}: {len(data)} bytes"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (height, width, 3)
    assert pixels.std() > 20, "not a blank image"
    present = {tuple(int(c) for c in colour) for colour in np.unique(pixels.reshape(-1, 3), axis=0)}
    missing = [colour for colour in CYCLE[:colours] if colour not in present]
    assert not missing, f"{path}: curves of colours {missing} not drawn"
    return pixels


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    """The synthetic two-domain CSV pair and its reproduce config."""
    write_pair(tmp_path)
    config = tmp_path / "pair.toml"
    config.write_text(CONFIG)
    return config


def test_reproduce_figures_draws_the_papers_figures_from_validation_curves(pair: Path, tmp_path: Path) -> None:
    """--figures writes Figures 2-4 and the models' curves; the rho = 0 curve is ALS per domain, scored here by hand."""
    figures = tmp_path / "figures"
    done = cdimf("reproduce", str(pair), "--json", "--figures", str(figures), "--figures-epochs", "4")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {r["validation_metric"] for r in report["results"]} == {"mean valid NDCG@10 (19 neg)"}
    for stem, curves in (("figure2-rho", 5), ("figure3-prox", 3), ("figure4-period", 3)):
        check_png(figures / f"{stem}.png", 920, 360, curves)  # one panel per domain
    check_png(figures / "models.png", 460, 360, 3)
    document = json.loads((figures / "figures.json").read_text())
    assert document["metric"] == "valid NDCG@10 (19 neg)" and document["epochs"] == 4
    rho = {c["label"]: c for c in document["figures"]["figure2-rho"]["curves"]}
    assert list(rho) == ["rho = 0 (ALS per domain)", "rho = 0.3", "rho = 1", "rho = 3", "rho = 10"]
    periods = {c["label"]: c["epochs"] for c in document["figures"]["figure4-period"]["curves"]}
    assert periods == {"aggregation period 1": [1, 2, 3, 4], "aggregation period 2": [2, 4], "aggregation period 4": [4]}
    assert [c["label"] for c in document["figures"]["figure3-prox"]["curves"]] == ["identity prox", "L2 prox, lambda_z = 0.2", "L2 prox, lambda_z = 2"]

    # rho = 0: each domain trains alone; its validation NDCG after each epoch, brute-forced on the validation rows
    config = load_reproduce_config(pair)
    splits, _ = load_splits(config, with_test=False)
    for split in splits:
        trainer = DomainTrainer(split.name, split.train, config.cdimf.ials.for_domain(split.name), 0.0)
        rows = held_out(split, "valid", config.stopping.valid_negatives, config.evaluation.seed)
        expected = []
        for _ in range(4):
            trainer.local_epochs(1)
            expected.append(100 * brute_force_ndcg(trainer.state.users, trainer.state.items, rows.candidates, rows.users,
                                                   split.train.toarray(), 10))
        np.testing.assert_allclose(rho["rho = 0 (ALS per domain)"]["values"][split.name], expected, atol=1e-3)
    assert rho["rho = 1"]["values"] != rho["rho = 0 (ALS per domain)"]["values"], "consensus changes the curve"

    # the reproduce JSON itself plots: one line per model, in % of the fractions it holds
    saved = tmp_path / "reproduce.json"
    saved.write_text(done.stdout)
    plotted = cdimf("plot", str(saved), "--out", str(tmp_path / "models.png"), "--json")
    assert plotted.returncode == 0, plotted.stderr
    assert json.loads(plotted.stdout) == {"ok": True, "path": str(tmp_path / "models.png"), "panels": [
        {"title": "mean valid NDCG@10 (19 neg)", "lines": ["ALS-separate", "ALS-joined", "CDIMF"]}]}
    check_png(tmp_path / "models.png", 460, 360, 3)


def test_figures_never_open_the_test_files(pair: Path, tmp_path: Path) -> None:
    """The figure curves read train and validation only: an audit hook sees every file opened, and no test file."""
    config = load_reproduce_config(pair)
    OPENED.clear()
    RECORDING[0] = True
    try:
        written = write_figures(config, tmp_path / "figures", 4)
    finally:
        RECORDING[0] = False
    opened = set(OPENED)
    assert {str(Path(d.train_path).resolve()) for d in config.domains} <= opened, "the audit hook sees the training files"
    assert not {str(Path(d.test_path).resolve()) for d in config.domains if d.test_path} & opened
    assert [p.name for p in written] == ["figure2-rho.png", "figure3-prox.png", "figure4-period.png", "figures.json"]


def test_plot_the_shipped_warm_pairs_reproduce_json(tmp_path: Path) -> None:
    """The committed output of `cdimf reproduce warm-sport-cloth --json` plots its three models' early stopping."""
    done = cdimf("plot", str(REPO_ROOT / "docs" / "results" / "warm-sport-cloth.json"), "--out", str(tmp_path / "warm.png"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["panels"] == [{"title": "mean valid NDCG@10 (999 neg)", "lines": ["ALS-separate", "ALS-joined", "CDIMF"]}]
    check_png(tmp_path / "warm.png", 460, 360, 3)


def test_plot_the_earlier_unlabelled_reproduce_json(tmp_path: Path) -> None:
    """A reproduce JSON from before the labels (no "unit", validation as fractions) still plots, under the old title."""
    old = {"title": "old run", "results": [{"model": "CDIMF", "rounds": 2, "validation": [0.1, 0.2, 0.15]}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    done = cdimf("plot", str(tmp_path / "old.json"), "--out", str(tmp_path / "old.png"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["panels"] == [{"title": "valid NDCG@10, mean over domains", "lines": ["CDIMF"]}]



def test_plot_a_federated_runs_history_from_log_json_stdin_and_the_aggregator(tmp_path: Path, processes: Processes) -> None:
    """A real run of two nodes: `log --json` (file and stdin), `train --follow --json` lines and `--run` from the aggregator all plot."""
    files = write_domains(tmp_path / "data")
    _, aggregator = processes.aggregator()
    processes.nodes(files, aggregator)
    trained = cdimf("train", "--aggregator", aggregator, "--insecure", "--rounds", "3", "--rank", "6", "--min-domains", "2",
                    "--run-id", "plotted", "--follow", "--json")
    assert trained.returncode == 0, trained.stderr
    log = cdimf("log", "plotted", "--aggregator", aggregator, "--insecure", "--json")
    assert log.returncode == 0, log.stderr
    (tmp_path / "log.json").write_text(log.stdout)
    (tmp_path / "follow.jsonl").write_text(trained.stdout)
    expected_panels = [{"title": f"valid {m}@10 (59 neg)", "lines": ["cloth", "sport"]} for m in ("HR", "NDCG")]
    names = ("file", "stdin", "follow", "aggregator")
    *runs, missing = cdimf_all(
        (["plot", str(tmp_path / "log.json"), "--out", str(tmp_path / "file.png"), "--json"], None, False),
        (["plot", "-", "--out", str(tmp_path / "stdin.png"), "--json"], log.stdout, False),
        (["plot", str(tmp_path / "follow.jsonl"), "--out", str(tmp_path / "follow.png"), "--json"], None, False),
        (["plot", "--run", "plotted", "--aggregator", aggregator, "--insecure", "--out", str(tmp_path / "aggregator.png"), "--json"], None, False),
        (["plot", "--run", "no-such-run", "--aggregator", aggregator, "--insecure", "--out", str(tmp_path / "x.png"), "--json"], None, False),
    )
    for name, done in zip(names, runs):
        assert done.returncode == 0, (name, done.stderr)
        assert json.loads(done.stdout)["panels"] == expected_panels, name
    pixels = {name: check_png(tmp_path / f"{name}.png", 920, 360, 2) for name in names}
    # one history, one picture: what the aggregator serves is what `log --json` printed
    assert np.array_equal(pixels["file"], pixels["aggregator"]) and np.array_equal(pixels["file"], pixels["stdin"])
    assert np.array_equal(pixels["file"], pixels["follow"])
    assert missing.returncode == 1 and json.loads(missing.stdout)["ok"] is False and "no-such-run" in json.loads(missing.stdout)["error"]
    assert not (tmp_path / "x.png").exists()


def test_plot_errors_name_the_input_and_the_missing_extra(pair: Path, tmp_path: Path) -> None:
    """Not-a-history input names the file; without matplotlib both commands stop at once naming the [plot] extra."""
    bad = tmp_path / "notes.txt"
    bad.write_text("round 1: fine\n")
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    wrong, unknown, both, *unplotted = cdimf_all(
        (["plot", str(bad), "--out", str(tmp_path / "bad.png")], None, False),
        (["plot", str(other), "--out", str(tmp_path / "bad.png"), "--json"], None, False),
        (["plot", str(other), "--run", "r", "--out", str(tmp_path / "bad.png")], None, False),
        (["plot", str(other), "--out", str(tmp_path / "bad.png")], None, True),
        (["reproduce", str(pair), "--figures", str(tmp_path / "figs")], None, True),
    )
    assert wrong.returncode == 2 and f"{bad}: not JSON" in wrong.stderr
    assert unknown.returncode == 2 and "expected the JSON of `cdimf log --json`" in json.loads(unknown.stdout)["error"]
    assert both.returncode == 2 and "either an INPUT file" in both.stderr
    assert not (tmp_path / "bad.png").exists()
    for done in unplotted:
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == ["cdimf: error: plotting needs matplotlib, which is not installed: pip install 'cdimf[plot]'"]
        assert done.stdout == ""
    assert not (tmp_path / "figs").exists()
