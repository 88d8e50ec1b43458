"""Development tokens: `python -m framework token` and `mint_token` sign what verifiers accept."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from framework.auth.devtoken import SigningKey, mint_token
from framework.auth.keyset import JwksFile, KeySet, StaticKeys, VerificationKey
from framework.auth.verifier import JwtConfig, JwtVerifier
from framework.system.keys import USER_ISSUER, ensure_dev_keys

ROOT = Path(__file__).resolve().parents[2]


def _cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEWORK_TOKEN_")}
    environ["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "framework", "token", *args],
        cwd=cwd,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,  # a Python start-up on a loaded machine can take a minute
        check=False,
    )


def test_a_token_signed_with_a_secret_from_the_environment_verifies(tmp_path: Path) -> None:
    """--secret-env: HS256 with the secret the server also holds; scopes in the scope claim."""
    secret = secrets.token_urlsafe(32)
    done = _cli(
        "--sub", "alice", "--scopes", "orders:read,orders:write", "--secret-env", "MY_SECRET",
        "--kid", "k1", "--audience", "orders",
        cwd=tmp_path, env={"MY_SECRET": secret},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "scope=orders:read orders:write" in done.stderr
    keys = KeySet(StaticKeys([VerificationKey.hmac("k1", secret)]))
    principal = JwtVerifier(keys, JwtConfig(issuer=None, audience="orders")).verify(
        done.stdout.strip()
    )
    assert principal.subject == "alice"
    assert principal.scopes == frozenset({"orders:read", "orders:write"})


def test_the_system_s_development_keys_are_the_default(tmp_path: Path) -> None:
    """Next to a manifest, the user signing key `make run` created signs for that system."""
    manifest = (
        '[system]\nname = "shop"\ndata_dir = "data"\n'
        '[services.a]\nmodule = "a.main"\nregisters = ["a.v1.AService"]\n'
    )
    (tmp_path / "system.toml").write_text(manifest)
    files = ensure_dev_keys(tmp_path / "data" / "keys")
    done = _cli("--sub", "bob", "--scopes", "orders:read", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    verifier = JwtVerifier(KeySet(JwksFile(files.jwks)), JwtConfig(USER_ISSUER, "shop"))
    principal = verifier.verify(done.stdout.strip())
    assert (principal.subject, principal.scopes) == ("bob", frozenset({"orders:read"}))


def test_without_a_key_it_says_where_one_comes_from(tmp_path: Path) -> None:
    """No key, no manifest: exit 2 naming every way to give one; nothing on stdout."""
    done = _cli("--sub", "carol", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    for words in ("--key", "--secret-env", "FRAMEWORK_TOKEN_KEY", "FRAMEWORK_TOKEN_SECRET"):
        assert words in done.stderr
    short = _cli("--sub", "carol", cwd=tmp_path, env={"FRAMEWORK_TOKEN_SECRET": "short"})
    assert short.returncode == 2 and "at least 32" in short.stderr


def test_mint_token_refuses_what_would_fail_later() -> None:
    """A str of scopes, a short secret or a PEM as secret are refused when minting."""
    key = SigningKey.hmac("s" * 32, "k1")
    with pytest.raises(TypeError, match="list of scope names"):
        mint_token(key, "dave", "orders:read")
    with pytest.raises(ValueError, match="at least 32"):
        SigningKey.hmac("short", "k1")
    with pytest.raises(ValueError, match="PEM key"):
        SigningKey.hmac("-----BEGIN PRIVATE KEY-----" + "x" * 40, "k1")
