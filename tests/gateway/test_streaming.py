"""Server streams over HTTP: NDJSON, Server-Sent Events, failures mid-stream, a caller leaving."""

from __future__ import annotations

import asyncio
import json

from gen.gateway.v1 import testing_pb2 as pb
from tests.gateway.conftest import Harness


def _stock(gw: Harness, shelf: str, count: int) -> None:
    for i in range(count):
        name = f"shelves/{shelf}/books/b{i}"
        gw.library.books[name] = pb.Book(name=name, title=f"T{i}", pages=i)


async def test_ndjson_stream(gw: Harness) -> None:
    """One {"result": ...} line per message, as application/x-ndjson."""
    _stock(gw, "s1", 3)
    reply = await gw.client.get("/v1/shelves/s1/books:watch", params={"count": 3})
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert [line["result"]["book"]["title"] for line in lines] == ["T0", "T1", "T2"]
    assert lines[1]["result"]["book"]["pages"] == "1"


async def test_sse_stream(gw: Harness) -> None:
    """Accept: text/event-stream gets one `data:` event per message."""
    _stock(gw, "s2", 2)
    reply = await gw.client.get(
        "/v1/shelves/s2/books:watch",
        params={"count": 2},
        headers={"accept": "text/event-stream"},
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [e for e in reply.text.split("\n\n") if e]
    assert [json.loads(e.removeprefix("data: "))["book"]["title"] for e in events] == ["T0", "T1"]


async def test_failure_after_the_stream_started_ends_it_with_an_error(gw: Harness) -> None:
    """A stream that fails after sending ends with an {"error": Status} line (SSE: event: error)."""
    _stock(gw, "s3", 2)
    params = {"count": 1, "failWith": "FailedPreconditionError"}
    reply = await gw.client.get("/v1/shelves/s3/books:watch", params=params)
    assert reply.status_code == 200
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert "result" in lines[0]
    assert lines[-1]["error"]["code"] == 9
    assert "failed after 1 books" in lines[-1]["error"]["message"]
    sse = await gw.client.get(
        "/v1/shelves/s3/books:watch", params=params, headers={"accept": "text/event-stream"}
    )
    assert sse.text.rstrip().splitlines()[-2:][0] == "event: error"


async def test_failure_before_the_first_message_is_an_http_error(gw: Harness) -> None:
    """Rejected before any message (backend validation): a plain 400, not a 200 stream."""
    reply = await gw.client.get("/v1/shelves/s1/books:watch", params={"count": 5000})
    assert reply.status_code == 400
    assert reply.json()["code"] == 3


async def test_caller_leaving_cancels_the_backend_stream(gw: Harness) -> None:
    """Closing the HTTP response mid-stream cancels the gRPC call on the backend."""
    _stock(gw, "s4", 1)
    async with gw.client.stream("GET", "/v1/shelves/s4/books:watch") as reply:
        assert reply.status_code == 200
        lines = reply.aiter_lines()
        first = json.loads(await anext(lines))
        assert first["result"]["book"]["name"] == "shelves/s4/books/b0"
        await asyncio.wait_for(gw.library.watch_started.wait(), 60)
    await asyncio.wait_for(gw.library.watch_cancelled.wait(), 60)
    assert gw.library.watch_cancelled.is_set()


async def test_stream_follows_new_messages(gw: Harness) -> None:
    """A book added while the stream is open arrives as the next line."""
    _stock(gw, "s5", 1)
    async with gw.client.stream("GET", "/v1/shelves/s5/books:watch", params={"count": 2}) as reply:
        lines = reply.aiter_lines()
        await anext(lines)
        await asyncio.wait_for(gw.library.watch_started.wait(), 60)
        from tests.gateway.conftest import bearer

        created = await gw.client.post(
            "/v1/shelves/s5/books",
            params={"bookId": "late"},
            json={"title": "Late"},
            headers=bearer("library:write"),
        )
        assert created.status_code == 200
        second = json.loads(await anext(lines))
    assert second["result"]["book"]["title"] == "Late"
