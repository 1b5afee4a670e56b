"""`python -m segexp.cli`: the `segexp` command."""

from . import main

raise SystemExit(main())
