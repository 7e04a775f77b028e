"""moto's S3 server on a fixed port that tests stop and restart (an endpoint outage); its objects
live in this process, so they survive a restart."""
from __future__ import annotations

import socket
import threading


class RestartableS3:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.server = f"http://127.0.0.1:{self.port}", None

    def start(self) -> "RestartableS3":
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart_after(self, seconds: float) -> threading.Timer:
        """Start again after `seconds` (returns the timer)."""
        t = threading.Timer(seconds, self.start)
        t.start()
        return t

    def outage(self, seconds: float) -> threading.Timer:
        """Stop now, start again after `seconds`."""
        self.stop()
        return self.restart_after(seconds)
