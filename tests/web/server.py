"""A real HTTP server for the web tests: uvicorn on loopback, a free port, in a thread.

The socket is bound first, so the app can be made knowing its own address
(signed links are absolute), then :meth:`Server.start` serves it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class Server:
    """Serves an ASGI app on ``127.0.0.1`` until :meth:`stop`; ``url`` is its address."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, app: Any) -> Server:
        """Serve ``app`` (made knowing :attr:`url`, which links need)."""
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
