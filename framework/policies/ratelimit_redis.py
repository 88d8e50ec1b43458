"""Token buckets in Redis, so several replicas share one limit.

One Lua script refills and takes a token atomically on the Redis server, using
Redis's own clock (`TIME`), so replicas with skewed clocks still agree and no
two replicas can spend the same token.  Keys expire once the bucket would be
full again, so memory stays bounded with no sweeper.

Why an async enter rather than local pre-allocation: the check costs one
round trip (~0.1 ms on loopback) but the limit is exact across replicas, which
is what a shared limit promises.  Leasing batches of tokens to each replica
would save round trips but lets one replica hoard tokens another needs and
makes the admitted rate depend on how the batches fall; at the rates where a
shared limit matters (per-caller quotas) the round trip is cheaper than that
error.  If Redis does not answer within the client's socket timeout, the calls
are admitted (`fail_open=True`, the default, as Envoy's global rate limit does:
an outage of the limiter must not become an outage of the service) with a
warning in the log, or refused with UNAVAILABLE (`fail_open=False`, or per limit
`Limit(fail_closed=True)` / the contract's `rate_limit.fail_closed`, for limits
that guard against abuse such as log-in attempts).

A busy limiter is not a limiter that is down: at most as many takes as the
client's connection pool holds run at once (`max_connections`); the others wait
up to `queue_timeout_s` for a turn and are then refused with RESOURCE_EXHAUSTED
(`RATE_LIMIT_BUSY`), never admitted.  (Before, a burst of 200 concurrent calls
against a burst of 10 exhausted the pool, the pool errors counted as "Redis
down", and 110 calls got through.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as redis_asyncio
from redis.exceptions import MaxConnectionsError, RedisError

from framework.errors import ResourceExhaustedError, UnavailableError
from framework.policies.ratelimit import Limit

logger = logging.getLogger(__name__)

# KEYS[1] bucket key; ARGV: rate_per_s, burst.  Returns the wait in microseconds
# as an integer (0 = admitted); Lua numbers become integers on the way out.
TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
end
local wait_us = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_us = math.ceil((1 - tokens) / rate * 1000000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return wait_us
"""


class RedisBuckets:
    """Shared token buckets: `await take(key, limit)` -> 0.0 admitted, else seconds to wait."""

    def __init__(
        self,
        client: redis_asyncio.Redis,
        *,
        prefix: str = "ratelimit:",
        fail_open: bool = True,
        queue_timeout_s: float = 0.25,
    ) -> None:
        if queue_timeout_s < 0:
            raise ValueError(f"queue_timeout_s must be >= 0, got {queue_timeout_s}")
        self.client = client
        self.prefix = prefix
        self.fail_open = fail_open
        self.queue_timeout_s = queue_timeout_s
        self._script: Any = client.register_script(TAKE_SCRIPT)
        pool_size = getattr(client.connection_pool, "max_connections", None)
        # one take holds one connection: never ask the pool for more than it has
        self._turns = (
            asyncio.Semaphore(pool_size)
            if isinstance(pool_size, int) and 0 < pool_size < 2**20
            else None
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.25,
        prefix: str = "ratelimit:",
        fail_open: bool = True,
        max_connections: int = 32,
    ) -> RedisBuckets:
        """Buckets on the Redis at `url` (e.g. `redis://127.0.0.1:6379/0`).

        `timeout_s` bounds connecting and each check, so a stuck Redis delays a
        call by at most that much before `fail_open` decides; it is also how long a
        call waits for one of the `max_connections` before RATE_LIMIT_BUSY.
        """
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        client = redis_asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=max_connections,
        )
        return cls(client, prefix=prefix, fail_open=fail_open, queue_timeout_s=timeout_s)

    async def take(self, key: str, limit: Limit) -> float:
        turns = self._turns
        if turns is None:
            return await self._take(key, limit)
        if not turns.locked():
            await turns.acquire()  # a free turn: taken at once
        else:
            try:
                async with asyncio.timeout(self.queue_timeout_s):
                    await turns.acquire()
            except TimeoutError:
                raise _busy(self.queue_timeout_s) from None
        try:
            return await self._take(key, limit)
        finally:
            turns.release()

    async def _take(self, key: str, limit: Limit) -> float:
        try:
            wait_us = await self._script(
                keys=[self.prefix + key], args=[repr(limit.rate_per_s), limit.burst]
            )
        except MaxConnectionsError:
            # the pool (shared with other code) is exhausted: overload, not an outage
            raise _busy(self.queue_timeout_s) from None
        except RedisError as error:
            if self.fail_open and not limit.fail_closed:
                logger.warning("rate limit store unreachable, admitting the call: %s", error)
                return 0.0
            raise UnavailableError(
                "the shared rate limit store (Redis) does not answer; retry shortly",
                reason="RATE_LIMIT_STORE_UNAVAILABLE",
            ) from error
        return int(wait_us) / 1e6

    async def close(self) -> None:
        """Close the Redis connections (the server calls this on stop)."""
        await self.client.aclose()


def _busy(waited_s: float) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        "the shared rate limiter is saturated (every connection to its store is in use); "
        "retry shortly",
        reason="RATE_LIMIT_BUSY",
        retry_after_s=max(waited_s, 0.05),
    )
