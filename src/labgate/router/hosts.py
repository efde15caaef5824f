"""Per-instance host names: which instance a ``Host`` header names, by the template.

With ``instance_host = "{id}.apps.example.org"`` every instance is served on
its own host name. The template is parsed once into a prefix and a suffix
around ``{id}``; a ``Host`` value is matched by string comparisons and a
slice, never a regular expression, once: the answer is kept by the header's
bytes, so a kept-alive browser's requests cost one dict lookup here (and one
in the route table for the id).
"""

from __future__ import annotations

from labgate.security import HANDOFF_PATH

_KNOWN_HOSTS = 65536


class InstanceHosts:
    """The ``instance_host`` template, parsed for the router's hot path.

    ``base_url`` is the public URL of an instance with ``{id}`` in it (the
    scheme and, when the public URL names one, the port), e.g.
    ``https://{id}.apps.example.org``: where browsers are sent.
    """

    __slots__ = ("_known", "_prefix", "_suffix", "base_url", "keeps_port", "template")

    def __init__(self, template: str, base_url: str) -> None:
        template = template.strip().lower()
        if template.count("{id}") != 1:
            raise ValueError(f"instance_host needs {{id}} exactly once: {template!r}")
        self.template = template
        self.keeps_port = ":" in template
        prefix, _, suffix = template.partition("{id}")
        self._prefix = prefix.encode()
        self._suffix = suffix.encode()
        self.base_url = base_url.rstrip("/")
        #: ``Host`` values seen, and the instance id each names ("" for none).
        self._known: dict[bytes, str] = {}

    def instance_of(self, host: bytes) -> str | None:
        """The instance id ``host`` names, or None when it is not an instance host."""
        known = self._known.get(host)
        if known is None:
            if len(self._known) >= _KNOWN_HOSTS:
                self._known.clear()  # a client sending made-up hosts only clears the memo
            known = self._known[host] = self._parse(host) or ""
        return known or None

    def _parse(self, host: bytes) -> str | None:
        host = host.lower()
        if not self.keeps_port:
            colon = host.rfind(b":")
            if colon > host.rfind(b"]"):
                host = host[:colon]
        prefix, suffix = self._prefix, self._suffix
        if len(host) <= len(prefix) + len(suffix):
            return None
        if not host.endswith(suffix) or not host.startswith(prefix):
            return None
        instance_id = host[len(prefix) : len(host) - len(suffix)]
        # One label: "a.b.apps.example.org" names no instance (ids have no dots).
        if b"." in instance_id:
            return None
        return instance_id.decode("latin-1")

    def url(self, instance_id: str) -> str:
        """The instance's public URL, without the trailing slash."""
        return self.base_url.replace("{id}", instance_id)

    def netloc(self, instance_id: str) -> str:
        """The instance's host (and port) as its public URL names it."""
        return self.url(instance_id).partition("://")[2]

    def callback(self, instance_id: str) -> str:
        """Where the portal sends the browser back with a hand-off code."""
        return self.url(instance_id) + HANDOFF_PATH
