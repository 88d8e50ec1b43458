"""`python -m framework.registry ...`: see framework.registry.cli."""

from framework.registry.cli import main

raise SystemExit(main())
