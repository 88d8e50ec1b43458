"""The dev CA's key files: never world-readable, never written through a planted symlink."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework.auth import devca
from framework.auth.devca import DevCA


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0, as in a careless shell: modes come only from the code."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_private_key_is_0600_and_certificate_0644(tmp_path: Path, open_umask: None) -> None:
    """Keys are created 0600 (not chmod-ed after a 0644 write); certificates 0644."""
    issued = DevCA.create().issue(dns=["localhost"])
    issued.write(tmp_path / "server.pem", tmp_path / "server.key")
    assert _mode(tmp_path / "server.key") == 0o600
    assert _mode(tmp_path / "server.pem") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key", "server.pem"]


def test_temporary_file_is_created_exclusively_with_its_final_mode(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temp file is opened O_CREAT|O_EXCL|O_NOFOLLOW at mode 0600 for a key."""
    seen: list[tuple[int, int]] = []
    real_open = os.open

    def spy(path: os.PathLike[str] | str, flags: int, mode: int = 0o777) -> int:
        seen.append((flags, mode))
        return real_open(path, flags, mode)

    monkeypatch.setattr(devca.os, "open", spy)
    DevCA.create().issue(dns=["localhost"]).write(tmp_path / "c.pem", tmp_path / "c.key")
    key_flags, key_mode = seen[0]
    assert key_mode == 0o600
    for flag in (os.O_CREAT, os.O_EXCL, os.O_NOFOLLOW):
        assert key_flags & flag


def test_planted_symlink_at_the_temporary_name_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker who predicts the temp name and plants a symlink gets a failed write,
    and the file the link points to is untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    monkeypatch.setattr(devca.secrets, "token_hex", lambda n: "predicted")
    (tmp_path / ".server.key.predicted.tmp").symlink_to(victim)
    issued = DevCA.create().issue(dns=["localhost"])
    with pytest.raises(FileExistsError):
        issued.write(tmp_path / "server.pem", tmp_path / "server.key")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "server.key").exists()


def test_symlink_at_the_destination_is_replaced_not_followed(tmp_path: Path) -> None:
    """A symlink at the key's path is replaced by the key; its target keeps its content."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "server.key").symlink_to(victim)
    DevCA.create().issue(dns=["localhost"]).write(tmp_path / "server.pem", tmp_path / "server.key")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "server.key").is_symlink()
    assert b"PRIVATE KEY" in (tmp_path / "server.key").read_bytes()
