"""`python -m lutq ...`: the same as the `lutq` command."""

from lutq.cli import main

main()
