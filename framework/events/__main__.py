"""`python -m framework.events rebuild ...`: see `framework.events.cli`."""

from framework.events.cli import main

raise SystemExit(main())
