"""The ``demo`` tool shipped with labgate."""
