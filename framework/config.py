"""Frozen configuration objects; the only place that reads os.environ (at start-up)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


def expect(value: object, kind: type | tuple[type, ...], what: str, example: str) -> None:
    """Refuse a constructor argument of the wrong type at once, saying what to pass.

    `what` names the argument (`JwtVerifier(keys)`), `example` shows a right one.
    """
    if not isinstance(value, kind):
        raise TypeError(f"{what} must be {example}, got {type(value).__name__}: {value!r:.80}")


def _env(environ: Mapping[str, str], key: str) -> str | None:
    value = environ.get(key)
    return value if value not in (None, "") else None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How a server binds and drains. Defaults are safe for local development."""

    name: str = "service"
    host: str = "127.0.0.1"
    port: int = 0
    grace_s: float = 10.0
    drain_delay_s: float = 0.0
    reflection: bool = True
    health: bool = True
    max_concurrent_rpcs: int | None = None
    grpc_options: tuple[tuple[str, str | int], ...] = ()
    # Development only: serve methods whose contract requires authentication (scopes,
    # auth_required) with no authentication policy; logged as a WARNING at start.
    insecure_dev: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ServerConfig.name must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be 0..65535, got {self.port}")
        if self.grace_s < 0:
            raise ValueError(f"ServerConfig.grace_s must be >= 0, got {self.grace_s}")
        if self.drain_delay_s < 0:
            raise ValueError(f"ServerConfig.drain_delay_s must be >= 0, got {self.drain_delay_s}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError("ServerConfig.max_concurrent_rpcs must be >= 1 or None")

    @classmethod
    def from_env(
        cls, name: str, environ: Mapping[str, str] | None = None, prefix: str = "SERVICE_"
    ) -> ServerConfig:
        """Read `<PREFIX>HOST`, `PORT`, `GRACE_S`, `DRAIN_DELAY_S`, `INSECURE_DEV` over the
        defaults (`INSECURE_DEV=1` turns on `insecure_dev`)."""
        env = os.environ if environ is None else environ
        defaults = cls(name=name)
        host = _env(env, f"{prefix}HOST") or defaults.host
        port = _env(env, f"{prefix}PORT")
        grace = _env(env, f"{prefix}GRACE_S")
        drain = _env(env, f"{prefix}DRAIN_DELAY_S")
        insecure = (_env(env, f"{prefix}INSECURE_DEV") or "0").lower()
        try:
            if insecure not in ("0", "1", "true", "false"):
                raise ValueError(f"{prefix}INSECURE_DEV must be 1 or 0, got {insecure!r}")
            return cls(
                name=name,
                host=host,
                port=int(port) if port else defaults.port,
                grace_s=float(grace) if grace else defaults.grace_s,
                drain_delay_s=float(drain) if drain else defaults.drain_delay_s,
                insecure_dev=insecure in ("1", "true"),
            )
        except ValueError as error:
            raise ValueError(f"bad {prefix}* environment setting: {error}") from error


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Channel settings for `framework.client.connect`."""

    # Deadline for calls whose method sets no `timeout_s` option and whose caller sets none.
    default_timeout_s: float | None = 30.0
    # Propagate the inbound call's remaining deadline to calls made while handling it.
    propagate_deadline: bool = True
    grpc_options: tuple[tuple[str, str | int], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.default_timeout_s is not None and self.default_timeout_s <= 0:
            raise ValueError(
                f"ClientConfig.default_timeout_s must be > 0 or None, got {self.default_timeout_s}"
            )
