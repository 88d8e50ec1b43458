"""Rate limiting: a token bucket per (caller, method), decided before the handler runs.

`RateLimitPolicy` (server side) finds the limit of each method once, at bind time:
the contract's `rate_limit` method option wins, then the first matching pattern of
`RateLimitConfig.per_method`, then the config default (none: the method is not
limited and costs nothing per call).  Per call it names the caller with the
identity hook (default: the verified principal's subject when `framework.auth.policy` is
present, else the peer's host) and takes one token from that caller's bucket.
Over the limit it raises `RateLimitedError(retry_after_s=...)`, which the error
mapping sends as RESOURCE_EXHAUSTED with a `retry-after` trailing entry and
`google.rpc.RetryInfo`.

Buckets live in a backend.  `MemoryBuckets` (default) keeps them in one
insertion-ordered dict: each take is O(1), needs no lock (one event loop), and
memory stays bounded because idle buckets (already refilled to full, so
equivalent to absent) are evicted from the old end as calls go by, with a hard
`max_keys` cap on top.  `framework.policies.ratelimit_redis.RedisBuckets` shares buckets
between replicas; it is asynchronous, so the policy then returns an `async`
enter.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from framework.clock import Clock, SystemClock
from framework.config import expect
from framework.errors import RateLimitedError
from framework.policy import AsyncEnter, Call, Enter, Exit, Method, Side

logger = logging.getLogger(__name__)

Identity = Callable[[Call], str]


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket's shape: `rate_per_s` sustained, up to `burst` at once.

    `fail_closed`: when a shared store (Redis) cannot answer, refuse rather than admit,
    whatever the store's `fail_open` default (limits that guard against abuse).
    """

    rate_per_s: float
    burst: int
    fail_closed: bool = False

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {self.rate_per_s!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst!r}")

    @property
    def refill_s(self) -> float:
        """Seconds an empty bucket takes to become full again."""
        return self.burst / self.rate_per_s


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Limits not carried by the contract.

    `per_method` maps method patterns (as in `Method.matches`, e.g.
    `"echo.v1.EchoService/*"`) to limits; the first match wins.  `default` applies
    to every other method (None: unlimited).  `max_keys` bounds the number of
    buckets the in-memory backend keeps.
    """

    default: Limit | None = None
    per_method: Mapping[str, Limit] = field(default_factory=dict)
    max_keys: int = 100_000

    def __post_init__(self) -> None:
        if self.max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {self.max_keys!r}")
        for pattern, limit in self.per_method.items():
            if not isinstance(limit, Limit):
                raise TypeError(f"per_method[{pattern!r}] must be a Limit, got {limit!r}")

    def limit_for(self, method: Method) -> Limit | None:
        """The contract's option first, then the first matching pattern, then the default."""
        option = method.policy.rate_limit
        if option.rate_per_s > 0:
            return Limit(
                option.rate_per_s,
                max(1, option.burst or int(option.rate_per_s)),
                fail_closed=option.fail_closed,
            )
        for pattern, limit in self.per_method.items():
            if method.matches(pattern):
                return limit
        return self.default


@runtime_checkable
class Buckets(Protocol):
    """A store of token buckets. `take` returns 0.0 when admitted, else seconds to wait."""

    def take(self, key: str, limit: Limit) -> float: ...


@runtime_checkable
class AsyncBuckets(Protocol):
    """A shared store of token buckets (e.g. Redis); same contract as `Buckets`, awaited."""

    async def take(self, key: str, limit: Limit) -> float: ...


