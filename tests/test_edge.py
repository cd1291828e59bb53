"""The client's address at the edge: the peer, or behind a trusted proxy the
right-most forwarded address that is not a proxy."""

from server.config import Config
from server.edge import client_address


def proxies(*nets: str) -> tuple:
    import ipaddress

    return tuple(ipaddress.ip_network(n, strict=False) for n in nets)


def test_without_trusted_proxies_the_address_is_the_peer_whatever_it_forwards():
    assert client_address("203.0.113.9", "1.2.3.4", ()) == "203.0.113.9"


def test_behind_a_trusted_proxy_the_right_most_untrusted_forwarded_address_counts():
    trusted = proxies("10.0.0.0/8", "127.0.0.1")
    # The client wrote 6.6.6.6 itself; the proxy appended what it saw.
    assert client_address("127.0.0.1", "6.6.6.6, 198.51.100.7, 10.1.2.3", trusted) == "198.51.100.7"


def test_a_peer_that_is_not_a_trusted_proxy_cannot_claim_another_address():
    assert client_address("198.51.100.7", "1.2.3.4", proxies("10.0.0.0/8")) == "198.51.100.7"


def test_unreadable_or_missing_forwarded_addresses_fall_back_to_the_peer():
    trusted = proxies("127.0.0.0/8")
    assert client_address("127.0.0.1", "not-an-ip", trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", None, trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", " , ", trusted) == "127.0.0.1"
    assert client_address(None, "1.2.3.4", trusted) == "unknown"


def test_trusted_proxies_are_read_as_addresses_or_cidr_ranges(monkeypatch):
    monkeypatch.setenv("TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8,::1")
    assert [str(n) for n in Config.from_env().trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
