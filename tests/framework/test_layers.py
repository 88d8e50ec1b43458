"""The package layout and its layers, checked from the source: who may import whom."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "framework"

# package (or core module) -> framework modules it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "policies": ("framework.server", "framework.client", "framework.registry", "framework.events"),
    "auth": ("framework.server", "framework.client", "framework.registry", "framework.events"),
    "telemetry": ("framework.server", "framework.client", "framework.registry", "framework.events"),
    # sagas reach participants through any channel; the registry and gateway are not theirs
    "saga": ("framework.registry", "framework.gateway", "framework.server_adapter"),
    "policy.py": ("framework.policies", "framework.auth", "framework.telemetry"),
    "errors.py": (
        "framework.policies",
        "framework.auth",
        "framework.telemetry",
        "framework.policy",
    ),
    "clock.py": ("framework.",),
    "config.py": ("framework.policies", "framework.auth", "framework.telemetry"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _files(entry: str) -> list[Path]:
    target = ROOT / entry
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def test_no_module_imports_a_higher_layer() -> None:
    """Policies, auth and telemetry never import server/client; the core imports no policy."""
    offences = []
    for entry, banned in FORBIDDEN.items():
        for path in _files(entry):
            for name in _imports(path):
                if any(
                    name == b or name.startswith(b if b.endswith(".") else b + ".") for b in banned
                ):
                    offences.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert offences == []


def test_core_never_imports_the_outer_packages() -> None:
    """Nothing in the core (but the CLI dispatcher) imports registry, events or later packages."""
    outer = ("framework.registry", "framework.events", "framework.saga", "framework.gateway")
    offences = []
    for path in sorted(ROOT.glob("*.py")):
        if path.name in {"cli.py", "__init__.py"}:
            continue
        for name in _imports(path):
            if any(name == o or name.startswith(o + ".") for o in outer):
                offences.append(f"{path.name} imports {name}")
    assert offences == []


def test_top_level_stays_small() -> None:
    """At most 15 modules at framework/'s top; the layers are packages a newcomer can find."""
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(modules) <= 15, modules
    for expected in ("policies/breaker.py", "auth/verifier.py", "telemetry/tracing.py"):
        assert (ROOT / expected).is_file(), expected


def test_registry_calls_do_not_import_the_channel() -> None:
    """The balanced multicallables depend on a protocol, not on the channel (no import circle)."""
    assert "framework.registry.channel" not in _imports(ROOT / "registry" / "calls.py")
