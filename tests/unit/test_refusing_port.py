"""`refusing_port` (tests/integration/conftest.py), which the integration tests use for an
app or peer that is gone: a connect to it is refused, and the port stays taken, so no
listener started later in the run can be handed it and answer in the refusal's place."""

from __future__ import annotations

import errno
import gc
import socket

import pytest

from tests.integration.conftest import refusing_port


def test_a_connect_is_refused() -> None:
    port = refusing_port()
    for _ in range(3):  # every time, not once
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_the_port_stays_bound_once_the_caller_drops_everything_but_the_number() -> None:
    port = refusing_port()
    gc.collect()  # a socket held only by a local would be closed by now
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError) as info:
            other.bind(("127.0.0.1", port))
    assert info.value.errno == errno.EADDRINUSE
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_each_call_is_a_port_of_its_own() -> None:
    assert len({refusing_port() for _ in range(5)}) == 5
