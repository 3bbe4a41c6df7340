"""Running a broker inside the current process, on loopback, for as long as a ``with`` block lasts.

The demo and the test suites need a real HTTP broker next to the code that talks to it; this starts uvicorn in a
thread on a free port, waits until it accepts connections, and stops it cleanly, so none of them repeats the dance.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from confnb.attest.verifier import Verifier
from confnb.broker.app import create_app
from confnb.broker.limits import BrokerLimits
from confnb.broker.store import OwnerStore

_START_TIMEOUT_S = 30


@contextlib.contextmanager
def serve_locally(
    store: OwnerStore, verifier: Verifier | None = None, limits: BrokerLimits | None = None
) -> Iterator[str]:
    """Serve ``store`` on 127.0.0.1 at a free port, with the broker's limits; yields the base URL."""
    import uvicorn

    from confnb.broker.server import uvicorn_config

    limits = limits or BrokerLimits()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config = uvicorn_config(
        create_app(store, verifier or Verifier(kds=None), limits), limits, "127.0.0.1", port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"confnb-broker-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the local broker did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
