"""labgate.backends."""
