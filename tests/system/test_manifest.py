"""The system manifest loader: the repository's system.toml, overrides, and precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.system.manifest import ManifestError, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[2]


def test_the_repository_manifest_describes_the_five_services() -> None:
    """system.toml loads: five services, two payment replicas, SQLite and the store bus."""
    manifest = load_manifest(ROOT / "system.toml", environ={})
    assert [s.name for s in manifest.services] == [
        "user",
        "inventory",
        "payment",
        "notification",
        "order",
    ]
    assert manifest.service("payment").instance_names() == ["payment-1", "payment-2"]
    assert manifest.store.kind == "sqlite" and manifest.bus.kind == "store"
    assert manifest.data_dir == ROOT / "data"
    assert "events.v1.EventStoreService" in manifest.service("order").registers


def test_environment_switches_the_engines_and_ports() -> None:
    """SYSTEM_STORE / SYSTEM_BUS / ports / data dir override the file."""
    manifest = load_manifest(
        ROOT / "system.toml",
        environ={
            "SYSTEM_STORE": "postgresql://postgres@127.0.0.1:5432/test",
            "SYSTEM_BUS": "nats://127.0.0.1:4222",
            "SYSTEM_REGISTRY_PORT": "0",
            "SYSTEM_GATEWAY_PORT": "0",
            "SYSTEM_DATA_DIR": "/tmp/elsewhere",
            "SYSTEM_NAME": "shop2",
        },
    )
    assert manifest.store.kind == "postgres" and manifest.bus.kind == "nats"
    assert manifest.registry.port == 0 and manifest.gateway.port == 0
    assert manifest.data_dir == Path("/tmp/elsewhere") and manifest.name == "shop2"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "names no service"),
        (
            {"services": {"a": {"module": "x.y", "registers": ["a.v1.A"], "replicas": 0}}},
            "services.a.replicas must be 1..64",
        ),
        ({"services": {"a": {"module": "x y", "registers": ["a.v1.A"]}}}, "services.a.module"),
        ({"services": {"a": {"module": "x", "registers": []}}}, "services.a.registers"),
        (
            {"services": {"a": {"module": "x", "registers": ["a.v1.A"], "prot": 1}}},
            "unknown key(s) in [services.a]: prot",
        ),
        (
            {
                "registry": {"port": 70000},
                "services": {"a": {"module": "x", "registers": ["a.v1.A"]}},
            },
            "registry.port must be 0..65535",
        ),
        (
            {
                "store": {"url": "mysql://x"},
                "services": {"a": {"module": "x", "registers": ["a.v1.A"]}},
            },
            "store.url must be",
        ),
        (
            {
                "sagas": {"definitions": ["nocolon"]},
                "services": {"a": {"module": "x", "registers": ["a.v1.A"]}},
            },
            "sagas.definitions[0]",
        ),
        (
            {"services": {"a": {"module": "x", "registers": ["a.v1.A"], "env": {"bad-name": "1"}}}},
            "not an environment variable name",
        ),
        ({"systme": {}}, "unknown key(s) in the top level: systme"),
    ],
)
def test_mistakes_are_refused_naming_the_key(data: dict[str, object], message: str) -> None:
    """Each invalid manifest raises ManifestError whose message names what is wrong."""
    with pytest.raises(ManifestError) as refused:
        parse_manifest(data, Path("/tmp/system.toml"), environ={})
    assert message in str(refused.value)


def test_a_missing_or_broken_file_says_so(tmp_path: Path) -> None:
    """No file: 'cannot read'; bad TOML: 'not valid TOML' with the file named."""
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        load_manifest(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[system\nname=")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(broken)
