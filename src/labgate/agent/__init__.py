"""labgate.agent."""
