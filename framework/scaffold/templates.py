"""The files `python -m framework new service NAME` writes, as `string.Template`s.

`${name}` is the service's name (`catalog`), `${Name}` its CamelCase (`Catalog`).
Each file follows the project's layout: the contract with its policy and validation
rules, three layers (domain, application with its store, servicer), the composition
root on the system runtime, and a test through real gRPC with the test kit's keys.
"""

from __future__ import annotations

from string import Template

__all__ = ["FILES", "MANIFEST_ENTRY"]

PROTO = Template("""\
// The ${name} context: ${name} items, created by their callers and read by id.
// Scaffolded by `python -m framework new service ${name}`; make it yours.
syntax = "proto3";

package ${name}.v1;

import "buf/validate/validate.proto";
import "framework/v1/options.proto";
import "google/api/annotations.proto";

// One item of the ${name} context.
message Item {
  // UUID chosen by the caller of CreateItem.
  string item_id = 1;
  // What the item is called.
  string title = 2;
  // Price in minor units (cents).
  int64 price_minor = 3;
}

// Create an item; the same item_id again returns the first one.
message CreateItemRequest {
  // A rule across fields, in CEL: a free item needs a title saying so.
  option (buf.validate.message).cel = {
    id: "item.free_is_named"
    message: "a free item (price_minor 0) must have 'free' in its title"
    expression: "this.price_minor > 0 || this.title.lowerAscii().contains('free')"
  };
  // UUID chosen by the caller (retries send the same).
  string item_id = 1 [(buf.validate.field) = {required: true, string: {uuid: true}}];
  // 1 to 200 characters.
  string title = 2 [(buf.validate.field) = {required: true, string: {max_len: 200}}];
  // Price in minor units, 0 to 10,000,000.
  int64 price_minor = 3 [(buf.validate.field) = {int64: {gte: 0, lte: 10000000}}];
}

// The item as stored.
message CreateItemResponse {
  // The item created (or the one created before under this id).
  Item item = 1;
}

// Read one item.
message GetItemRequest {
  // UUID of the item.
  string item_id = 1 [(buf.validate.field) = {required: true, string: {uuid: true}}];
}

// The item.
message GetItemResponse {
  // The item.
  Item item = 1;
}

// ${Name} items: create and read.
service ${Name}Service {
  option (framework.v1.service_policy) = {
    bounded_context: "${name}"
    owns: ["Item"]
  };

  // Create an item (idempotent by item_id).
  rpc CreateItem(CreateItemRequest) returns (CreateItemResponse) {
    option (framework.v1.method_policy) = {
      scopes: "${name}:write"
      idempotent: true
      timeout_s: 5
    };
    option (google.api.http) = {
      post: "/v1/${name}/items"
      body: "*"
    };
  }

  // Read one item; NOT_FOUND when there is none.
  rpc GetItem(GetItemRequest) returns (GetItemResponse) {
    option (framework.v1.method_policy) = {
      scopes: "${name}:read"
      idempotent: true
      timeout_s: 2
    };
    option (google.api.http) = {get: "/v1/${name}/items/{item_id}"};
  }
}
""")

INIT = Template('''\
"""The ${name} service (scaffolded by `python -m framework new service ${name}`)."""
''')

DOMAIN = Template('''\
"""${Name} rules: what an item is and when two creations are the same. No grpc, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from framework.errors import AlreadyExistsError, NotFoundError

__all__ = ["DOMAIN", "Item", "already_taken", "not_found"]

DOMAIN = "${name}.v1"


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str
    price_minor: int

    def same_as(self, other: Item) -> bool:
        """A repeated creation (a retry) carries the same fields."""
        return (self.title, self.price_minor) == (other.title, other.price_minor)


def not_found(item_id: str) -> NotFoundError:
    return NotFoundError(f"no item {item_id}", reason="ITEM_NOT_FOUND", domain=DOMAIN)


def already_taken(item_id: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"item {item_id} exists with other fields; choose a new item_id",
        reason="ITEM_ID_TAKEN",
        domain=DOMAIN,
    )
''')

