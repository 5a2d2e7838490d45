"""Regenerate the Python code and type stubs of protos/v1/*.proto: `python -m cdimf.protos.generate [OUT_DIR]`.

Generated files are committed; tests/test_protos_fresh.py regenerates into a temporary folder
and fails when the committed files differ, so edit the .proto, run this, commit both.
"""

import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ("protos/v1/federation.proto",)
# protoc sees protos/ as cdimf/protos/, so generated code imports `cdimf.protos.v1...`, the
# installed package path; files are written under OUT_DIR/cdimf/ and moved to OUT_DIR/protos/.
VIRTUAL_ROOT = "cdimf/protos"
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
    paths: list[Path] = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        paths.extend(out_dir / f"{stem}{suffix}" for suffix in GENERATED_SUFFIXES)
    return paths


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc with the python, grpc and mypy plugins; returns the written files."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={VIRTUAL_ROOT}={REPO_ROOT / 'protos'}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={scratch}",
            f"--mypy_grpc_out={scratch}",
            *(str(REPO_ROOT / proto) for proto in PROTO_FILES),
        ]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status} on {', '.join(PROTO_FILES)}")
        written = generated_paths(out_dir)
        for target in written:
            source = Path(scratch) / "cdimf" / target.relative_to(out_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return written


def main() -> None:
    """Command-line entry: generate into the given folder (default: the repository)."""
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    for path in generate(out):
        print(path)


if __name__ == "__main__":
    main()
