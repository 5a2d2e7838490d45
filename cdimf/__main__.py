"""`python -m cdimf`: the same command line as the `cdimf` console script."""

from cdimf.cli import main

raise SystemExit(main())
