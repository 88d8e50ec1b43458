"""Every google.api.http binding form, over real HTTP to a real gRPC service."""

from __future__ import annotations

from gen.gateway.v1 import testing_pb2 as pb
from tests.gateway.conftest import Harness, bearer

WRITE = bearer("library:write")


def _put(gw: Harness, name: str, **fields: object) -> pb.Book:
    book = pb.Book(name=name, **fields)  # type: ignore[arg-type]
    gw.library.books[name] = book
    return book


async def test_get_with_resource_name_variable_and_response_body(gw: Harness) -> None:
    """GET /v1/{name=shelves/*/books/*} binds a name with slashes; response_body is the book."""
    book = _put(gw, "shelves/s1/books/b1", title="Dune", pages=412, genre=pb.GENRE_FICTION)
    book.labels["lang"] = "en"
    book.published_at.FromJsonString("1965-08-01T00:00:00Z")
    book.edition.value = 3
    book.loan_period.FromSeconds(3600)
    book.extra.update({"isbn": "978-0441013593", "copies": 2})
    reply = await gw.client.get("/v1/shelves/s1/books/b1")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "name": "shelves/s1/books/b1",
        "title": "Dune",
        "genre": "GENRE_FICTION",
        "pages": "412",
        "tags": [],
        "publishedAt": "1965-08-01T00:00:00Z",
        "edition": 3,
        "available": False,
        "rating": 0.0,
        "labels": {"lang": "en"},
        "loanPeriod": "3600s",
        "extra": {"isbn": "978-0441013593", "copies": 2.0},
    }
    assert gw.library.requests["GetBook"][-1].name == "shelves/s1/books/b1"


async def test_post_body_field_with_path_and_query(gw: Harness) -> None:
    """POST /v1/{parent=shelves/*}/books, body: "book", book_id from the query string."""
    reply = await gw.client.post(
        "/v1/shelves/s1/books",
        params={"bookId": "b2"},
        json={"title": "Emma", "pages": "300", "genre": 1, "tags": ["classic"]},
        headers=WRITE,
    )
    assert reply.status_code == 200, reply.text
    sent = gw.library.requests["CreateBook"][-1]
    assert (sent.parent, sent.book_id) == ("shelves/s1", "b2")
    assert (sent.book.title, sent.book.pages, sent.book.genre) == ("Emma", 300, pb.GENRE_FICTION)
    assert reply.json()["book"]["name"] == "shelves/s1/books/b2"


async def test_patch_nested_path_variable_merges_with_body(gw: Harness) -> None:
    """PATCH /v1/{book.name=...}: the nested field comes from the path, the rest from the body."""
    _put(gw, "shelves/s1/books/b3", title="Old", pages=10)
    reply = await gw.client.patch(
        "/v1/shelves/s1/books/b3",
        params={"updateMask": "title,pages"},
        json={"title": "New", "pages": 11, "name": "shelves/other/books/x"},
        headers=WRITE,
    )
    assert reply.status_code == 200, reply.text
    sent = gw.library.requests["UpdateBook"][-1]
    assert sent.book.name == "shelves/s1/books/b3"  # the path wins over the body
    assert list(sent.update_mask.paths) == ["title", "pages"]
    assert reply.json()["book"]["title"] == "New"


async def test_query_parameters_of_every_kind(gw: Harness) -> None:
    """GET with no body: scalars, enum by name, repeated, bool, nested (both spellings), WKTs."""
    reply = await gw.client.get(
        "/v1/shelves/s1/books",
        params=[
            ("page_size", "5"),
            ("genre", "GENRE_HISTORY"),
            ("tags", "a"),
            ("tags", "b"),
            ("availableOnly", "true"),
            ("filter.min_pages", "100"),
            ("filter.publishedAfter", "2000-01-01T00:00:00Z"),
            ("edition", "2"),
            ("minRating", "4.5"),
        ],
    )
    assert reply.status_code == 200, reply.text
    sent = gw.library.requests["ListBooks"][-1]
    assert sent.parent == "shelves/s1"
    assert (sent.page_size, sent.genre, list(sent.tags)) == (5, pb.GENRE_HISTORY, ["a", "b"])
    assert sent.available_only is True
    assert sent.filter.min_pages == 100
    assert sent.filter.published_after.ToJsonString() == "2000-01-01T00:00:00Z"
    assert (sent.edition.value, sent.min_rating) == (2, 4.5)
    assert reply.json() == {"books": [], "total": "0"}


async def test_delete_answers_an_empty_object(gw: Harness) -> None:
    """DELETE with a resource name; an empty response message is `{}`."""
    _put(gw, "shelves/s1/books/gone")
    reply = await gw.client.delete("/v1/shelves/s1/books/gone", headers=WRITE)
    assert (reply.status_code, reply.json()) == (200, {})
    assert "shelves/s1/books/gone" not in gw.library.books


async def test_custom_verb_and_body_star(gw: Harness) -> None:
    """POST .../{name}:archive (custom verb) takes the path variable plus the whole body."""
    _put(gw, "shelves/s1/books/b4")
    reply = await gw.client.post(
        "/v1/shelves/s1/books/b4:archive", json={"reason": "worn out"}, headers=WRITE
    )
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"archivedName": "archive/shelves/s1/books/b4"}
    sent = gw.library.requests["ArchiveBook"][-1]
    assert (sent.name, sent.reason) == ("shelves/s1/books/b4", "worn out")


async def test_double_star_takes_the_rest_of_the_path(gw: Harness) -> None:
    """{path=**} binds every remaining segment; an encoded slash stays encoded inside it."""
    reply = await gw.client.get("/v1/archive/a/b/c%2Fd")
    assert reply.status_code == 200, reply.text
    assert reply.json()["path"] == "a/b/c%2Fd"


async def test_custom_http_method(gw: Harness) -> None:
    """custom {kind: "SEARCH"} routes the SEARCH method."""
    _put(gw, "shelves/s2/books/x", title="Rust in action")
    reply = await gw.client.request("SEARCH", "/v1/shelves/s2/books", json={"query": "Rust"})
    assert reply.status_code == 200, reply.text
    assert [b["title"] for b in reply.json()["books"]] == ["Rust in action"]


async def test_additional_bindings(gw: Harness) -> None:
    """The main binding and an additional one reach the same method."""
    first = await gw.client.get("/v1/shelves/s9")
    second = await gw.client.get("/v2/shelves/s9")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() == {"name": "shelves/s9", "bookCount": "0"}
    assert len(gw.library.requests["GetShelf"]) == 2


async def test_single_segment_variable_is_percent_decoded(gw: Harness) -> None:
    """GET /v1/echo/{text}: %2F and UTF-8 escapes decode into the field."""
    reply = await gw.client.get("/v1/echo/a%2Fb%20%C3%A9", headers=bearer("echo:read"))
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == "a/b é"


async def test_body_accepts_proto_and_json_names(gw: Harness) -> None:
    """Both `delay_s` and `delayS` set the same field (protobuf JSON mapping)."""
    for body in ({"text": "x", "delay_s": 0}, {"text": "y", "delayS": 0}):
        reply = await gw.client.post("/v1/echo", json=body, headers=bearer("echo:read"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["text"] == body["text"]
