"""The tool catalog and the built-in tools."""
