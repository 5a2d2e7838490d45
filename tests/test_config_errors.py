"""Config errors from the real commands on real files: every problem at once, each naming the file and line, the flag or the variable set."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cdimf(*arguments: str, environ: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run `python -m cdimf ...` with no CDIMF_* variable but those given."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("CDIMF_")}
    return subprocess.run([sys.executable, "-m", "cdimf", *arguments], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**clean, **(environ or {})})


NODE = """# a node with three mistakes
domain = "sport"
train_path = "train.csv"
trian_path = "oops.csv"
aggregator = "no-port"
state_dir = "state"
secret_file = "secret"

[ials]
alpha = 0.1
rank = 0

[tls]
insecure = true
"""


def _line(text: str, start: str) -> int:
    """1-based number of the first line of `text` that starts with `start`."""
    return next(number for number, line in enumerate(text.splitlines(), start=1) if line.startswith(start))


def test_all_errors_of_a_node_file_at_once_with_their_lines(tmp_path: Path) -> None:
    """serve-node reports the unknown key, the bad address and the bad rank together, each at its line; nothing blames the environment."""
    config = tmp_path / "node.toml"
    config.write_text(NODE)
    done = _cdimf("serve-node", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert f"{config}:{_line(NODE, 'trian_path')}: field trian_path: Extra inputs are not permitted" in done.stderr
    assert f"{config}:{_line(NODE, 'aggregator')}: field aggregator:" in done.stderr and "not host:port" in done.stderr
    assert f"{config}:{_line(NODE, 'rank = 0')}: field ials.rank: Input should be greater than or equal to 1" in done.stderr
    assert "environment" not in done.stderr and "CDIMF_" not in done.stderr


def test_the_flag_or_the_variable_actually_set_is_named(tmp_path: Path) -> None:
    """A bad flag is named as the flag, a bad variable as the variable; the file's own errors keep the file's lines."""
    config = tmp_path / "node.toml"
    text = NODE.replace('trian_path = "oops.csv"\n', "").replace('"no-port"', '"127.0.0.1:7070"')
    config.write_text(text)
    flagged = _cdimf("serve-node", "--config", str(config), "--ials-rank", "4", "--rpc-timeout-s", "-1")
    assert flagged.returncode == 2
    assert "option --rpc-timeout-s: field rpc_timeout_s: Input should be greater than 0" in flagged.stderr
    assert "ials.rank" not in flagged.stderr  # the flag replaced the file's bad rank
    variable = _cdimf("serve-node", "--config", str(config), "--ials-rank", "4", environ={"CDIMF_IALS__ALPHA": "-3"})
    assert variable.returncode == 2
    assert "environment variable CDIMF_IALS__ALPHA: field ials.alpha: Input should be greater than 0" in variable.stderr


def test_a_missing_field_without_a_file_names_no_variable(tmp_path: Path) -> None:
    """With no file and nothing set, the error says so instead of blaming the environment."""
    done = _cdimf("serve-node", "--insecure", cwd=tmp_path)
    assert done.returncode == 2
    assert "defaults (no config file given): field train_path: Field required" in done.stderr
    assert "defaults (no config file given): field domain: Field required" in done.stderr
    assert "environment" not in done.stderr


def test_binary_bytes_in_a_config_name_the_file(tmp_path: Path) -> None:
    """An undecodable file is refused naming the file, the line and the offset of the first bad byte."""
    config = tmp_path / "blob.toml"
    config.write_bytes(b'title = "x"\n\x89PNG\r\n\x1a\n\x00\x00')
    done = _cdimf("reproduce", str(config))
    assert done.returncode == 2
    assert f"{config}:2: not a TOML text file: byte 0x89 at offset 12 is not UTF-8" in done.stderr
    nul = tmp_path / "nul.toml"
    nul.write_bytes(b'title = "x"\x00\n')
    done = _cdimf("simulate", "--config", str(nul))
    assert done.returncode == 2 and f"{nul}: not valid TOML" in done.stderr


REPRODUCE = """title = "three mistakes"
[[domains]]
name = "a"
train_path = "a.csv"
test_path = "a_test.csv"
[[domains]]
name = "b"
train_path = "b.csv"
[evaluation]
k = 0
[stopping]
patience = 0
[joined]
rank = 0
"""


def test_a_reproduce_config_reports_every_problem_in_one_attempt(tmp_path: Path) -> None:
    """Only [[domains]] is required; bad values in three sections and a domain without test come back together."""
    config = tmp_path / "pair.toml"
    config.write_text(REPRODUCE)
    done = _cdimf("reproduce", str(config))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if str(config) in line]
    assert len(lines) == 4, done.stderr
    assert f"{config}:{_line(REPRODUCE, 'k = 0')}: field evaluation.k:" in done.stderr
    assert f"{config}:{_line(REPRODUCE, 'patience')}: field stopping.patience:" in done.stderr
    assert f"{config}:{_line(REPRODUCE, 'rank = 0')}: field joined.rank:" in done.stderr
    assert f"{config}:{_line(REPRODUCE, '[[domains]]')}: field domains: Value error, reproduce scores every domain on its test split" \
        in done.stderr
    only_title = tmp_path / "empty.toml"
    only_title.write_text('title = "nothing else"\n')
    done = _cdimf("reproduce", str(only_title))
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if "field" in line] == [
        f"cdimf: error: {only_title}: field domains: Field required"]


def test_the_former_data_table_says_where_its_fields_went(tmp_path: Path) -> None:
    """A config in the old [data] layout is refused at the [data] line with the new names."""
    config = tmp_path / "old.toml"
    text = '[data]\nformat = "csv"\n[[data.domains]]\nname = "a"\ntrain = "a.csv"\ntest = "t.csv"\n'
    config.write_text(text)
    done = _cdimf("reproduce", str(config))
    assert done.returncode == 2
    assert f"{config}:1: field data: Value error, the [data] table is gone: list each domain as [[domains]]" in done.stderr
    assert "valid_seed is now [stopping] valid_seed" in done.stderr
