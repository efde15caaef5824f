"""Identity providers: who a person is, as their institution says.

A provider is a plugin found through the ``labgate.identity`` entry-point
group, like backends: ``local`` (labgate's own passwords), ``oidc`` (OpenID
Connect) and ``ldap`` are built in. :mod:`labgate.identity.base` says what a
provider implements; :mod:`labgate.identity.linking` turns what a provider
vouches for into a labgate account (first-login policy, groups, admin).
"""
