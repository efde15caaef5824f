"""Entry point: ``python -m labgate.tools.demo``."""

from labgate.tools.demo.app import main

main()
