"""labgate.scheduler."""
