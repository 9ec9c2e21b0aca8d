"""Regenerate the Python code of tandem.proto: `python -m tandem.proto.generate`.

The generated modules are committed, so that installing Tandem needs no protoc; a test
(tests/test_proto_generated.py) regenerates them into a temporary folder and fails when the
committed copies are stale. The .proto is compiled from a temporary root where it sits at
`tandem/proto/tandem.proto`, so that the generated gRPC module imports its messages as
`tandem.proto.tandem_pb2` (grpc_tools writes a bare `import tandem_pb2` otherwise).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "tandem.proto"
GENERATED = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile tandem.proto into out_dir; returns the generated files."""
    with tempfile.TemporaryDirectory() as root:
        package_dir = Path(root) / "tandem" / "proto"
        package_dir.mkdir(parents=True)
        shutil.copy(PROTO_FILE, package_dir / PROTO_FILE.name)
        # protoc runs in its own process: inside a process that has loaded torch, NIXL and the
        # protobuf runtime it has crashed (segfault), and it needs nothing from this one.
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            f"tandem/proto/{PROTO_FILE.name}",
        ]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}: {result.stderr.strip()}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(package_dir / name, out_dir / name)) for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
