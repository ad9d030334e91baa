"""A real prometheus_client HTTP exporter in the test process, for a registry the test controls.

The service tests need a target whose values they know exactly; prometheus_client's own
start_http_server (the server khmon's daemon uses) serving a fresh CollectorRegistry is that
target, with no stand-in for the HTTP side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server


@contextlib.contextmanager
def serve(
    registry: CollectorRegistry, *, certfile: str | None = None, keyfile: str | None = None
) -> Iterator[str]:
    """Serve `registry` on 127.0.0.1 at a free port (https with certfile/keyfile); yields host:port.

    127.0.0.1 explicitly: start_http_server's default address is 0.0.0.0."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry,
                                       certfile=certfile, keyfile=keyfile)
    try:
        host, port = server.server_address[:2]
        yield f"{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
