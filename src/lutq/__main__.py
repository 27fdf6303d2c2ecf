"""`python -m lutq ...`: the same CLI as the `lutq` command (for environments without the entry point)."""

from lutq.cli import main

main()
