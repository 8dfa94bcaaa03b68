"""The committed gRPC stubs must be exactly what `make protos` generates from protos/ (drift guard)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = ["llmwatts_pb2.py", "llmwatts_pb2.pyi", "llmwatts_pb2_grpc.py"]


def test_committed_stubs_match_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(REPO / "protos/llmwatts/v1/llmwatts.proto")],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "llmwatts/v1" / name).read_text()
        committed = (REPO / "protos/llmwatts/v1" / name).read_text()
        assert fresh == committed, f"protos/llmwatts/v1/{name} is stale: run `make protos` and commit"


def test_package_is_versioned():
    from llmwatts.v1 import llmwatts_pb2

    assert llmwatts_pb2.DESCRIPTOR.package == "llmwatts.v1"
    services = set(llmwatts_pb2.DESCRIPTOR.services_by_name)
    assert {"Inference", "Control"} <= services
