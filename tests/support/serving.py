"""The HTTP API served by uvicorn on a background thread, for tests that want real HTTP round trips
inside one process; `wallet api` runs uvicorn in the foreground instead."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

SERVER_START_TIMEOUT_S = 30
SERVER_STOP_TIMEOUT_S = 15


@contextlib.contextmanager
def serving_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread for the block; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="wallet-api-server", daemon=True)
    thread.start()
    deadline_s = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline_s:
            server.should_exit = True
            raise RuntimeError(f"the API server did not start on {host}:{port} within {SERVER_START_TIMEOUT_S} s")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(SERVER_STOP_TIMEOUT_S)
