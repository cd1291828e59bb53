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


class SocketCounts:
    """A process's open sockets, in all and per client address, for the caps
    checked before an upgrade (``MAX_SOCKETS``, ``MAX_SOCKETS_PER_ADDRESS``).
    An address's entry exists only while it has a socket: a client that
    comes once does not leave an entry behind."""

    def __init__(self) -> None:
        self.total = 0
        self._by_address: dict[str, int] = {}

    def of(self, address: str) -> int:
        return self._by_address.get(address, 0)

    @property
    def addresses(self) -> int:
        return len(self._by_address)

    def add(self, address: str) -> None:
        self.total += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1

    def remove(self, address: str) -> None:
        self.total -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]
