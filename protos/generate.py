"""Regenerate the Python code and type stubs of protos/v1/*.proto: `python -m protos.generate [OUT_DIR]`.

Generated files are committed; tests/test_protos_fresh.py regenerates into a temporary folder
and fails when the committed files differ, so edit the .proto, run this, commit both.
"""

import shutil
import sys
import sysconfig
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ("protos/v1/federation.proto",)
# The files protoc writes per proto, relative to the output root.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    """Path of a protoc plugin installed next to this interpreter (mypy-protobuf's)."""
    candidates = [Path(sys.executable).parent / name, Path(sysconfig.get_path("scripts")) / name]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"protoc plugin {name} not found; install mypy-protobuf (pip install -e '.[dev]')")


def generated_paths(out_dir: Path) -> list[Path]:
    """Every file that generation writes under out_dir."""
    paths = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        paths.extend(out_dir / f"{stem}{suffix}" for suffix in GENERATED_SUFFIXES)
    return paths


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc with the python, grpc and mypy plugins; returns the written files."""
    out_dir = Path(out_dir)
    for proto in PROTO_FILES:
        (out_dir / proto).parent.mkdir(parents=True, exist_ok=True)
    # protoc resolves imports relative to the repo root, so the grpc module imports
    # `from protos.v1 import federation_pb2`, matching the installed package layout.
    args = [
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(REPO_ROOT / proto) for proto in PROTO_FILES),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {', '.join(PROTO_FILES)}")
    return generated_paths(out_dir)


def main() -> None:
    """Command-line entry: generate into the given folder (default: the repository)."""
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    for path in generate(out):
        print(path)


if __name__ == "__main__":
    main()
