"""The identity tests' fixtures live in idp_servers.py (the tests import its helpers too)."""

from idp_servers import oidc_issuer, portal_port, portal_with, slapd

__all__ = ["oidc_issuer", "portal_port", "portal_with", "slapd"]
