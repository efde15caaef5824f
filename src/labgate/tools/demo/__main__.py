"""Entry point: ``python -m labgate.tools.demo``."""

from labgate.tools.demo.server import main

main()
