"""A user's service config is deep-merged with the policies' (issue #11 item 10).

The user's `grpc.service_config` is the base; a policy's (retries) is merged into
it, so a `loadBalancingConfig` or a per-method timeout the user set is kept
beside the retries, and `methodConfig` entries from several contributors stay.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from framework.client import _channel_options, merge_service_configs
from framework.config import ClientConfig
from framework.errors import DeadlineExceededError
from framework.policies.retry import RetryConfig, RetryPolicy
from framework.policy import Method
from framework.testing import serve
from gen.echo.v1 import echo_pb2
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from tests.policies.test_retry import FlakyEcho

ECHO = "echo.v1.EchoService"
USER_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {"name": [{"service": ECHO, "method": "EchoStream"}], "timeout": "0.2s"},
        {"name": [{"service": ECHO, "method": "Echo"}], "waitForReady": True},
    ],
}


class Timeouts:
    """A policy contributing its own methodConfig (a timeout for Collect)."""

    def channel_options(self) -> list[tuple[str, object]]:
        config = {
            "methodConfig": [{"name": [{"service": ECHO, "method": "Collect"}], "timeout": "7s"}]
        }
        return [("grpc.service_config", json.dumps(config))]

    def bind(self, method: Method) -> None:
        return None


def _retry() -> RetryPolicy:
    return RetryPolicy(
        RetryConfig(services=[ECHO], max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    )


def _user_config() -> ClientConfig:
    return ClientConfig(grpc_options=(("grpc.service_config", json.dumps(USER_CONFIG)),))


def _by_method(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for entry in config["methodConfig"]:
        for name in entry["name"]:
            assert name["method"] not in out, f"{name} is named twice: gRPC refuses that"
            out[name["method"]] = {k: v for k, v in entry.items() if k != "name"}
    return out


def test_the_merged_config_keeps_the_users_and_every_policys_entries() -> None:
    """loadBalancingConfig, the user's timeouts, the retries and a second policy's entry."""
    options = dict(_channel_options([_retry(), Timeouts()], _user_config()))
    merged = json.loads(str(options["grpc.service_config"]))
    assert merged["loadBalancingConfig"] == [{"round_robin": {}}]
    assert merged["retryThrottling"]["maxTokens"] == 10
    methods = _by_method(merged)
    assert methods["EchoStream"]["timeout"] == "0.2s"  # the user's, beside the retries
    assert methods["EchoStream"]["retryPolicy"]["maxAttempts"] == 3
    assert methods["Echo"]["waitForReady"] is True
    assert methods["Echo"]["retryPolicy"]["maxAttempts"] == 3
    assert methods["Collect"] == {"timeout": "7s"}
    assert options["grpc.enable_retries"] == 1


def test_a_method_shared_by_an_entry_is_split_before_merging() -> None:
    """A policy's setting for one method of a multi-method entry applies to that method only."""
    base = {
        "methodConfig": [
            {
                "name": [{"service": ECHO, "method": "A"}, {"service": ECHO, "method": "B"}],
                "timeout": "1s",
            }
        ]
    }
    extra = {"methodConfig": [{"name": [{"service": ECHO, "method": "B"}], "waitForReady": True}]}
    methods = _by_method(merge_service_configs(base, extra))
    assert methods == {"A": {"timeout": "1s"}, "B": {"timeout": "1s", "waitForReady": True}}
    assert base["methodConfig"][0]["name"][1]["method"] == "B"  # inputs are not changed


async def test_a_users_timeout_and_the_retries_both_apply_on_a_real_channel() -> None:
    """Through real gRPC: Echo is retried (retry policy) and EchoStream times out (user's)."""
    servicer = FlakyEcho(failures=1)
    async with serve(servicer, client_policies=[_retry()], client_config=_user_config()) as t:
        stub = t.stub(EchoServiceStub)
        assert (await stub.Echo(echo_pb2.EchoRequest(text="again"))).text == "again"
        assert servicer.attempts == [0, 1]

        async def read_all() -> None:
            async for _ in stub.EchoStream(echo_pb2.EchoRequest(delay_s=30), timeout=60):
                pass

        with pytest.raises(DeadlineExceededError) as caught:  # the user's 0.2 s, not 60 s
            await asyncio.wait_for(read_all(), 20)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
