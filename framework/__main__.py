"""`python -m framework ...`: see framework.cli."""

from framework.cli import main

raise SystemExit(main())
