"""Run one benchmark module in this process: `python -m tests.bench.run_one NAME`."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import sys


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    module = importlib.import_module(f"tests.bench.bench_{sys.argv[1]}")
    result = module.main()
    if inspect.iscoroutine(result):
        asyncio.run(result)


if __name__ == "__main__":
    main()
