"""`make protos`: deterministic output whose imports live under gen/."""

from __future__ import annotations

from pathlib import Path

from framework.codegen import CodegenConfig, generate

ROOT = Path(__file__).resolve().parents[2]


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generation_is_deterministic_and_matches_the_committed_gen(tmp_path: Path) -> None:
    """Two runs give identical files, equal to the committed gen/; a re-run changes nothing."""
    first, second = tmp_path / "a", tmp_path / "b"
    generate(CodegenConfig(proto_root=ROOT / "protos", out_dir=first))
    generate(CodegenConfig(proto_root=ROOT / "protos", out_dir=second))
    assert _tree(first) == _tree(second)
    assert generate(CodegenConfig(proto_root=ROOT / "protos", out_dir=first)) == []
    assert _tree(first) == _tree(ROOT / "gen")


def test_imports_of_our_contracts_point_into_gen(tmp_path: Path) -> None:
    """Generated modules import each other as gen.<pkg>.v1, never as bare top-level names."""
    generate(CodegenConfig(proto_root=ROOT / "protos", out_dir=tmp_path))
    text = (tmp_path / "echo" / "v1" / "echo_pb2.py").read_text()
    assert "from gen.framework.v1 import options_pb2" in text
    assert "from framework.v1" not in text


def test_stale_generated_files_are_removed(tmp_path: Path) -> None:
    """A module whose proto was deleted disappears from the output."""
    stale = tmp_path / "old" / "v1" / "gone_pb2.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("# stale\n")
    changed = generate(CodegenConfig(proto_root=ROOT / "protos", out_dir=tmp_path))
    assert stale in changed and not stale.exists() and not stale.parent.exists()
