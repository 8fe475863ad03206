"""The committed generated gRPC modules match a fresh protoc run on the committed .proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from replay.proto import generate


def test_committed_generated_code_is_current():
    assert generate.stale_files() == []


def test_a_changed_proto_is_detected_as_stale(tmp_path: Path):
    # The check must be able to fail: compare against a proto with one more field.
    for name in (generate.PROTO_FILE, *generate.GENERATED):
        shutil.copyfile(generate.PROTO_DIR / name, tmp_path / name)
    proto = tmp_path / generate.PROTO_FILE
    proto.write_text(proto.read_text().replace("message InfoRequest {}", "message InfoRequest { string t = 1; }"))
    assert generate.stale_files(proto_dir=tmp_path) == ["replay_pb2.py"]


def test_generated_grpc_module_imports_package_relative():
    text = (generate.PROTO_DIR / "replay_pb2_grpc.py").read_text()
    assert "from . import replay_pb2 as replay__pb2" in text
    assert "\nimport replay_pb2" not in text
