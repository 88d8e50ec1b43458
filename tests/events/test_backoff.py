"""Backoff for the background loops: doubling, capped, jittered, reset after a success."""

from __future__ import annotations

import random

import pytest

from framework.events.backoff import Backoff
from framework.events.consumer_group import StoreBusConfig
from framework.events.nats import JetStreamConfig
from framework.events.projection import ProjectionConfig
from framework.events.relay import RelayConfig


def test_delays_double_up_to_the_cap_within_the_jitter() -> None:
    """Each delay lies in the upper half of its step; steps double and stop at max_s."""
    backoff = Backoff(0.1, 1.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert backoff.attempt == 8
    backoff.reset()
    assert backoff.attempt == 0
    assert 0.05 <= backoff.next_delay() <= 0.1


def test_bad_backoff_settings_are_refused() -> None:
    """A non-positive start or a cap below it is a ValueError naming the field."""
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(0, 1)
    with pytest.raises(ValueError, match="max_s"):
        Backoff(1, 0.5)
    for config in (RelayConfig, StoreBusConfig, ProjectionConfig):
        with pytest.raises(ValueError, match="max_retry_delay_s"):
            config(retry_delay_s=1.0, max_retry_delay_s=0.5)
    with pytest.raises(ValueError, match="consumer_check_interval_s"):
        JetStreamConfig(consumer_check_interval_s=-1)
