"""An in-memory `gateway.v1.LibraryService` for the gateway's tests.

Every request it receives is kept in `requests` (method -> list of requests),
with the metadata it saw in `metadata`, so tests can assert what the gateway
actually sent over gRPC.  `WatchBooks` streams the shelf's books, then books
added later, and records when the gateway cancels it (`watch_cancelled`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from framework import errors
from gen.gateway.v1 import testing_pb2 as pb
from gen.gateway.v1 import testing_pb2_grpc


class LibraryServicer(testing_pb2_grpc.LibraryServiceServicer):
    def __init__(self) -> None:
        self.books: dict[str, pb.Book] = {}
        self.requests: dict[str, list[Any]] = {}
        self.metadata: dict[str, dict[str, str | bytes]] = {}
        self.added = asyncio.Condition()
        self.watch_cancelled = asyncio.Event()
        self.watch_started = asyncio.Event()

    def _seen(self, name: str, request: Any, context: Any) -> None:
        self.requests.setdefault(name, []).append(request)
        self.metadata[name] = dict(context.invocation_metadata() or ())

    def _book(self, name: str) -> pb.Book:
        book = self.books.get(name)
        if book is None:
            raise errors.NotFoundError(f"no book named {name!r}", reason="BOOK_NOT_FOUND")
        return book

    async def GetBook(self, request: pb.GetBookRequest, context: Any) -> pb.GetBookResponse:
        self._seen("GetBook", request, context)
        return pb.GetBookResponse(book=self._book(request.name))

    async def CreateBook(
        self, request: pb.CreateBookRequest, context: Any
    ) -> pb.CreateBookResponse:
        self._seen("CreateBook", request, context)
        name = f"{request.parent}/books/{request.book_id}"
        if name in self.books:
            raise errors.AlreadyExistsError(f"{name} already exists")
        book = pb.Book()
        book.CopyFrom(request.book)
        book.name = name
        async with self.added:
            self.books[name] = book
            self.added.notify_all()
        return pb.CreateBookResponse(book=book)

    async def UpdateBook(
        self, request: pb.UpdateBookRequest, context: Any
    ) -> pb.UpdateBookResponse:
        self._seen("UpdateBook", request, context)
        book = self._book(request.book.name)
        if request.update_mask.paths:
            request.update_mask.MergeMessage(request.book, book, replace_repeated_field=True)
        else:
            book.CopyFrom(request.book)
        return pb.UpdateBookResponse(book=book)

    async def ListBooks(self, request: pb.ListBooksRequest, context: Any) -> pb.ListBooksResponse:
        self._seen("ListBooks", request, context)
        found = [
            b
            for name, b in sorted(self.books.items())
            if name.startswith(request.parent + "/")
            and (not request.genre or b.genre == request.genre)
            and set(request.tags) <= set(b.tags)
            and (not request.available_only or b.available)
            and b.pages >= request.filter.min_pages
        ]
        page = found[: request.page_size] if request.page_size else found
        return pb.ListBooksResponse(books=page, total=len(found))

    async def DeleteBook(
        self, request: pb.DeleteBookRequest, context: Any
    ) -> pb.DeleteBookResponse:
        self._seen("DeleteBook", request, context)
        self._book(request.name)
        del self.books[request.name]
        return pb.DeleteBookResponse()

    async def ArchiveBook(
        self, request: pb.ArchiveBookRequest, context: Any
    ) -> pb.ArchiveBookResponse:
        self._seen("ArchiveBook", request, context)
        self._book(request.name)
        return pb.ArchiveBookResponse(archived_name=f"archive/{request.name}")

    async def GetArchivedBook(
        self, request: pb.GetArchivedBookRequest, context: Any
    ) -> pb.GetArchivedBookResponse:
        self._seen("GetArchivedBook", request, context)
        return pb.GetArchivedBookResponse(path=request.path, book=pb.Book(title="archived"))

    async def SearchBooks(
        self, request: pb.SearchBooksRequest, context: Any
    ) -> pb.SearchBooksResponse:
        self._seen("SearchBooks", request, context)
        return pb.SearchBooksResponse(
            books=[
                b
                for n, b in sorted(self.books.items())
                if n.startswith(request.parent + "/") and request.query in b.title
            ]
        )

    async def WatchBooks(
        self, request: pb.WatchBooksRequest, context: Any
    ) -> AsyncIterator[pb.WatchBooksResponse]:
        self._seen("WatchBooks", request, context)
        sent: set[str] = set()
        count = 0
        try:
            while True:
                async with self.added:
                    fresh = [
                        b
                        for n, b in sorted(self.books.items())
                        if n.startswith(request.parent + "/") and n not in sent
                    ]
                    if not fresh:
                        self.watch_started.set()
                        await self.added.wait()
                        continue
                for book in fresh:
                    sent.add(book.name)
                    yield pb.WatchBooksResponse(book=book)
                    count += 1
                    if request.count and count >= request.count:
                        if request.fail_with:
                            cls = getattr(errors, request.fail_with)
                            raise cls(f"the stream failed after {count} books (as asked)")
                        return
                self.watch_started.set()
        except asyncio.CancelledError:
            self.watch_cancelled.set()
            raise

    async def GetShelf(self, request: pb.GetShelfRequest, context: Any) -> pb.GetShelfResponse:
        self._seen("GetShelf", request, context)
        name = f"shelves/{request.shelf_id}"
        count = sum(1 for n in self.books if n.startswith(name + "/"))
        return pb.GetShelfResponse(name=name, book_count=count)
