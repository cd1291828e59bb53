"""The DESIGN topology built with network namespaces on this machine (root
required): ``python -m deploy.topology up|down``. The test that kills a
host under load is tests/test_topology.py (``make test-topology``)."""

from deploy.topology.topology import APP_HOSTS, CLIENT_ADDRESSES, Topology, teardown

__all__ = ["APP_HOSTS", "CLIENT_ADDRESSES", "Topology", "teardown"]
