"""``python -m labgate``: the command line."""

from labgate.cli import main

main()