class MemoryBuckets:
    """Token buckets in one process: O(1) per take, bounded memory, no locks (one loop).

    Each entry is `[tokens, last_refill, refill_s]`.  A take moves its key to the
    young end of an `OrderedDict` (O(1), and so is finding the oldest, unlike a
    plain dict whose iteration skips the holes moved keys leave); the oldest entry
    is dropped when it has been idle long enough to be full again (forgetting it
    changes nothing) or when `max_keys` is exceeded.
    """

    __slots__ = ("_buckets", "_clock", "forced_evictions", "max_keys")

    def __init__(self, *, max_keys: int = 100_000, clock: Clock | None = None) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.max_keys = max_keys
        self._clock = clock or SystemClock()
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.forced_evictions = 0  # buckets dropped before they were full again

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, limit: Limit) -> float:
        now = self._clock.monotonic()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = [float(limit.burst), now, limit.refill_s]
        else:
            tokens = bucket[0] + (now - bucket[1]) * limit.rate_per_s
            bucket[0] = tokens if tokens < limit.burst else float(limit.burst)
            bucket[1] = now
            buckets.move_to_end(key)  # now the youngest
        self._evict(now)
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / limit.rate_per_s

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        # At most two per take keeps it O(1) while still draining idle keys
        # faster than new ones arrive (each take adds at most one).
        for _ in range(2):
            oldest_key = next(iter(buckets))
            oldest = buckets[oldest_key]
            idle = now - oldest[1]
            if len(buckets) > self.max_keys:
                if idle < oldest[2]:
                    self.forced_evictions += 1
                    if self.forced_evictions % 10_000 == 1:  # say so, without flooding the log
                        logger.warning(
                            "rate limit store over max_keys=%s: forgot %s buckets still in "
                            "use (those callers get a fresh burst); raise max_keys",
                            self.max_keys,
                            self.forced_evictions,
                        )
                del buckets[oldest_key]
            elif idle >= oldest[2] and len(buckets) > 1:
                del buckets[oldest_key]
            else:
                return


def peer_host(call: Call) -> str:
    """The caller's address without the port: `ipv4:127.0.0.1`, `ipv6:[::1]`."""
    peer = call.peer
    host, sep, _port = peer.rpartition(":")
    return host if sep and host else peer


def default_identity() -> Identity:
    """The verified principal's subject (or mTLS identity) when `framework.auth.policy` exists.

    Anonymous callers (and every caller when there is no auth module) are named
    by their peer host.
    """
    try:
        auth = importlib.import_module("framework.auth.policy")
    except ImportError:
        return peer_host
    current_principal = getattr(auth, "current_principal", None)
    if current_principal is None:
        return peer_host

    def identity(call: Call) -> str:
        principal = current_principal()
        if principal is not None:
            if principal.subject:
                return f"sub:{principal.subject}"
            workload = getattr(principal, "identity", "")  # mTLS identity, no token
            if workload:
                return f"id:{workload}"
        return peer_host(call)

    return identity


class RateLimitPolicy:
    """Server policy: one token per call from the caller's bucket for this method."""

    sides = frozenset({Side.SERVER})

    def __init__(
        self,
        config: RateLimitConfig | None = None,
        *,
        backend: Buckets | AsyncBuckets | None = None,
        identity: Identity | None = None,
        clock: Clock | None = None,
    ) -> None:
        if config is not None:
            expect(
                config,
                RateLimitConfig,
                "RateLimitPolicy(config)",
                "RateLimitConfig(default=Limit(rate_per_s=..., burst=...))",
            )
        self.config = config or RateLimitConfig()
        self.backend: Buckets | AsyncBuckets = backend or MemoryBuckets(
            max_keys=self.config.max_keys, clock=clock
        )
        self.identity = identity or default_identity()
        self._async = inspect.iscoroutinefunction(self.backend.take)

    def __repr__(self) -> str:
        return f"RateLimitPolicy(backend={type(self.backend).__name__})"

    async def close(self) -> None:
        """Release the backend's connections, if it holds any (called by the server)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            await close()

    def bind(self, method: Method) -> Enter | AsyncEnter | None:
        limit = self.config.limit_for(method)
        if limit is None:
            return None
        identity, name = self.identity, method.full_name
        if self._async:
            atake: Callable[[str, Limit], Awaitable[float]] = self.backend.take  # type: ignore[assignment]

            async def aenter(call: Call) -> Exit | None:
                wait_s = await atake(f"{identity(call)}|{name}", limit)
                if wait_s > 0.0:
                    raise _limited(name, limit, wait_s)
                return None

            return aenter
        take: Callable[[str, Limit], float] = self.backend.take  # type: ignore[assignment]

        def enter(call: Call) -> Exit | None:
            wait_s = take(f"{identity(call)}|{name}", limit)
            if wait_s > 0.0:
                raise _limited(name, limit, wait_s)
            return None

        return enter


def _limited(name: str, limit: Limit, wait_s: float) -> RateLimitedError:
    return RateLimitedError(
        f"too many calls to {name}: the limit is {limit.rate_per_s:g}/s "
        f"(burst {limit.burst}); retry after {wait_s:.3f}s",
        retry_after_s=wait_s,
        metadata={"method": name, "rate_per_s": f"{limit.rate_per_s:g}"},
    )
