"""Build a `SystemModel` from a protos directory, and optionally code and traces."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from framework.analysis.code import add_code
from framework.analysis.model import SystemModel, from_contracts
from framework.analysis.traces import TraceSpan, add_traces, read_otlp_json

__all__ = ["ContractError", "load_system"]


class ContractError(ValueError):
    """The contracts could not be read (missing directory, a proto that does not compile)."""


def load_system(
    protos: Path,
    code: Path | None = None,
    traces: Path | Sequence[TraceSpan] | None = None,
    exclude_contexts: Sequence[str] = (),
) -> SystemModel:
    """The model of the system: contracts always, code and traces when given.

    `exclude_contexts` leaves out whole bounded contexts (e.g. the test kit's `testing`)
    with every edge that touches them.
    """
    from framework.reference import compile_contracts

    if not protos.is_dir():
        raise ContractError(f"protos directory {protos} does not exist")
    try:
        files = compile_contracts(protos)
    except FileNotFoundError as error:
        raise ContractError(str(error)) from None
    except RuntimeError:
        raise ContractError(
            f"the contracts under {protos} do not compile (protoc's messages are above)"
        ) from None
    model = from_contracts(files)
    if code is not None:
        add_code(model, code)
    if traces is not None:
        add_traces(model, read_otlp_json(traces) if isinstance(traces, Path) else traces)
    if exclude_contexts:
        gone = {n for n, s in model.services.items() if s.context in exclude_contexts}
        for name in gone:
            del model.services[name]
        for context in exclude_contexts:
            model.events.pop(context, None)
        model.edges = [e for e in model.edges if e.source not in gone and e.target not in gone]
        model.outside -= gone
    return model
