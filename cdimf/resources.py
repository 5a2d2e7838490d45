"""What the wheel ships beside the code: the reproduction configs and the embedded Amazon pairs.

Found through importlib.resources, so `cdimf reproduce warm-sport-cloth` and `cdimf simulate`
work from any folder after a non-editable install, not only inside the checkout.
"""

from importlib import resources
from pathlib import Path

CONFIG_SUFFIX = ".toml"


def _package_folder(package: str) -> Path:
    """The on-disk folder of a package that ships data (installed packages are plain folders)."""
    return Path(str(resources.files(package)))


def embedded_data_root() -> Path:
    """The folder of the embedded Amazon pairs (MIT licence, see its LICENSE file)."""
    return _package_folder("cdimf.data") / "amazon-cdr"


def embedded_pair(name: str) -> Path:
    """One embedded pair's folder, e.g. `warm-start_sport_cloth`; FileNotFoundError naming the known ones."""
    folder = embedded_data_root() / name
    if not folder.is_dir():
        known = sorted(entry.name for entry in embedded_data_root().iterdir() if entry.is_dir())
        raise FileNotFoundError(f"no embedded pair {name!r}; shipped: {', '.join(known)}")
    return folder


def shipped_configs() -> dict[str, Path]:
    """The shipped reproduction configs by name (file name without .toml)."""
    folder = _package_folder("cdimf.configs")
    return {path.stem: path for path in sorted(folder.glob(f"*{CONFIG_SUFFIX}"))}


def config_path(name_or_path: str | Path) -> Path:
    """A reproduction config: an existing file as given, else a shipped config of that name.

    A path that does not exist and names no shipped config raises FileNotFoundError listing the
    shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    key = path.name.removesuffix(CONFIG_SUFFIX) if path.parent == Path(".") else None
    if key is not None and key in shipped:
        return shipped[key]
    raise FileNotFoundError(f"{name_or_path}: no such file, and no shipped config of that name (shipped: {', '.join(shipped)})")
