"""Compile `.proto` contracts into importable Python packages (`make protos`).

protoc names generated imports after the proto path (`from order.v1 import ...`),
which would collide with top-level packages such as `framework`.  This module
compiles into a scratch directory, rewrites imports of the project's own
contracts to live under the output package (`from gen.order.v1 import ...`),
adds `__init__.py` files, and then syncs the result into the output directory:
only changed files are written and stale ones removed, so running it twice
leaves no diff and a concurrent reader never sees a half-empty tree.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_DESCRIPTOR_SET = "contracts.binpb"
# The contracts' comments by full name (generated descriptors carry none), e.g. for
# the gateway's OpenAPI descriptions: {"inventory.v1.Stock.sku": "Stock keeping unit..."}.
COMMENTS_FILE = "comments.json"
# Paths into a FileDescriptorProto (field numbers), as source info locations name them.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM, _ENUM_VALUE, _METHOD = 2, 3, 4, 2, 2


@dataclass(frozen=True, slots=True)
class CodegenConfig:
    """Where contracts are read from and where generated packages go."""

    proto_root: Path
    out_dir: Path
    package: str = "gen"

    def __post_init__(self) -> None:
        if not self.package.isidentifier():
            raise ValueError(f"package must be a Python identifier, got {self.package!r}")


def include_dirs() -> list[Path]:
    """Directories holding google/protobuf/*.proto and google/rpc, google/api protos."""
    import grpc_tools

    dirs = [Path(grpc_tools.__file__).parent / "_proto"]
    purelib = Path(sysconfig.get_paths()["purelib"])
    if (purelib / "google" / "rpc" / "status.proto").exists():
        dirs.append(purelib)
    return dirs


# Roots under protos/ that declare other projects' contracts for buf only (google/api:
# the `google.api.http` option); their Python modules come from their own packages
# (googleapis-common-protos), so they are imported, never compiled.
EXTERNAL_ROOTS = frozenset({"google"})
# Roots under protos/ that hold other projects' contracts printed from a descriptor a
# package carries (buf/validate/validate.proto from protovalidate): compiled into gen/
# like ours, but neither linted nor documented as ours.
VENDORED_ROOTS = frozenset({"buf"})
PROTOVALIDATE_PROTO = Path("buf/validate/validate.proto")


def contract_files(proto_root: Path) -> list[Path]:
    """The project's own .proto files under `proto_root` (relative paths, sorted)."""
    found = (p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))
    return sorted(p for p in found if p.parts[0] not in EXTERNAL_ROOTS | VENDORED_ROOTS)


def protovalidate_source() -> str:
    """`buf/validate/validate.proto` as .proto source, printed from protovalidate's descriptor.

    The protovalidate package ships the file only as a serialized FileDescriptorProto;
    protoc and buf read contracts and their imports from source, so `make protos`
    prints it into `protos/buf/validate/` (offline: nothing is downloaded).
    """
    from importlib.metadata import version

    from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2
    from protovalidate._gen.buf.validate import validate_pb

    from framework.protosource import print_proto

    file = descriptor_pb2.FileDescriptorProto.FromString(validate_pb.desc().proto.to_binary())
    deps = [
        descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2)
    ]
    header = [
        f"Printed by `make protos` from the descriptor of protovalidate {version('protovalidate')}",
        "(framework.codegen.protovalidate_source); do not edit. The rules contracts",
        "import as `buf.validate`, for protoc and buf. Comments are not in a",
        "descriptor: see the protovalidate documentation for each rule.",
        "",
        "Copyright 2023-2026 Buf Technologies, Inc. Licensed under the Apache License,",
        "Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).",
    ]
    return print_proto(file, deps, header)


def vendor_protovalidate(proto_root: Path) -> bool:
    """Write `buf/validate/validate.proto` under `proto_root`; return whether it changed."""
    target = proto_root / PROTOVALIDATE_PROTO
    text = protovalidate_source()
    if target.exists() and target.read_text() == text:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return True


def _plugin(name: str) -> Path | None:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def _rewrite_imports(text: str, roots: set[str], package: str) -> str:
    """Point imports of the project's own contracts at `<package>.<root>...`."""
    alternation = "|".join(sorted(re.escape(r) for r in roots))
    pattern = re.compile(rf"^(\s*)(from|import) ({alternation})(\.|\s)", re.MULTILINE)
    return pattern.sub(lambda m: f"{m[1]}{m[2]} {package}.{m[3]}{m[4]}", text)


def generate(config: CodegenConfig) -> list[Path]:
    """Compile every proto under `config.proto_root`; return the files that changed."""
    from grpc_tools import protoc

    protos = contract_files(config.proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {config.proto_root}")
    vendor_protovalidate(config.proto_root)
    protos.append(PROTOVALIDATE_PROTO)
    roots = {p.parts[0] for p in protos}
    with tempfile.TemporaryDirectory(prefix="protos-") as scratch_name:
        scratch = Path(scratch_name)
        args = [
            "grpc_tools.protoc",
            f"-I{config.proto_root}",
            *(f"-I{d}" for d in include_dirs()),
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            "--include_source_info",
            f"--descriptor_set_out={scratch / _DESCRIPTOR_SET}",
        ]
        mypy_plugin, mypy_grpc_plugin = _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc")
        if mypy_plugin and mypy_grpc_plugin:
            args += [
                f"--plugin=protoc-gen-mypy={mypy_plugin}",
                f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
                f"--mypy_out=quiet:{scratch}",
                f"--mypy_grpc_out=quiet:{scratch}",
            ]
        else:
            logger.warning("mypy-protobuf not installed: falling back to protoc's .pyi stubs")
            args.append(f"--pyi_out={scratch}")
        args += [str(p) for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see its messages above")
        wanted: dict[Path, bytes] = {}
        for path in sorted(scratch.rglob("*")):
            if path.is_file() and path.name.endswith(_GENERATED_SUFFIXES):
                rel = path.relative_to(scratch)
                text = _rewrite_imports(path.read_text(), roots, config.package)
                wanted[rel] = text.encode()
        for rel in list(wanted):
            for parent in rel.parents:
                if parent != Path():
                    wanted.setdefault(parent / "__init__.py", b"")
        wanted[Path("__init__.py")] = b'"""Generated by `make protos`; do not edit."""\n'
        wanted[Path("py.typed")] = b""
        descriptor_set = (scratch / _DESCRIPTOR_SET).read_bytes()
        wanted[Path(COMMENTS_FILE)] = contract_comments(descriptor_set).encode()
    return _sync(config.out_dir, wanted)


def contract_comments(descriptor_set: bytes) -> str:
    """JSON of every leading comment in a FileDescriptorSet with source info, by full name."""
    from google.protobuf import descriptor_pb2

    names: dict[tuple[str, tuple[int, ...]], str] = {}

    def message(file: str, path: tuple[int, ...], prefix: str, msg: Any) -> None:
        name = f"{prefix}.{msg.name}"
        names[(file, path)] = name
        for i, field in enumerate(msg.field):
            names[(file, (*path, _FIELD, i))] = f"{name}.{field.name}"
        for i, nested in enumerate(msg.nested_type):
            message(file, (*path, _NESTED, i), name, nested)
        for i, enum in enumerate(msg.enum_type):
            enumeration(file, (*path, _NESTED_ENUM, i), name, enum)

    def enumeration(file: str, path: tuple[int, ...], prefix: str, enum: Any) -> None:
        names[(file, path)] = f"{prefix}.{enum.name}"
        for i, value in enumerate(enum.value):
            names[(file, (*path, _ENUM_VALUE, i))] = f"{prefix}.{enum.name}.{value.name}"

    comments: dict[str, str] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file:
        for i, msg in enumerate(file.message_type):
            message(file.name, (_MESSAGE, i), file.package, msg)
        for i, enum in enumerate(file.enum_type):
            enumeration(file.name, (_ENUM, i), file.package, enum)
        for i, service in enumerate(file.service):
            full = f"{file.package}.{service.name}"
            names[(file.name, (_SERVICE, i))] = full
            for j, method in enumerate(service.method):
                names[(file.name, (_SERVICE, i, _METHOD, j))] = f"{full}.{method.name}"
        for location in file.source_code_info.location:
            name = names.get((file.name, tuple(location.path)))
            text = " ".join(line.strip() for line in location.leading_comments.splitlines())
            if name is not None and text.strip():
                comments[name] = text.strip()
    return json.dumps(comments, indent=0, sort_keys=True, ensure_ascii=False) + "\n"


def _sync(out_dir: Path, wanted: dict[Path, bytes]) -> list[Path]:
    changed: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel, data in sorted(wanted.items()):
        target = out_dir / rel
        if target.exists() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        changed.append(target)
    for path in sorted(out_dir.rglob("*"), reverse=True):
        rel = path.relative_to(out_dir)
        if path.is_file() and rel not in wanted and "__pycache__" not in rel.parts:
            path.unlink()
            changed.append(path)
        elif path.is_dir() and path.name != "__pycache__" and not any(path.iterdir()):
            path.rmdir()
    return changed
