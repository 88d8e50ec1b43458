"""Scaffolding: `python -m framework new service NAME` writes a working service.

    python -m framework new service catalog

writes, under the repository root:

- `protos/catalog/v1/catalog.proto`: a contract with the service's policy (bounded
  context, scopes, idempotency, deadlines), HTTP bindings and `buf.validate` rules
  (a CEL rule across fields included);
- `services/catalog/`: domain, application (with a store on the service's own
  database), servicer and `main.py` on the system runtime (the standard chain:
  access log, auth, rate limit, idempotency keys, validation, fault injection);
- `tests/services/test_catalog.py`: tests through real gRPC with the test kit's keys;
- a `[services.catalog]` entry in `system.toml` when there is one, so `make run` starts it;

then regenerates `gen/` (`make protos`), `docs/reference.md` and the system map, so
`make lint` and `make test` pass with nothing more to do.
"""

from __future__ import annotations

import keyword
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from framework.scaffold.templates import FILES, MANIFEST_ENTRY

__all__ = ["ScaffoldError", "ServiceName", "new_service"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


class ScaffoldError(ValueError):
    """The service cannot be scaffolded here; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class ServiceName:
    """`catalog` -> package `catalog.v1`, service `CatalogService`."""

    name: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or keyword.iskeyword(self.name):
            raise ScaffoldError(
                f"{self.name!r} is not a service name: use lowercase letters and digits "
                "(words joined by '_'), starting with a letter, e.g. 'catalog'"
            )

    @property
    def camel(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


def _render(root: Path, service: ServiceName) -> dict[Path, str]:
    values = {"name": service.name, "Name": service.camel}
    return {
        root / path.replace("${name}", service.name): template.substitute(values)
        for path, template in FILES.items()
    }


def _check_free(root: Path, service: ServiceName, files: dict[Path, str]) -> None:
    taken = [str(p.relative_to(root)) for p in files if p.exists()]
    for folder in (root / "protos" / service.name, root / "services" / service.name):
        if folder.exists():
            taken.append(str(folder.relative_to(root)) + "/")
    if (root / "framework" / service.name).exists() or service.name in {"gen", "google", "buf"}:
        taken.append(service.name)
    if taken:
        raise ScaffoldError(
            f"{service.name} exists already ({', '.join(sorted(set(taken)))}); pick another name"
        )
    for needed in ("protos", "services", "tests/services/kit.py"):
        if not (root / needed).exists():
            raise ScaffoldError(
                f"{root} has no {needed}: run `new service` at the root of the repository"
            )


def _add_to_manifest(root: Path, service: ServiceName) -> Path | None:
    manifest = root / "system.toml"
    if not manifest.exists():
        return None
    text = manifest.read_text()
    if f"[services.{service.name}]" in text:
        return None
    entry = MANIFEST_ENTRY.substitute(name=service.name, Name=service.camel)
    manifest.write_text(text.rstrip("\n") + "\n" + entry)
    return manifest


def _format(files: list[Path]) -> None:
    """ruff's format (the dev extras bring it): the files then pass `ruff format --check`."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ruff", "format", "--quiet", *map(str, files)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("ruff format did not run (%s): run `make lint` to check the files", error)
        return
    if done.returncode != 0:
        logger.warning("ruff format: %s", (done.stderr or done.stdout).strip())


def _regenerate(root: Path) -> list[str]:
    """gen/, docs/reference.md and the system map, as make protos/docs/analysis do."""
    from framework.codegen import CodegenConfig, generate
    from framework.reference import ReferenceConfig, write_reference

    done = []
    generate(CodegenConfig(proto_root=root / "protos", out_dir=root / "gen"))
    done.append("gen/")
    if (root / "docs" / "reference.md").exists():
        write_reference(ReferenceConfig(root / "protos", root / "docs" / "reference.md"))
        done.append("docs/reference.md")
    if (root / "docs" / "system.mmd").exists():
        done += _system_map(root)
    return done


def _system_map(root: Path) -> list[str]:
    from framework.analysis import analyze, load_system
    from framework.analysis.render import GraphvizMissingError, render_graph

    report = analyze(
        load_system(root / "protos", root / "services", exclude_contexts=("testing", "operations"))
    )
    written = []
    for picture in ("system.mmd", "system.svg"):
        target = root / "docs" / picture
        if not target.exists():
            continue
        try:
            render_graph(report, target)
            written.append(f"docs/{picture}")
        except GraphvizMissingError:
            logger.warning("graphviz's dot is not installed: docs/%s not redrawn", picture)
    return written


def new_service(name: str, root: Path | str = ".") -> list[Path]:
    """Write the service `name` under `root` and regenerate what depends on contracts.

    Returns the files written (the manifest too, when it was changed); raises
    `ScaffoldError` (nothing written) when the name is bad or taken.
    """
    base = Path(root).resolve()
    service = ServiceName(name)
    files = _render(base, service)
    _check_free(base, service, files)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    _format([p for p in files if p.suffix == ".py"])
    written = list(files)
    manifest = _add_to_manifest(base, service)
    if manifest is not None:
        written.append(manifest)
    regenerated = _regenerate(base)
    logger.debug("regenerated %s", ", ".join(regenerated))
    return written
