"""A small TCP proxy for fault tests: cut every link, lose one reply, or go silent.

Clients connect to ``127.0.0.1:<port>``; each connection is forwarded to
the server (a loopback port or a unix socket) by two threads, one per
direction. :meth:`TcpProxy.cut` closes every forwarded connection and
refuses new ones until :meth:`TcpProxy.restore`. :meth:`TcpProxy.lose_next_replies`
throws the next replies the server sends away and closes the
connections they came on: the server has run the command, the client never hears back.
:meth:`TcpProxy.silence` drops every byte without closing anything: a partition.
:meth:`TcpProxy.inject` sends clients bytes the server never sent.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, target: int | str) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.accepting = True
        self.lock = threading.Lock()
        self.links: list[tuple[socket.socket, socket.socket]] = []
        self.to_lose = 0
        self.replies_lost = 0
        self.silent = False
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            return upstream
        return socket.create_connection(("127.0.0.1", self.target))

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting:
                client.close()
                continue
            try:
                upstream = self._connect()
            except OSError:
                client.close()
                continue
            with self.lock:
                self.links.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if self.silent:  # a partition: bytes vanish, nobody is told
                    continue
                if from_server and self.to_lose:
                    with self.lock:
                        self.to_lose -= 1
                        self.replies_lost += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def lose_next_replies(self, count: int = 1) -> None:
        """Throw away the next ``count`` replies, closing the connection each came on."""
        with self.lock:
            self.to_lose += count

    def inject(self, data: bytes) -> None:
        """Send ``data`` to every client now, as if the server had sent it (bytes that may not be RESP)."""
        with self.lock:
            clients = [client for client, _ in self.links]
        for client in clients:
            with contextlib.suppress(OSError):
                client.sendall(data)

    def silence(self, silent: bool = True) -> None:
        """Drop every byte in both directions without closing anything (a network partition), or stop."""
        self.silent = silent

    def cut(self) -> None:
        """Close every link and refuse new connections."""
        self.accepting = False
        with self.lock:
            links, self.links = self.links, []
        for pair in links:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def restore(self) -> None:
        self.accepting = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()
