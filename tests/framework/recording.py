"""A policy that records what it sees, for chain tests."""

from __future__ import annotations

from framework.errors import code_of
from framework.policy import BasePolicy, Call, Exit


class RecordingPolicy(BasePolicy):
    """Appends `enter:<name>` and `exit:<name>:<code>` to a shared log."""

    def __init__(self, name: str, log: list[str], seen: list[Call] | None = None) -> None:
        self.name = name
        self.log = log
        self.seen = seen if seen is not None else []

    def enter(self, call: Call) -> Exit:
        self.log.append(f"enter:{self.name}")
        self.seen.append(call)

        def exit_(error: BaseException | None) -> None:
            self.log.append(f"exit:{self.name}:{code_of(error).name}")

        return exit_
