"""The ports that tests and benchmarks give their local server processes
(``server.devstack.process.free_port``)."""

from __future__ import annotations

import socket

from server.devstack import process


def test_a_local_server_port_is_free_and_never_one_the_kernel_gives_outgoing_connections():
    """A port of the ephemeral range, found free, can become the local port
    of a client socket (to PostgreSQL, Redis) before the server process it
    was meant for binds it, which then exits: ``free_port`` draws below
    that range and below the dev stacks' ports."""
    ephemeral_low = process._ephemeral_low()
    with socket.socket() as client:
        client.bind(("127.0.0.1", 0))  # what the kernel gives an outgoing connection
        assert client.getsockname()[1] >= ephemeral_low
    ports = {process.free_port() for _ in range(50)}
    assert len(ports) > 40  # drawn at random: one after the other, not the same
    for port in ports:
        assert process.LOCAL_PORTS[0] <= port < min(process.LOCAL_PORTS[1], ephemeral_low)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free
