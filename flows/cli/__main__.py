"""`python -m flows.cli ...` is `cai ...` (the tests start it this way)."""

from flows.cli import main

main()
