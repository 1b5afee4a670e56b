"""`python -m segexp`: the same command line as `segexp`."""

from segexp.cli import main

raise SystemExit(main())
