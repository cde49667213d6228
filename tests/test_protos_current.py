"""The committed stubs in server/api/gen/ are exactly what the protos generate today."""
from __future__ import annotations

import ast
from pathlib import Path

from google.protobuf import descriptor_pb2

from server.api import protogen


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _descriptor(pb2_file: Path) -> descriptor_pb2.FileDescriptorProto:
    """The serialized FileDescriptorProto embedded in a generated _pb2.py."""
    src = pb2_file.read_text()
    start = src.index("AddSerializedFile(") + len("AddSerializedFile(")
    end = src.index(")\n", start)
    blob = ast.literal_eval(src[start:end])  # a bytes literal written by protoc
    return descriptor_pb2.FileDescriptorProto.FromString(blob)


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    assert protogen.proto_files(), "no .proto files found under protos/loraserve/v1"
    protogen.generate(tmp_path)
    fresh, committed = _tree(tmp_path), _tree(protogen.GEN_DIR)
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make protos`"
    stamp = committed[protogen.STAMP_NAME].decode().strip()
    if stamp == f"grpcio-tools {protogen.tools_version()}":
        for name in fresh:
            assert fresh[name] == committed[name], f"{name} is stale: run `make protos`"
    else:
        # Another grpcio-tools formats the same schema differently; the schema itself must match.
        for name in fresh:
            if name.endswith("_pb2.py"):
                assert _descriptor(tmp_path / name) == _descriptor(protogen.GEN_DIR / name), \
                    f"{name} does not match its .proto: run `make protos`"


def test_stubs_import_as_a_subpackage() -> None:
    from server.api.gen.loraserve.v1 import adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "loraserve.v1"
    assert {m.name for m in inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods} >= {
        "Generate", "GenerateStream", "Tokenize", "ModelInfo"}
    assert hasattr(inference_pb2_grpc, "InferenceStub") and hasattr(adapters_pb2_grpc, "AdaptersStub")
