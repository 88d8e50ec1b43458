"""Password hashes with Argon2id (argon2-cffi), computed off the event loop.

Hashing is deliberately expensive (memory and CPU), so at most `max_concurrent`
hashes run at once (the others wait): a burst of log-ins cannot take every core
or gigabytes of memory.  The parameters are stored in each hash, so raising them
later still verifies old hashes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["Argon2Config", "Argon2Hasher"]


@dataclass(frozen=True, slots=True)
class Argon2Config:
    """Argon2id cost; the defaults are argon2-cffi's (RFC 9106 low-memory profile)."""

    time_cost: int = 3
    memory_cost_kib: int = 65536
    parallelism: int = 4
    max_concurrent: int = 2

    def __post_init__(self) -> None:
        if self.time_cost < 1 or self.parallelism < 1 or self.max_concurrent < 1:
            raise ValueError("time_cost, parallelism and max_concurrent must be >= 1")
        if self.memory_cost_kib < 8 * self.parallelism:
            raise ValueError("memory_cost_kib must be at least 8 * parallelism")


class Argon2Hasher:
    """`PasswordHasher` of the user service on argon2-cffi."""

    def __init__(self, config: Argon2Config | None = None) -> None:
        self.config = config or Argon2Config()
        self._hasher = PasswordHasher(
            time_cost=self.config.time_cost,
            memory_cost=self.config.memory_cost_kib,
            parallelism=self.config.parallelism,
        )
        self._slots = asyncio.Semaphore(self.config.max_concurrent)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        def check() -> bool:
            try:
                return bool(self._hasher.verify(password_hash, password))
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        async with self._slots:
            return await asyncio.to_thread(check)
