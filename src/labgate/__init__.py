"""labgate: research tools next to the data, behind one authenticated front door."""

__version__ = "0.1.0"