STORE = Template('''\
"""Items in the service's own database (SQLite by default, PostgreSQL when configured)."""

from __future__ import annotations

from framework.system.database import ServiceDatabase
from services.${name}.domain import Item

__all__ = ["SCHEMA", "SqlItemStore"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {items} (
        item_id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        price_minor BIGINT NOT NULL
    )""",
)
_SELECT = "SELECT item_id, title, price_minor FROM {items} WHERE item_id = ?"


class SqlItemStore:
    def __init__(self, db: ServiceDatabase) -> None:
        self.db = db

    async def setup(self) -> None:
        await self.db.script(SCHEMA)

    async def insert(self, item: Item) -> Item:
        """Store `item` unless its id exists; return what is stored under the id."""
        async with self.db.transaction() as tx:
            await self.db.execute(
                tx,
                "INSERT INTO {items} (item_id, title, price_minor) VALUES (?, ?, ?) "
                "ON CONFLICT (item_id) DO NOTHING",
                item.item_id,
                item.title,
                item.price_minor,
            )
            row = await self.db.fetchone(tx, _SELECT, item.item_id)
        assert row is not None  # inserted above, or there before
        return Item(row[0], row[1], int(row[2]))

    async def get(self, item_id: str) -> Item | None:
        async with self.db.transaction() as tx:
            row = await self.db.fetchone(tx, _SELECT, item_id)
        return Item(row[0], row[1], int(row[2])) if row is not None else None
''')

APPLICATION = Template('''\
"""${Name} use cases; collaborators are passed in."""

from __future__ import annotations

import logging

from services.${name}.domain import Item, already_taken, not_found
from services.${name}.store import SqlItemStore

__all__ = ["Items"]

logger = logging.getLogger(__name__)


class Items:
    def __init__(self, store: SqlItemStore) -> None:
        self.store = store

    async def create(self, item: Item) -> Item:
        """Create `item`; a retry with the same fields returns it, other fields conflict."""
        stored = await self.store.insert(item)
        if not stored.same_as(item):
            raise already_taken(item.item_id)
        logger.info("item %s: %s", stored.item_id, stored.title)
        return stored

    async def get(self, item_id: str) -> Item:
        found = await self.store.get(item_id)
        if found is None:
            raise not_found(item_id)
        return found
''')

SERVICER = Template('''\
"""gRPC edge of the ${name} service: proto <-> application, nothing else."""

from __future__ import annotations

import grpc

from gen.${name}.v1 import ${name}_pb2 as pb
from gen.${name}.v1 import ${name}_pb2_grpc
from services.${name}.application import Items
from services.${name}.domain import Item

__all__ = ["${Name}Servicer"]


def _message(item: Item) -> pb.Item:
    return pb.Item(item_id=item.item_id, title=item.title, price_minor=item.price_minor)


class ${Name}Servicer(${name}_pb2_grpc.${Name}ServiceServicer):
    def __init__(self, items: Items) -> None:
        self.items = items

    async def CreateItem(
        self, request: pb.CreateItemRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateItemResponse:
        item = Item(request.item_id, request.title, request.price_minor)
        return pb.CreateItemResponse(item=_message(await self.items.create(item)))

    async def GetItem(
        self, request: pb.GetItemRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetItemResponse:
        return pb.GetItemResponse(item=_message(await self.items.get(request.item_id)))
''')

MAIN = Template('''\
"""Composition root of the ${name} service.

    python -m services.${name}.main

Environment: the runtime's `SERVICE_*` (see `framework.system.runtime`); `python -m
framework up` sets them for every service of the manifest (system.toml).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from framework.events.typeregistry import EventTypeRegistry
from framework.health import Check
from framework.server import Server
from framework.system.database import ServiceDatabase
from framework.system.runtime import RuntimeConfig, ServiceRuntime
from services.${name}.application import Items
from services.${name}.servicer import ${Name}Servicer
from services.${name}.store import SqlItemStore

__all__ = ["SERVICE", "${Name}Service", "build", "main"]

SERVICE = "${name}.v1.${Name}Service"


@dataclass(frozen=True, slots=True)
class ${Name}Service:
    server: Server
    items: Items
    db: ServiceDatabase


async def build(config: RuntimeConfig) -> ${Name}Service:
    """The server with the system's standard chain (access log, auth with the contract's
    scopes, rate limits, idempotency keys, validation, fault injection), health and
    registration, over the service's own database."""
    runtime = ServiceRuntime(config)
    db = await runtime.open_database(EventTypeRegistry())
    store = SqlItemStore(db)
    await store.setup()
    items = Items(store)
    server = runtime.server(
        health_checks=[Check("database", db.ping, interval_s=5.0, timeout_s=2.0)],
        closing=[db],
    )
    server.add(${Name}Servicer(items))
    runtime.register(server, SERVICE)
    return ${Name}Service(server, items, db)


async def run(config: RuntimeConfig) -> None:
    service = await build(config)
    await service.server.serve()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run(RuntimeConfig.from_env("${name}")))


if __name__ == "__main__":
    main()
''')

