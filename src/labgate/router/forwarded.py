"""Who the client is: the connection's peer, or what a trusted proxy in front says.

The router tells the portal and the tools the client's address in
``X-Forwarded-For`` (the portal's sign-in limits count per address). By
default that is the peer of the connection, and whatever ``X-Forwarded-For``
a client sends is dropped: anyone could write anything there. Only when the
peer is one of the ``trusted_proxies`` (a load balancer or TLS terminator in
front of labgate) does the router read the header, from the right: the first
address that is not itself a trusted proxy is the client.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=16)
def networks(trusted: tuple[str, ...]) -> tuple[Network, ...]:
    """The trusted proxies' networks (validated once, in the settings)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in trusted)


def _trusted(address: str, nets: tuple[Network, ...]) -> bool | None:
    """Whether ``address`` is a trusted proxy; None when it is no IP address."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def is_trusted_proxy(peer: bytes, trusted: tuple[str, ...]) -> bool:
    """Whether a connection from ``peer`` comes from a trusted proxy."""
    return bool(trusted) and bool(_trusted(peer.decode("latin-1"), networks(trusted)))


def client_address(peer: bytes, forwarded_for: bytes, trusted: tuple[str, ...]) -> bytes:
    """The client a trusted proxy at ``peer`` names in ``X-Forwarded-For``.

    Read from the right, skipping trusted proxies; a garbled entry stops the
    walk (what lies left of it cannot be believed) and the last address
    believed so far is the client.
    """
    nets = networks(trusted)
    client = peer
    for entry in reversed(forwarded_for.decode("latin-1").split(",")):
        verdict = _trusted(entry, nets)
        if verdict is None:
            break
        client = entry.strip().encode()
        if not verdict:
            break
    return client
