"""A loopback TCP proxy a test can break on demand: a database outage, a hang or a slow link.

Modes (switch with the methods of the same name; :meth:`TcpProxy.heal` goes back to forwarding):

* ``reset`` (:meth:`TcpProxy.stop`): refuses new connections and cuts the open ones, like a
  database restart or a network partition that sends RSTs; :meth:`TcpProxy.start` serves again.
  :meth:`TcpProxy.cut` only cuts the open ones.
* ``hang``: the kernel still accepts and acknowledges, nothing ever answers - a hung server, a
  route black-holed after the handshake, a stalled proxy. New connections are accepted and read
  (so the client's sends succeed) but never forwarded; with ``open_too`` the connections already
  open stop forwarding too (``new=False``: only those, later ones are served - a NAT entry or a
  proxy connection that died silently). :meth:`TcpProxy.heal` cuts what was accepted while
  hanging (its bytes were discarded) and lets the paused open connections carry on where they
  stopped, like a route that comes back.
* ``slow``: every chunk is forwarded ``latency`` seconds late, in both directions.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; see the module docstring for the modes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port: int = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._sinks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._hanging = False  # new connections go to a sink
        self._paused: set[socket.socket] = set()  # client sides that stop forwarding
        self._latency = 0.0
        self.accepted = 0  # connections accepted so far, all modes

    # -- modes -----------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._spawn(self._accept, listener)
        return self

    def stop(self) -> None:
        """``reset``: refuse new connections, cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self._hanging = False
        with self._lock:
            self._paused.clear()
            for sock in self._open | self._sinks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()
            self._sinks.clear()
        for thread in self._threads:
            thread.join(5)
        self._threads = []

    def cut(self) -> None:
        """Reset the open connections, keep listening (a server restart, seen from outside)."""
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def hang(self, *, new: bool = True, open_too: bool = True) -> None:
        """Never answer: new connections (accepted and read) with ``new``, the connections
        open now with ``open_too``; a connection opened later is served unless ``new``."""
        self._hanging = new
        if open_too:
            with self._lock:
                self._paused.update(self._open)

    def slow(self, latency: float) -> None:
        """Forward every chunk ``latency`` seconds late."""
        self._latency = latency

    def heal(self) -> None:
        """Forward normally again: cut the sinks, resume the paused connections, no latency."""
        self._hanging = False
        self._latency = 0.0
        with self._lock:
            self._paused.clear()
            sinks, self._sinks = self._sinks, set()
        for sock in sinks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- plumbing --------------------------------------------------------------------------

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self._hanging:
                with self._lock:
                    self._sinks.add(client)
                self._spawn(self._sink, client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            self._spawn(self._pump, client, upstream)

    def _sink(self, client: socket.socket) -> None:
        """Read and discard until the client (or heal/stop) closes the connection."""
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass
        with self._lock:
            self._sinks.discard(client)
        with contextlib.suppress(OSError):
            client.close()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            while True:
                try:
                    if a in self._paused:
                        # Hung: leave the bytes in the kernel's buffers; wake up to check
                        # for heal/stop (a closed socket makes the next select fail).
                        self._wait_unpaused(a)
                        continue
                    if a.fileno() < 0 or b.fileno() < 0:
                        break  # closed by stop(): epoll forgets closed sockets silently
                    for key, _ in sel.select(timeout=0.5):
                        if a in self._paused:
                            break  # hung while we waited: nothing more goes through
                        sock = key.fileobj
                        data = sock.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            raise OSError("closed")
                        if self._latency:
                            time.sleep(self._latency)  # the injected latency, not a wait
                        peer[sock].sendall(data)  # type: ignore[index]
                except (OSError, ValueError):
                    break
        with self._lock:
            for sock in (a, b):
                self._open.discard(sock)
                with contextlib.suppress(OSError):
                    sock.close()

    def _wait_unpaused(self, sock: socket.socket) -> None:
        while sock in self._paused:
            if sock.fileno() < 0:
                raise OSError("closed")
            time.sleep(0.02)  # polling for heal/stop inside the proxy's own thread
