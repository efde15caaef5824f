"""labgate.portal."""
