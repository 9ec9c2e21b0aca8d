"""The committed gRPC code must be what grpc_tools makes of tandem.proto today."""
from pathlib import Path

from tandem.proto.generate import GENERATED, PROTO_DIR, generate


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    stale = [p.name for p in fresh if p.read_bytes() != (PROTO_DIR / p.name).read_bytes()]
    assert not stale, f"{stale} are stale: run `python -m tandem.proto.generate` and commit the result"
    assert sorted(p.name for p in fresh) == sorted(GENERATED)


def test_generated_modules_import_as_a_package() -> None:
    from tandem.proto import tandem_pb2, tandem_pb2_grpc

    assert tandem_pb2.DESCRIPTOR.package == "tandem.v1"
    assert hasattr(tandem_pb2_grpc, "WorkerStub") and hasattr(tandem_pb2_grpc, "WorkerServicer")
    names = {m.name for m in tandem_pb2.DESCRIPTOR.services_by_name["Worker"].methods}
    assert {"Prefill", "Generate", "Release", "Abort", "Drain", "Stats", "GetTransferMetadata"} <= names
