"""Purpose-built contract sets, written per test into a temporary protos/ tree."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

Writer = Callable[..., Path]


def _service(
    package: str,
    name: str,
    context: str,
    depends_on: Sequence[str] = (),
    owns: Sequence[str] = (),
    extra: str = "",
    response_fields: str = "",
) -> str:
    deps = ", ".join(f'"{d}"' for d in depends_on)
    owned = ", ".join(f'"{o}"' for o in owns)
    return f"""syntax = "proto3";
package {package};
import "framework/v1/options.proto";
{extra}
message Do{name}Request {{ string id = 1; }}
message Do{name}Response {{ string id = 1; {response_fields} }}
service {name} {{
  option (framework.v1.service_policy) = {{
    bounded_context: "{context}" depends_on: [{deps}] owns: [{owned}]
  }};
  rpc Do{name}(Do{name}Request) returns (Do{name}Response);
}}
"""


@pytest.fixture
def contracts(tmp_path: Path) -> Writer:
    """`contracts(area=dict(...))` writes protos/<area>/v1/<area>.proto; returns the root."""
    root = tmp_path / "protos"
    (root / "framework" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "protos/framework/v1/options.proto", root / "framework/v1/options.proto")

    def write(**areas: dict[str, object]) -> Path:
        for area, spec in areas.items():
            folder = root / area / "v1"
            folder.mkdir(parents=True, exist_ok=True)
            events = spec.pop("events", None)
            (folder / f"{area}.proto").write_text(_service(f"{area}.v1", **spec))  # type: ignore[arg-type]
            if events:
                body = "\n".join(f"message {e} {{ string id = 1; }}" for e in events)  # type: ignore[attr-defined]
                (folder / "events.proto").write_text(
                    f'syntax = "proto3";\npackage {area}.v1;\n{body}\n'
                )
        return root

    return write
