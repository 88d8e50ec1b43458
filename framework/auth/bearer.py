"""Client half of JWT auth: attach `authorization: Bearer <token>` to outgoing calls.

    BearerToken("eyJ...")                         # a static token
    BearerToken(provider=fetch_token)             # async () -> IssuedToken, refreshed

With a provider, the token is fetched on first use and refreshed in the
background `refresh_before_s` before it expires, so calls never wait for a
refresh while a valid token exists; a call waits only when there is no valid
token (first call, or the provider kept failing until expiry).  Concurrent
callers share one in-flight fetch.  When a server answers UNAUTHENTICATED to the
current token it is refreshed in the background for the next calls.  Guard-rails
for the identity provider: at most one rejection-driven fetch per
`retry_after_s`, and after a failed fetch, calls without a valid token fail fast
(`TOKEN_UNAVAILABLE`) until `retry_after_s` has passed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from framework.clock import Clock, SystemClock
from framework.config import expect
from framework.errors import UnauthenticatedError, code_of
from framework.policy import AsyncEnter, Call, Enter, Exit, Method, Side

__all__ = ["BearerToken", "IssuedToken", "TokenProvider"]

logger = logging.getLogger(__name__)

_UNAUTHENTICATED = UnauthenticatedError.status_code


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token and when it expires (None: it does not)."""

    token: str
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self.token or any(c in self.token for c in " \r\n"):
            raise ValueError("token must be a non-empty string without spaces or newlines")
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware (UTC)")


TokenProvider = Callable[[], Awaitable[IssuedToken]]


class BearerToken:
    """Client policy attaching a bearer token (static, or from a refreshing provider)."""

    sides = frozenset({Side.CLIENT})

    def __init__(
        self,
        token: str | None = None,
        *,
        provider: TokenProvider | None = None,
        refresh_before_s: float = 60.0,
        retry_after_s: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        if (token is None) == (provider is None):
            raise ValueError("give either a static token or a provider, not both or neither")
        if token is not None:
            expect(token, str, "BearerToken(token)", "the token as a str (without 'Bearer ')")
        if provider is not None and not callable(provider):
            raise TypeError(
                "BearerToken(provider=...) must be an async function returning an IssuedToken, "
                f"got {type(provider).__name__}"
            )
        if refresh_before_s < 0:
            raise ValueError("refresh_before_s must be >= 0")
        if retry_after_s <= 0:
            raise ValueError("retry_after_s must be > 0")
        self._provider = provider
        self._refresh_before = timedelta(seconds=refresh_before_s)
        self._retry_after_s = retry_after_s
        self._clock = clock or SystemClock()
        self._current: IssuedToken | None = IssuedToken(token) if token is not None else None
        self._header = f"Bearer {token}" if token is not None else ""
        self._fetch: asyncio.Task[IssuedToken] | None = None
        self._next_attempt = 0.0  # monotonic: no background refresh before (after a failure)
        self._next_rejection_fetch = 0.0  # monotonic: no fetch on a rejection before
        self._failed_until = 0.0  # monotonic: calls without a valid token fail fast until
        self._last_error: BaseException | None = None
        self.fetches = 0

    def __repr__(self) -> str:
        return f"BearerToken({'provider' if self._provider else 'static'})"  # never the token

    def bind(self, method: Method) -> Enter | AsyncEnter | None:
        return self._enter_static if self._provider is None else self._enter_provided

    def _enter_static(self, call: Call) -> Exit | None:
        call.add_metadata("authorization", self._header)
        return None

    async def _enter_provided(self, call: Call) -> Exit | None:
        current = self._current
        now = self._clock.now()
        if current is None or (current.expires_at is not None and now >= current.expires_at):
            current = await self.token()
        elif (
            current.expires_at is not None
            and now >= current.expires_at - self._refresh_before
            and self._fetch is None
            and self._clock.monotonic() >= self._next_rejection_fetch
        ):
            self._next_rejection_fetch = self._clock.monotonic() + self._retry_after_s
            self._start_fetch()  # refresh in the background; this call uses the valid token
        header = self._header
        call.add_metadata("authorization", header)
        return functools.partial(self._observe, header)

    def _observe(self, header: str, error: BaseException | None) -> None:
        # refresh only when the rejected token is still the current one: calls that were
        # in flight with it must not each start another fetch
        # (at most one fetch per retry_after_s: a server that rejects every token must
        # not turn each call into a request to the identity provider)
        if (
            error is not None
            and code_of(error) is _UNAUTHENTICATED
            and header == self._header
            and self._fetch is None
            and self._clock.monotonic() >= self._next_rejection_fetch
        ):
            self._next_rejection_fetch = self._clock.monotonic() + self._retry_after_s
            self._start_fetch()

    @property
    def current(self) -> IssuedToken | None:
        """The token calls attach now (None before the first fetch)."""
        return self._current

    async def token(self) -> IssuedToken:
        """A valid token now: the current one, or the result of a (shared) fetch."""
        current = self._current
        if current is not None and (
            current.expires_at is None or self._clock.now() < current.expires_at
        ):
            return current
        task = self._fetch
        if task is None:
            if self._last_error is not None and self._clock.monotonic() < self._failed_until:
                raise UnauthenticatedError(
                    "no valid bearer token: the token provider failed "
                    f"({type(self._last_error).__name__}); next attempt in "
                    f"{self._failed_until - self._clock.monotonic():.1f} s",
                    reason="TOKEN_UNAVAILABLE",
                )
            task = self._start_fetch()
        try:
            issued = await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except UnauthenticatedError:
            raise
        except Exception as error:  # the provider's own failure: reported to the caller
            raise UnauthenticatedError(
                f"no valid bearer token: the token provider failed ({type(error).__name__})",
                reason="TOKEN_UNAVAILABLE",
            ) from error
        self._current = issued
        self._header = f"Bearer {issued.token}"
        return issued

    def _start_fetch(self) -> asyncio.Task[IssuedToken]:
        self.fetches += 1
        task = asyncio.get_running_loop().create_task(self._run_fetch(), name="bearer-refresh")
        self._fetch = task
        task.add_done_callback(self._fetched)
        return task

    async def _run_fetch(self) -> IssuedToken:
        assert self._provider is not None
        issued = await self._provider()
        if not isinstance(issued, IssuedToken):
            raise TypeError("the token provider must return an IssuedToken")
        return issued

    def _fetched(self, task: asyncio.Task[IssuedToken]) -> None:
        self._fetch = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._last_error = error
            self._failed_until = self._next_attempt = self._clock.monotonic() + self._retry_after_s
            logger.warning(
                "bearer token refresh failed (%s); retrying in %.1f s",
                type(error).__name__,
                self._retry_after_s,
            )
            return
        issued = task.result()
        self._last_error = None
        self._current = issued
        self._header = f"Bearer {issued.token}"

    async def close(self) -> None:
        task, self._fetch = self._fetch, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