TEST = Template('''\
"""The ${name} service through real gRPC: the standard chain, validation, idempotent create."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from framework.auth.bearer import BearerToken
from framework.client import connect
from framework.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from gen.${name}.v1 import ${name}_pb2 as pb
from gen.${name}.v1.${name}_pb2_grpc import ${Name}ServiceStub
from services.${name}.main import ${Name}Service, build
from tests.services.kit import Backend, Keys, runtime_config


@pytest.fixture
async def service(keys: Keys, backend: Backend) -> AsyncIterator[${Name}Service]:
    """The ${name} service on 127.0.0.1:0 with its own database."""
    built = await build(runtime_config("${name}", keys, backend))
    await built.server.start()
    try:
        yield built
    finally:
        await built.server.stop(0)


def _stub(service: ${Name}Service, keys: Keys, scopes: list[str]) -> ${Name}ServiceStub:
    token = keys.customer(str(uuid.uuid4()), scopes)
    return ${Name}ServiceStub(connect(service.server.address, policies=[BearerToken(token)]))


def _create(item_id: str, title: str = "Blue mug", price: int = 1250) -> pb.CreateItemRequest:
    return pb.CreateItemRequest(item_id=item_id, title=title, price_minor=price)


async def test_a_created_item_is_read_back(service: ${Name}Service, keys: Keys) -> None:
    """CreateItem stores the item; GetItem returns it; a retry returns the same item."""
    stub = _stub(service, keys, ["${name}:write", "${name}:read"])
    item_id = str(uuid.uuid4())
    created = await stub.CreateItem(_create(item_id))
    again = await stub.CreateItem(_create(item_id))
    read = await stub.GetItem(pb.GetItemRequest(item_id=item_id))
    assert created.item == again.item == read.item
    assert read.item.title == "Blue mug" and read.item.price_minor == 1250


async def test_an_id_reused_for_another_item_is_refused(
    service: ${Name}Service, keys: Keys
) -> None:
    """A second CreateItem with the id but another title is ALREADY_EXISTS, named."""
    stub = _stub(service, keys, ["${name}:write"])
    item_id = str(uuid.uuid4())
    await stub.CreateItem(_create(item_id))
    with pytest.raises(AlreadyExistsError) as caught:
        await stub.CreateItem(_create(item_id, title="Red mug"))
    assert caught.value.reason == "ITEM_ID_TAKEN"


async def test_bad_requests_name_each_broken_rule(service: ${Name}Service, keys: Keys) -> None:
    """The contract's rules answer INVALID_ARGUMENT with a field violation per rule."""
    stub = _stub(service, keys, ["${name}:write"])
    with pytest.raises(InvalidArgumentError) as caught:
        await stub.CreateItem(_create("not-a-uuid", title="", price=20_000_000))
    assert [(v.field, v.rule) for v in caught.value.violations] == [
        ("item_id", "string.uuid"),
        ("title", "required"),
        ("price_minor", "int64.gte_lte"),
    ]
    with pytest.raises(InvalidArgumentError) as free:
        await stub.CreateItem(_create(str(uuid.uuid4()), title="Mug", price=0))
    assert [v.rule for v in free.value.violations] == ["item.free_is_named"]


async def test_scopes_come_from_the_contract(service: ${Name}Service, keys: Keys) -> None:
    """A reader may not create; a missing item is NOT_FOUND."""
    reader = _stub(service, keys, ["${name}:read"])
    with pytest.raises(PermissionDeniedError):
        await reader.CreateItem(_create(str(uuid.uuid4())))
    with pytest.raises(NotFoundError):
        await reader.GetItem(pb.GetItemRequest(item_id=str(uuid.uuid4())))
''')

MANIFEST_ENTRY = Template("""
[services.${name}]
module = "services.${name}.main"
registers = ["${name}.v1.${Name}Service"]
""")

# path template -> content template
FILES: dict[str, Template] = {
    "protos/${name}/v1/${name}.proto": PROTO,
    "services/${name}/__init__.py": INIT,
    "services/${name}/domain.py": DOMAIN,
    "services/${name}/store.py": STORE,
    "services/${name}/application.py": APPLICATION,
    "services/${name}/servicer.py": SERVICER,
    "services/${name}/main.py": MAIN,
    "tests/services/test_${name}.py": TEST,
}
