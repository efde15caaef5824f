"""labgate.router."""
