"""A server-streaming call cancelled while its handler waits at a yield, then the server
stopped and the handler's generator finalized afterwards (as asyncio.run does at the end).

Run as `python -m tests.framework.stream_finalized_app`; prints the recording policy's log
as JSON.  A separate process, because the failure it guards against is a crash.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys

from framework.policies.accesslog import AccessLogPolicy, AccessLogWriter
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy


async def main() -> list[str]:
    log: list[str] = []
    policies = [AccessLogPolicy(AccessLogWriter(sys.stderr)), RecordingPolicy("r", log)]
    for _ in range(20):
        async with serve(EchoServicer(), policies=policies) as t:
            stub = t.stub(echo_pb2_grpc.EchoServiceStub)
            stream = stub.EchoStream(echo_pb2.EchoRequest(text="x", repeat=1_000_000))
            await stream.read()
            stream.cancel()
        gc.collect()  # the generators grpc.aio dropped, finalized with the server gone
    return log


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
