"""buf/validate/validate.proto printed from protovalidate's descriptor compiles back to it."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from protovalidate._gen.buf.validate import validate_pb

from framework.codegen import PROTOVALIDATE_PROTO, include_dirs, protovalidate_source
from framework.protosource import print_proto
from framework.reference import compile_contracts

ROOT = Path(__file__).resolve().parents[2]


def _compile(root: Path, files: list[str], out: Path) -> descriptor_pb2.FileDescriptorSet:
    args = ["protoc", f"-I{root}", *(f"-I{d}" for d in include_dirs())]
    assert protoc.main([*args, f"--descriptor_set_out={out}", *files]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_the_committed_copy_is_the_installed_package_s() -> None:
    """protos/buf/validate/validate.proto is what `make protos` prints today (no drift)."""
    assert (ROOT / "protos" / PROTOVALIDATE_PROTO).read_text() == protovalidate_source()


def test_the_printed_file_compiles_to_the_package_s_descriptor(tmp_path: Path) -> None:
    """protoc reading the printed source gives byte for byte the descriptor the package carries."""
    target = tmp_path / PROTOVALIDATE_PROTO
    target.parent.mkdir(parents=True)
    target.write_text(protovalidate_source())
    compiled = _compile(tmp_path, [str(PROTOVALIDATE_PROTO)], tmp_path / "out.binpb").file[0]
    expected = descriptor_pb2.FileDescriptorProto.FromString(validate_pb.desc().proto.to_binary())
    assert compiled.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )


def test_every_contract_survives_a_print_and_compile_round_trip(tmp_path: Path) -> None:
    """The printer covers proto3 too: maps, oneofs, optional, streams, custom options."""
    contracts = compile_contracts(ROOT / "protos")
    ours = [f for f in contracts.file if not f.name.startswith(("google/", "buf/"))]
    by_name = {f.name: f for f in contracts.file}
    for file in contracts.file:
        if file.name.startswith("google/protobuf/"):
            continue
        deps: list[descriptor_pb2.FileDescriptorProto] = []
        for dep in contracts.file:  # imports come before their importers in the set
            if dep.name == file.name:
                break
            deps.append(dep)
        path = tmp_path / "src" / file.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(print_proto(file, deps))
    compiled = _compile(tmp_path / "src", [f.name for f in ours], tmp_path / "out.binpb")
    for file in compiled.file:
        original = descriptor_pb2.FileDescriptorProto()
        original.CopyFrom(by_name[file.name])
        original.ClearField("source_code_info")
        assert file == original, file.name
