"""The committed generated protocol code matches what protos/generate.py produces from the .proto."""

from pathlib import Path

from cdimf.protos.generate import REPO_ROOT, generate, generated_paths


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """Regenerate into a temporary folder; every committed file must be byte-identical."""
    fresh = generate(tmp_path)
    committed = generated_paths(REPO_ROOT)
    assert len(fresh) == len(committed) > 0
    stale = [
        str(old.relative_to(REPO_ROOT))
        for new, old in zip(fresh, committed)
        if not old.exists() or new.read_bytes() != old.read_bytes()
    ]
    assert not stale, f"generated code is stale, run `python -m cdimf.protos.generate`: {stale}"


def test_generated_code_imports_as_package() -> None:
    """The grpc module imports the messages through the package path, not a top-level module."""
    from cdimf.protos.v1 import federation_pb2, federation_pb2_grpc

    assert federation_pb2.DESCRIPTOR.package == "cdimf.v1"
    assert hasattr(federation_pb2_grpc, "AggregatorStub") and hasattr(federation_pb2_grpc, "DomainNodeStub")
    grpc_source = Path(federation_pb2_grpc.__file__).read_text()
    assert "from cdimf.protos.v1 import federation_pb2" in grpc_source
