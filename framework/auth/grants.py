"""Which names a caller may use: service names it registers, consumer groups it joins.

Scopes say what kind of thing a caller may do ("registry:register"); a
`NameGrants` says on which names.  Without it, any holder of the scope could
register under another team's service name or join another consumer group and
take its deliveries.

    grants = NameGrants(
        table={"orders": ["orders", "orders.v1.*"],             # token subject -> names
               "spiffe://shop.example/ns/prod/sa/billing": ["billing*"]},   # mTLS identity
        claim="services",          # and/or: names the token lists in its own claim
    )
    grants.allows(principal, "orders.v1.OrderService")

A caller is allowed a name when any of these says so:

* `own_subject` (default on): the name is the token's subject, or starts with
  `<subject>/` (a service "orders" registers as "orders" and "orders/canary");
* `claim`: the token carries that claim, a string or list of name patterns;
* `table`: caller patterns (matched against the token subject and the mTLS
  identity) mapped to name patterns.

Patterns are shell-style (`fnmatch`, case-sensitive).  `NameGrants.load(path)`
reads the table from a JSON file `{"caller pattern": ["name pattern", ...]}`.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from framework.auth.verifier import Principal

__all__ = ["NameGrants"]


def _patterns(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


@dataclass(frozen=True, slots=True)
class NameGrants:
    """Names a principal may use (see the module docstring)."""

    table: Mapping[str, Sequence[str]] = field(default_factory=lambda: MappingProxyType({}))
    claim: str = ""
    own_subject: bool = True

    def __post_init__(self) -> None:
        frozen = {
            str(k): (tuple(v.split()) if isinstance(v, str) else tuple(str(n) for n in v))
            for k, v in self.table.items()
        }
        for caller, names in frozen.items():
            if not caller or not names:
                raise ValueError(
                    f"grants table entry {caller!r}: give a caller pattern and at least one "
                    "name pattern"
                )
        object.__setattr__(self, "table", MappingProxyType(frozen))

    @classmethod
    def load(cls, path: str | Path, *, claim: str = "", own_subject: bool = True) -> NameGrants:
        """A table from a JSON file `{"caller pattern": ["name pattern", ...]}`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read grants from {path}: {error}") from None
        if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()
        ):
            raise ValueError(
                f"{path}: grants must be a JSON object of caller pattern -> list of name patterns"
            )
        return cls(table=data, claim=claim, own_subject=own_subject)

    def patterns(self, principal: Principal) -> tuple[str, ...]:
        """Every name pattern `principal` is granted."""
        found: list[str] = []
        subject = principal.subject if principal.has_token else ""
        if self.own_subject and subject:
            found += [subject, f"{subject}/*"]
        if self.claim and principal.has_token:
            found += _patterns(principal.claims.get(self.claim))
        callers = [c for c in (subject, principal.identity) if c]
        for caller_pattern, names in self.table.items():
            if any(fnmatch.fnmatchcase(c, caller_pattern) for c in callers):
                found += names
        return tuple(found)

    def allows(self, principal: Principal, name: str) -> bool:
        """Whether `principal` may use `name`."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns(principal))

    @staticmethod
    def describe(patterns: Iterable[str]) -> str:
        shown = sorted(set(patterns))
        return ", ".join(shown[:8]) + (", ..." if len(shown) > 8 else "") if shown else "none"
