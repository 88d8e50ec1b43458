"""The gateway's configuration: a frozen dataclass read from `GATEWAY_*` at start-up.

- `GATEWAY_HOST`, `GATEWAY_PORT`: where to listen (127.0.0.1, 8080).
- `GATEWAY_REGISTRY`: the registry's host:port; services are found and balanced
  through it.
- `GATEWAY_BACKENDS`: fixed targets, `pkg.Svc=host:port,pkg.Other=host:port`
  (they win over the registry).
- `GATEWAY_SERVICES`: services to expose, comma separated (default: every
  service with HTTP bindings outside the `testing` bounded context).
- `GATEWAY_AUTH`: `jwt` (verify bearer tokens at the gateway, the default) or
  `off` (the backends verify alone).
- `GATEWAY_JWT_SECRET` (HS256, with `GATEWAY_JWT_KID`, default `dev`) or
  `GATEWAY_JWKS_FILE`: the token keys; `GATEWAY_JWT_ISSUER` (comma separated),
  `GATEWAY_JWT_AUDIENCE`: claims a token must carry (not checked when unset).
- `GATEWAY_RATE_PER_S`, `GATEWAY_BURST`: limit per caller (the verified
  subject, else the client address) for methods whose contract sets none
  (100/s, burst 200).
- `GATEWAY_TRUSTED_PROXIES`: addresses or CIDRs whose `X-Forwarded-For` is
  believed (none: the peer address is the client).
- `GATEWAY_CORS_ORIGINS`: browser origins allowed (`*` for any; none by default).
- `GATEWAY_MAX_BODY_BYTES`: largest request body, 413 above (1 MiB).
- `GATEWAY_DEFAULT_TIMEOUT_S`: deadline of unary calls when neither the caller
  (`grpc-timeout`) nor the contract (`timeout_s`) sets one (30);
  `GATEWAY_MAX_TIMEOUT_S`: the most a caller may ask for (300).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["GatewayConfig"]

_AUTH_MODES = ("jwt", "off")


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway needs at start-up; safe defaults for local development."""

    host: str = "127.0.0.1"
    port: int = 8080
    registry: str | None = None
    backends: Mapping[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = ()
    auth: str = "jwt"
    jwt_secret: str | None = None
    jwt_kid: str = "dev"
    jwks_file: str | None = None
    jwt_issuer: tuple[str, ...] = ()
    jwt_audience: str | None = None
    rate_per_s: float = 100.0
    burst: int = 200
    trusted_proxies: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    default_timeout_s: float = 30.0
    max_timeout_s: float = 300.0
    title: str = "API"
    version: str = "v1"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"GatewayConfig.port must be 0..65535, got {self.port}")
        if self.auth not in _AUTH_MODES:
            raise ValueError(f"GatewayConfig.auth must be one of {_AUTH_MODES}, got {self.auth!r}")
        if self.auth == "jwt" and not (self.jwt_secret or self.jwks_file):
            raise ValueError(
                "GatewayConfig: auth 'jwt' needs the token keys: set jwt_secret "
                "(GATEWAY_JWT_SECRET) or jwks_file (GATEWAY_JWKS_FILE), or turn gateway "
                "verification off with auth='off' (GATEWAY_AUTH=off; backends still verify)"
            )
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            raise ValueError("GatewayConfig.jwt_secret must be at least 32 bytes long")
        if not self.rate_per_s > 0:
            raise ValueError(f"GatewayConfig.rate_per_s must be > 0, got {self.rate_per_s}")
        if self.burst < 1:
            raise ValueError(f"GatewayConfig.burst must be >= 1, got {self.burst}")
        if self.max_body_bytes < 1:
            raise ValueError(
                f"GatewayConfig.max_body_bytes must be >= 1, got {self.max_body_bytes}"
            )
        if not 0 < self.default_timeout_s <= self.max_timeout_s:
            raise ValueError(
                "GatewayConfig: need 0 < default_timeout_s <= max_timeout_s, got "
                f"{self.default_timeout_s} and {self.max_timeout_s}"
            )
        for name, target in self.backends.items():
            if ":" not in target:
                raise ValueError(
                    f"GatewayConfig.backends[{name!r}] must be host:port, got {target!r}"
                )
        if self.registry is None and not self.backends:
            raise ValueError(
                "GatewayConfig: give a registry (GATEWAY_REGISTRY / --registry) or fixed "
                "backends (GATEWAY_BACKENDS / --backend service=host:port)"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> GatewayConfig:
        """Read `GATEWAY_*` over the defaults; keyword `overrides` (from the CLI) win."""
        env = os.environ if environ is None else environ

        def get(key: str) -> str | None:
            value = env.get(f"GATEWAY_{key}")
            return value if value not in (None, "") else None

        backends: dict[str, str] = {}
        for pair in _split(get("BACKENDS")):
            service, sep, target = pair.partition("=")
            if not sep:
                raise ValueError(f"GATEWAY_BACKENDS: expected service=host:port, got {pair!r}")
            backends[service.strip()] = target.strip()
        values: dict[str, object] = {
            "host": get("HOST") or "127.0.0.1",
            "registry": get("REGISTRY"),
            "backends": backends,
            "services": _split(get("SERVICES")),
            "auth": get("AUTH") or "jwt",
            "jwt_secret": get("JWT_SECRET"),
            "jwt_kid": get("JWT_KID") or "dev",
            "jwks_file": get("JWKS_FILE"),
            "jwt_issuer": _split(get("JWT_ISSUER")),
            "jwt_audience": get("JWT_AUDIENCE"),
            "trusted_proxies": _split(get("TRUSTED_PROXIES")),
            "cors_origins": _split(get("CORS_ORIGINS")),
        }
        numbers = {
            "port": int,
            "rate_per_s": float,
            "burst": int,
            "max_body_bytes": int,
            "default_timeout_s": float,
            "max_timeout_s": float,
        }
        for name, convert in numbers.items():
            raw = get(name.upper())
            if raw is not None:
                try:
                    values[name] = convert(raw)
                except ValueError:
                    raise ValueError(f"GATEWAY_{name.upper()}: not a number: {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
