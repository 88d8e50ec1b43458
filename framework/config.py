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


def _flag(environ: Mapping[str, str], key: str, default: bool) -> bool:
    value = (_env(environ, key) or "").lower()
    if not value:
        return default
    if value not in ("0", "1", "true", "false"):
        raise ValueError(f"{key} must be 1 or 0, got {value!r}")
    return value in ("1", "true")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How a server binds and drains. Defaults are safe for local development."""

    name: str = "service"
    host: str = "127.0.0.1"
    port: int = 0
    grace_s: float = 10.0
    # between health NOT_SERVING and refusing new calls, so load balancers polling health
    # see the drain first (SERVICE_DRAIN_DELAY_S; skipped by stop(grace_s=0))
    drain_delay_s: float = 0.5
    reflection: bool = True
    health: bool = True
    # Calls (unary and streams) served at once; more are refused at once with
    # RESOURCE_EXHAUSTED by grpc, so idle streams cannot pile up without bound. None: no limit.
    max_concurrent_rpcs: int | None = 1000
    # HTTP/2 streams one connection may open at once (announced to the client, which queues
    # the rest). None: grpc's default (no limit beyond max_concurrent_rpcs).
    max_concurrent_streams: int | None = None
    # SO_REUSEPORT: off, so no other process can bind the same port; worker processes
    # (`framework.workers`) turn it on to share one port.
    reuse_port: bool = False
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
        if self.max_concurrent_streams is not None and self.max_concurrent_streams < 1:
            raise ValueError("ServerConfig.max_concurrent_streams must be >= 1 or None")

    @property
    def channel_options(self) -> list[tuple[str, str | int]]:
        """grpc server options: the limits and SO_REUSEPORT above, then `grpc_options`."""
        options: list[tuple[str, str | int]] = [("grpc.so_reuseport", int(self.reuse_port))]
        if self.max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        return [*options, *self.grpc_options]

    @classmethod
    def from_env(
        cls, name: str, environ: Mapping[str, str] | None = None, prefix: str = "SERVICE_"
    ) -> ServerConfig:
        """Read `<PREFIX>HOST`, `PORT`, `GRACE_S`, `DRAIN_DELAY_S`, `INSECURE_DEV`,
        `MAX_CONCURRENT_RPCS` (0: no limit), `REFLECTION` over the defaults; `REFLECTION`
        falls back to `FRAMEWORK_REFLECTION` (`=0` switches reflection off on every server
        of a deployment). Flags take 1/0/true/false."""
        env = os.environ if environ is None else environ
        defaults = cls(name=name)
        host = _env(env, f"{prefix}HOST") or defaults.host
        port = _env(env, f"{prefix}PORT")
        grace = _env(env, f"{prefix}GRACE_S")
        drain = _env(env, f"{prefix}DRAIN_DELAY_S")
        rpcs = _env(env, f"{prefix}MAX_CONCURRENT_RPCS")
        reflection_key = (
            f"{prefix}REFLECTION" if _env(env, f"{prefix}REFLECTION") else "FRAMEWORK_REFLECTION"
        )
        try:
            max_rpcs = defaults.max_concurrent_rpcs
            if rpcs is not None:
                max_rpcs = int(rpcs) or None
            return cls(
                name=name,
                host=host,
                port=int(port) if port else defaults.port,
                grace_s=float(grace) if grace else defaults.grace_s,
                drain_delay_s=float(drain) if drain else defaults.drain_delay_s,
                insecure_dev=_flag(env, f"{prefix}INSECURE_DEV", False),
                reflection=_flag(env, reflection_key, defaults.reflection),
                max_concurrent_rpcs=max_rpcs,
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
