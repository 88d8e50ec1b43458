"""OpenAPI 3.1 from the descriptors: valid per the 3.1 schema, saying what the contract says."""

from __future__ import annotations

from typing import Any

from openapi_spec_validator import OpenAPIV31SpecValidator

from framework.gateway import GatewayConfig, RouteTable, openapi_document
from framework.gateway.routes import annotated_services
from tests.gateway.conftest import Harness


def _document() -> dict[str, Any]:
    services = annotated_services(include_testing=True)
    config = GatewayConfig(registry="127.0.0.1:1", jwt_secret="x" * 32)
    return openapi_document(RouteTable.from_services(services), config)


def test_document_is_valid_openapi_3_1() -> None:
    """The document of every annotated service validates against the OpenAPI 3.1 schema."""
    document = _document()
    assert document["openapi"] == "3.1.0"
    errors = [str(e) for e in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []


def test_comments_rules_and_security_are_in_the_document() -> None:
    """Proto comments become descriptions, validation rules constraints, scopes security."""
    document = _document()
    schemas = document["components"]["schemas"]
    operation = document["paths"]["/v1/stocks/{sku}:add"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["description"] == "Receive units of a product into stock."
    assert "sku" not in body["properties"]  # it is in the path
    assert body["properties"]["quantity"]["minimum"] == 1
    assert body["properties"]["quantity"]["maximum"] == 1000000
    sku = next(p for p in operation["parameters"] if p["name"] == "sku")
    assert sku["description"] == "Stock keeping unit of the product."
    assert sku["schema"]["maxLength"] == 64
    assert sku["schema"]["pattern"] == "^[A-Z0-9][A-Z0-9-]*$"
    line = schemas["inventory.v1.StockLine"]
    assert line["properties"]["sku"]["minLength"] == 1 and "sku" in line["required"]
    reserve = document["paths"]["/v1/reservations/{reservation_id}"]["put"]
    lines = reserve["requestBody"]["content"]["application/json"]["schema"]["properties"]["lines"]
    assert (lines["minItems"], lines["maxItems"]) == (1, 100)
    assert schemas["user.v1.RegisterUserRequest"]["properties"]["email"]["format"] == "email"
    assert operation["security"] == [{"bearer": ["inventory:write"]}]
    assert operation["description"] == "Receive units into stock."
    assert any(p["name"] == "Idempotency-Key" and p["required"] for p in operation["parameters"])
    public = document["paths"]["/v1/users:login"]["post"]
    assert public["security"] == []
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_binding_forms_in_the_document() -> None:
    """Path patterns for `name=...` variables, query parameters, streams, response_body."""
    document = _document()
    paths = document["paths"]
    book_path = paths["/v1/shelves/{shelf}/books/{book}"]
    assert set(book_path) == {"get", "patch", "delete"}
    get_book = book_path["get"]
    shelf = next(p for p in get_book["parameters"] if p["name"] == "shelf")
    assert shelf["schema"]["pattern"] == "^[^/]+$"
    assert "`name`" in shelf["description"]
    assert get_book["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/gateway.v1.Book"
    }
    listing = paths["/v1/shelves/{shelf}/books"]["get"]
    names = {p["name"] for p in listing["parameters"]}
    assert {"page_size", "genre", "tags", "filter.min_pages", "edition"} <= names
    watch = paths["/v1/shelves/{shelf}/books:watch"]["get"]["responses"]["200"]["content"]
    assert set(watch) == {"application/x-ndjson", "text/event-stream"}
    assert "x-search" in paths["/v1/shelves/{shelf}/books"]  # the custom SEARCH method


async def test_served_document_and_docs_page(gw: Harness) -> None:
    """/openapi.json serves the gateway's routes; /docs is a page that renders it."""
    served = await gw.client.get("/openapi.json")
    assert served.status_code == 200
    assert "/v1/echo" in served.json()["paths"]
    docs = await gw.client.get("/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "openapi.json" in docs.text
