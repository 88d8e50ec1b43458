"""Chaos experiments and their invariants: prove under faults that nothing is lost.

See README.md in this package.  `python -m framework chaos run EXPERIMENTS...` runs
experiment files (`experiment.py`) against a system started from its manifest
(`system.py`), with a bounded load (`load.py`), faults (`faults.py`, `proxy.py`) and
invariants read from the services' own stores (`invariants.py`), and reports a table,
JSON and PNG timelines (`report.py`).  `import framework.chaos` loads no HTTP client,
database driver or plotting library.
"""
