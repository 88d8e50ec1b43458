"""`python -m tests.bench [name ...]`: run every benchmark module (or the named ones).

Each `tests/bench/bench_<name>.py` exposes `main() -> None` (sync or async) and
prints one or more `BENCH ...` lines. Modules run one after another in fresh
subprocesses so one benchmark's threads and caches never skew the next.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    wanted = [n for a in argv for n in a.replace(",", " ").split()] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(names)}")
        return 2
    failed = 0
    for name in wanted:
        print(f"== bench {name}", flush=True)
        code = subprocess.call([sys.executable, "-m", "tests.bench.run_one", name], timeout=900)
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
