"""The built wheel is one import package that runs its own defaults from any folder."""

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from test_reproduce import CONFIG, write_pair

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, a fresh venv with only that wheel installed); dependencies come from this environment."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder / "dist"), str(REPO_ROOT)],
        check=True, timeout=300, cwd=folder,
    )
    (wheel,) = (folder / "dist").glob("cdimf-*.whl")
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    # The dependencies (numpy, grpcio, ...) are this environment's: a path line, not a site dir,
    # so this environment's editable cdimf (a .pth import hook) does not come along.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "outer_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return wheel, venv


def _run(venv: Path, cwd: Path, *command: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """A command of the venv, run from `cwd` (outside the checkout)."""
    return subprocess.run([str(venv / "bin" / command[0]), *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def test_wheel_holds_one_top_level_package(installed: tuple[Path, Path]) -> None:
    """Every file of the wheel lies under cdimf/ (or its metadata), configs and pairs included."""
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"cdimf", next(top for top in tops if top.endswith(".dist-info"))}, tops
    assert "cdimf/configs/warm-sport-cloth.toml" in names
    assert "cdimf/data/amazon-cdr/LICENSE" in names
    assert "cdimf/data/amazon-cdr/warm-start_sport_cloth/sport_cloth/train.txt" in names
    assert "cdimf/common/core/ials_kernel.c" in names


def test_installed_package_runs_from_any_folder(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """From a folder outside the checkout: `import common` fails, shipped configs resolve, simulate runs a round."""
    _, venv = installed
    assert _run(venv, tmp_path, "python", "-c", "import common").returncode != 0
    located = _run(venv, tmp_path, "python", "-c", "import cdimf, cdimf.resources as r; print(cdimf.__file__); print(r.config_path('warm-sport-cloth'))")
    assert located.returncode == 0, located.stderr
    package_file, config = located.stdout.split()
    assert not Path(package_file).is_relative_to(REPO_ROOT) and Path(config).is_file() and not Path(config).is_relative_to(REPO_ROOT)
    # every file a shipped config names is installed (the configs reach the data by relative paths)
    checked = _run(venv, tmp_path, "python", "-c", (
        "from cdimf.reproduce_config import load_reproduce_config; from cdimf.resources import config_path, shipped_configs\n"
        "for name in shipped_configs():\n"
        "    for d in load_reproduce_config(config_path(name)).domains:\n"
        "        for path in (d.train_path, d.test_path, d.valid_path):\n"
        "            assert path is None or path.is_file(), path\n"
        "        print(name, d.name, d.train_path)\n"))
    assert checked.returncode == 0, checked.stderr
    assert len(checked.stdout.splitlines()) == 4 and all("site-packages" in line for line in checked.stdout.splitlines())
    helped = _run(venv, tmp_path, "cdimf", "reproduce", "--help")
    assert helped.returncode == 0 and "warm-sport-cloth" in helped.stdout, helped.stderr
    simulated = _run(venv, tmp_path, "cdimf", "simulate", "--rounds", "1", "--insecure", "--json")
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    result = json.loads(simulated.stdout)
    assert result["rounds"] == 1 and sorted(result["admitted"]) == ["cloth", "sport"]
    # every test row of the embedded pair was scored: as many users as the shipped test files have lines
    pair = REPO_ROOT / "data" / "amazon-cdr" / "warm-start_sport_cloth"
    for domain, folder in (("sport", "sport_cloth"), ("cloth", "cloth_sport")):
        lines = len((pair / folder / "test.txt").read_text().splitlines())
        assert result["domains"][domain]["users"] == lines
    # the tuner on a pair given only by paths, its tuned config written beside it
    write_pair(tmp_path)
    (tmp_path / "pair.toml").write_text(CONFIG)
    tuned = _run(venv, tmp_path, "cdimf", "tune", "pair.toml", "--models", "joined", "--trials", "2", "--json")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert len(json.loads(tuned.stdout)["trials"]) == 2 and (tmp_path / "pair-tuned.toml").is_file()
