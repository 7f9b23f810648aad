"""A TCP forwarder that tests can cut and resume: a dependency (PostgreSQL, Redis) going away
and coming back, over real connections."""

from __future__ import annotations

import contextlib
import socket
import threading


class ThreadedTcpProxy:
    """A real TCP forwarder on its own thread; ``cut()`` drops every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._conns: list[socket.socket] = []
        self.port = 0
        self._listen()

    def _listen(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self._open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def resume(self) -> None:
        """Accept (and forward) again on the same port, as a restarted server would."""
        self._conns = []
        self._listen()

    def _accept(self) -> None:
        while self._open:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._open = False
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()

    def close(self) -> None:
        if self._open:
            self.cut()
