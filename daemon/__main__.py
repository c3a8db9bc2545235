"""`python -m daemon` is the same as the `benchhub` command."""

from daemon.cli import main

raise SystemExit(main())
