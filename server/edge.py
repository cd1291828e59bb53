"""Who a client is at the edge: its address, as the contract defines it.

The address is the peer's, unless the peer is a trusted proxy
(``TRUSTED_PROXIES``): then it is the right-most address of
``X-Forwarded-For`` that is not itself a trusted proxy. Addresses a client
wrote further left are its own claims and are never believed.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from server.config import Network


def _trusted(address: str, proxies: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(peer: str | None, forwarded_for: str | None, proxies: tuple[Network, ...]) -> str:
    """The client's address for limits and logs ("unknown" without a peer)."""
    if not peer:
        return "unknown"
    if not proxies or not forwarded_for or not _trusted(peer, proxies):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if not hop:
            continue
        if not _trusted(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a hop we cannot read: the proxy's own view is all we have
    return peer
