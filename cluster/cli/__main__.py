"""`python -m cluster.cli`: the same as the `maas` command."""

from cluster.cli import main

main()
