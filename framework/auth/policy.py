"""Authentication and authorization: JWT bearer tokens and mTLS workload identity.

Server::

    keys = KeySet(JwksFile("/etc/keys/jwks.json"))           # rotates without restart
    verifier = JwtVerifier(keys, JwtConfig(issuer="https://id.example", audience="orders"))
    server = Server(config, policies=[AuthPolicy(verifier), ...])

    # in a servicer
    principal = current_principal()      # subject, scopes, claims, identity (mTLS)

`AuthPolicy` reads `authorization: Bearer <jwt>`.  What a method needs comes from
its contract (`framework.v1.method_policy`): `auth_required` (unset -> the
policy's default, required; `false` -> public) and `scopes` (all required).
Declared scopes always imply authentication: a method with scopes is never
public, whatever `auth_required` or `required_by_default` say.  Health
(`grpc.health.v1.Health`) and reflection (`grpc.reflection.*`) are open;
`framework.v1.HealthReportService` is public, and its detail goes only to
callers holding the `operator` scope (see `framework.health`).  The rules per
method are computed once, in `bind`.

Outcomes: no/malformed/invalid token -> `UnauthenticatedError` (UNAUTHENTICATED)
with a reason (`TOKEN_MISSING`, `TOKEN_MALFORMED`, `TOKEN_EXPIRED`,
`TOKEN_NOT_YET_VALID`, `TOKEN_BAD_SIGNATURE`, `TOKEN_WRONG_ISSUER`,
`TOKEN_WRONG_AUDIENCE`, `TOKEN_WRONG_TYPE`, `TOKEN_UNKNOWN_KEY`,
`TOKEN_ALGORITHM_REJECTED`); a valid
token without a scope -> `PermissionDeniedError` (`SCOPE_MISSING`).  Messages say
what is wrong and never contain the token or a key.  A token that is sent must
be valid, even on a public method.

Workload identity (mTLS, see `framework.auth.tls`): the peer certificate's URI SAN
(its SPIFFE ID; never a DNS name or the CN) is `principal.identity`.
`allowed_identities` maps method patterns to identity patterns (shell-style), or
is a callable `(method, identity) -> bool`; an allowed identity is authorized for that method
without a token.  A caller with a certificate whose identity is not allowed and
no token gets PERMISSION_DENIED (`IDENTITY_NOT_ALLOWED`).

Cost: the policy spends ~4-5 us per call with a repeated token: verified
tokens are cached by `framework.auth.verifier.JwtVerifier` until their `exp` (checked
on the clock on every hit) or until the key set changes; a first sight costs one
signature verification.  Rules per method are computed once, in `bind`.

Client::

    channel = connect(target, policies=[BearerToken("eyJ...")])
    channel = connect(target, policies=[BearerToken(provider=fetch_token)])

`fetch_token` is `async () -> IssuedToken`; the token is refreshed in the
background `refresh_before_s` before it expires; a call waits for a refresh
only when no valid token exists.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from framework.auth.bearer import BearerToken, IssuedToken
from framework.auth.tls import PeerIdentity
from framework.auth.verifier import JwtConfig, JwtVerifier, Principal
from framework.config import expect
from framework.errors import PermissionDeniedError, UnauthenticatedError
from framework.policy import BasePolicy, Call, Exit, Method, Side

__all__ = [
    "OPEN_SERVICES",
    "AuthPolicy",
    "BearerToken",
    "IssuedToken",
    "JwtConfig",
    "JwtVerifier",
    "Principal",
    "current_principal",
]

logger = logging.getLogger(__name__)

OPEN_SERVICES: tuple[str, ...] = (
    "grpc.health.v1.Health",
    "grpc.reflection.*",
)

_principal: ContextVar[Principal | None] = ContextVar("framework_principal", default=None)


def current_principal() -> Principal | None:
    """The verified caller of the call this task is handling; None when anonymous."""
    return _principal.get()


IdentityRule = Mapping[str, Iterable[str]] | Callable[[Method, str], bool]


@dataclass(frozen=True, slots=True)
class _Rule:
    """What one method needs, computed once in bind()."""

    method: str
    required: bool
    scopes: frozenset[str]
    identity_allowed: Callable[[str], bool] | None


class _IdentityMatcher:
    """Identity patterns of one method; answers cached per identity (identities are few)."""

    __slots__ = ("_known", "patterns")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._known: dict[str, bool] = {}

    def __call__(self, identity: str) -> bool:
        allowed = self._known.get(identity)
        if allowed is None:
            allowed = any(fnmatch.fnmatchcase(identity, p) for p in self.patterns)
            if len(self._known) >= 1024:
                self._known.clear()
            self._known[identity] = allowed
        return allowed


def _rejected(reason: str, message: str) -> UnauthenticatedError:
    return UnauthenticatedError(message, reason=reason)


def _bearer(header: str | bytes) -> str:
    if isinstance(header, str) and header.startswith("Bearer ") and " " not in header[7:]:
        return header[7:]  # the common spelling; anything odd takes the careful path
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _rejected(
            "TOKEN_MALFORMED", "the authorization header must have the form 'Bearer <jwt>'"
        )
    return token


class AuthPolicy(BasePolicy):
    """Server policy: verify the caller (JWT and/or mTLS identity), check scopes.

    `verifier` None accepts no tokens (mTLS identities only).  `required_by_default`
    applies to methods whose contract leaves `auth_required` unset.
    `open_services` are service patterns that skip the policy entirely.
    From code (for contracts you do not own): `public_methods` patterns are public,
    `method_scopes` maps method patterns to scopes required on top of the contract's.
    """

    sides = frozenset({Side.SERVER})

    def __init__(
        self,
        verifier: JwtVerifier | None,
        *,
        required_by_default: bool = True,
        open_services: Sequence[str] = OPEN_SERVICES,
        public_methods: Sequence[str] = (),
        method_scopes: Mapping[str, Iterable[str]] | None = None,
        allowed_identities: IdentityRule | None = None,
        read_peer_identity: bool = True,
    ) -> None:
        if verifier is not None:
            expect(
                verifier,
                JwtVerifier,
                "AuthPolicy(verifier)",
                "a JwtVerifier(KeySet(...), JwtConfig(...)), or None for mTLS identities only",
            )
        self.verifier = verifier
        self.required_by_default = required_by_default
        self.open_services = tuple(open_services)
        self.public_methods = tuple(public_methods)
        self.method_scopes = {k: tuple(v) for k, v in (method_scopes or {}).items()}
        self.allowed_identities = allowed_identities
        self.read_peer_identity = read_peer_identity
        self._peer_identity = PeerIdentity()

    async def start(self) -> None:
        if self.verifier is not None:
            await self.verifier.start()

    async def close(self) -> None:
        if self.verifier is not None:
            await self.verifier.close()

    def rule(self, method: Method) -> _Rule | None:
        """What `method` needs; None for open services."""
        if any(fnmatch.fnmatchcase(method.service, p) for p in self.open_services):
            return None
        options = method.policy
        if any(method.matches(p) for p in self.public_methods):
            required = False
        elif options.HasField("auth_required"):
            required = options.auth_required
        else:
            required = self.required_by_default
        scopes = set(options.scopes)
        for pattern, extra in self.method_scopes.items():
            if method.matches(pattern):
                scopes.update(extra)
        return _Rule(
            method=method.full_name,
            required=required or bool(scopes),  # declared scopes always imply authentication
            scopes=frozenset(scopes),
            identity_allowed=self._identity_rule(method),
        )

    def authenticates(self, method: Method) -> bool:
        """Whether this policy requires a verified caller for `method` (the server asks
        before serving a method whose contract declares scopes)."""
        rule = self.rule(method)
        return rule is not None and rule.required

    def _identity_rule(self, method: Method) -> Callable[[str], bool] | None:
        rule = self.allowed_identities
        if rule is None:
            return None
        if callable(rule):
            check = rule
            return lambda identity: bool(check(method, identity))
        patterns = [p for pattern, ids in rule.items() if method.matches(pattern) for p in ids]
        return _IdentityMatcher(patterns) if patterns else None

    def bind(self, method: Method) -> Callable[[Call], Exit | None] | None:
        rule = self.rule(method)
        if rule is None:
            return None

        return functools.partial(self._enter, rule)

    def _enter(self, rule: _Rule, call: Call) -> Exit | None:
        header = call.header("authorization")
        principal: Principal | None = None
        if header is not None:
            if self.verifier is None:
                raise _rejected(
                    "TOKEN_NOT_ACCEPTED",
                    "this server does not accept bearer tokens; authenticate with a client "
                    "certificate",
                )
            principal = self.verifier.verify(_bearer(header))
        identity: str | None = None
        if self.read_peer_identity and call.context is not None:
            identity = self._peer_identity(call.context)
        if identity is not None and rule.identity_allowed is not None:
            if rule.identity_allowed(identity):
                return _publish(call, _with_identity(principal, identity))
            if principal is None and rule.required:
                raise PermissionDeniedError(
                    f"workload identity {identity!r} is not allowed to call {rule.method}",
                    reason="IDENTITY_NOT_ALLOWED",
                )
        if principal is None:
            if rule.required:
                raise _rejected(
                    "TOKEN_MISSING",
                    f"{rule.method} requires a bearer token: send 'authorization: Bearer <jwt>'",
                )
            return _publish(call, _with_identity(None, identity)) if identity is not None else None
        if not rule.scopes <= principal.scopes:
            missing = ", ".join(sorted(rule.scopes - principal.scopes))
            raise PermissionDeniedError(
                f"the token lacks scope {missing} required by {rule.method}",
                reason="SCOPE_MISSING",
                metadata={"missing_scopes": missing},
            )
        return _publish(call, _with_identity(principal, identity) if identity else principal)


def _with_identity(principal: Principal | None, identity: str) -> Principal:
    if principal is None:
        return Principal(subject=identity, identity=identity)
    return Principal(principal.subject, principal.scopes, principal.claims, identity)


def _publish(call: Call, principal: Principal) -> Exit:
    call.principal = principal  # for the core (e.g. the health report's operator detail)
    token = _principal.set(principal)

    def reset(error: BaseException | None) -> None:
        try:
            _principal.reset(token)
        except ValueError:  # the adapter ran this exit in another context: clear ours
            _principal.set(None)

    return reset
