"""Starting a server app on a real port on 127.0.0.1 for the serving tests (uvicorn in a thread)."""

from __future__ import annotations

import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """`app` served by uvicorn in a daemon thread; `base` is its URL once /health answers 200."""

    def __init__(self, app, timeout_s: float = 180.0):
        import uvicorn

        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                if httpx.get(self.base + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
