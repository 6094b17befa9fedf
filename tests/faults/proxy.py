"""A TCP proxy on loopback that a test can cut, slow down, black-hole and restore (issue #12).

    with TCPProxy(("127.0.0.1", s3_port)) as proxy:   # clients talk to proxy.url
        proxy.cut()         # connections reset, new ones refused: the endpoint is down
        proxy.blackhole()   # connections accepted, never answered: the endpoint hangs
        proxy.slow(0.5)     # every chunk forwarded after 0.5 s
        proxy.restore()     # back to a plain pipe

Threads only (no extra process), so nothing outlives the test: ``close`` ends every connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class TCPProxy:
    def __init__(self, target: tuple[str, int], port: int = 0):
        self.target = target
        self.mode = "pass"  # pass | cut | blackhole | slow
        self.delay_s = 0.0
        self.connections_seen = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = False
        self._listener: socket.socket | None = None
        self.port = port
        self._listen()
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True)
        self._acceptor.start()

    # -- control -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Reset every open connection and refuse new ones (nothing listens on the port)."""
        with self._lock:
            self.mode = "cut"
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        self._drop_all()

    def blackhole(self) -> None:
        """Accept connections and never answer (open connections stall too)."""
        self._ensure_listening()
        self.mode = "blackhole"

    def slow(self, delay_s: float) -> None:
        """Forward every chunk after ``delay_s`` seconds."""
        self._ensure_listening()
        self.delay_s = delay_s
        self.mode = "slow"

    def restore(self) -> None:
        self._ensure_listening()
        self.mode = "pass"

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._acceptor.join(timeout=5)

    def __enter__(self) -> TCPProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------
    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.2)
        self.port = s.getsockname()[1]
        self._listener = s

    def _ensure_listening(self) -> None:
        with self._lock:
            if self._listener is None and not self._closed:
                self._listen()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            with contextlib.suppress(OSError):
                c.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections_seen += 1
            with self._lock:
                self._conns.append(client)
            if self.mode == "blackhole":
                continue  # held open, never read, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                with contextlib.suppress(OSError):
                    client.close()
                continue
            with self._lock:
                self._conns.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        try:
            while not self._closed:
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                while self.mode == "blackhole" and not self._closed:
                    time.sleep(0.05)  # stall: the bytes are held, nothing is answered
                if self.mode == "slow":
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
