"""Loaded before any test module: the loopback-only environment goes in before anything imports Ray.

Ray reads `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` when it is imported; a test module that imports Ray at
collection (before a fixture's `start_ray` sets it) would otherwise put every cluster of the session on
the machine's external address.
"""

from common.runtime import use_local_env

use_local_env()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (Debian's package, loopback, a temporary directory)."""
    from tests.postgres import PostgresServer

    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
