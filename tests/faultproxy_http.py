"""The HTTP/1.1 wire for `FaultProxy` (tests/faultproxy.py): buffered socket reads (heads, sized and
chunked bodies, passed on verbatim), closing with a TCP RST, telling a client that went away, and the
S3-style XML error an injected fault answers with.
"""

from __future__ import annotations

import select
import socket
import struct
import uuid

_MAX_HEAD = 64 << 10


class _Closed(Exception):
    """The peer closed its connection (or sent something that is not HTTP)."""


class _Request:
    def __init__(self, head: bytes, method: str, target: str, headers: dict[str, str]):
        self.head, self.method, self.target, self.headers = head, method, target, headers
        self.body = b""


class _Conn:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except (ConnectionError, OSError) as exc:
            raise _Closed(str(exc)) from None
        if not data:
            raise _Closed("eof")
        self.buf += data

    def read_until(self, sep: bytes, limit: int = _MAX_HEAD) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out, self.buf = self.buf[:i + len(sep)], self.buf[i + len(sep):]
                return out
            if len(self.buf) > limit:
                raise _Closed("header too long")
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_some(self) -> bytes:
        """What is buffered, or one recv (b"" at the end of the stream)."""
        if not self.buf:
            try:
                self._fill()
            except _Closed:
                return b""
        out, self.buf = self.buf, b""
        return out

    def chunked(self):
        """Yield a chunked body's raw bytes (sizes, data, trailers) verbatim, up to its end."""
        while True:
            line = self.read_until(b"\r\n")
            yield line
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = self.read_until(b"\r\n")
                    yield trailer
                    if trailer == b"\r\n":
                        return
            yield from self.sized(size + 2)  # the data and its CRLF

    def sized(self, n: int):
        while n > 0:
            if not self.buf:
                self._fill()
            piece = self.buf[:n]
            self.buf = self.buf[len(piece):]
            n -= len(piece)
            yield piece


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _abort(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    if not isinstance(sock, socket.socket):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _client_gone(conn: _Conn) -> bool:
    """True if the client closed or reset its connection. What it sent meanwhile (a body after
    `Expect: 100-continue` timed out) is kept in the connection's buffer."""
    try:
        while select.select([conn.sock], [], [], 0)[0]:
            data = conn.sock.recv(1 << 16)
            if not data:
                return True
            conn.buf += data
        return False
    except (OSError, ValueError):
        return True


class _Discard:
    """A client socket stand-in that swallows the answer (for a reset after forwarding)."""

    def sendall(self, data: bytes) -> None:
        pass


def _error_response(req: _Request, status: int, code: str) -> bytes:
    reasons = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error",
               502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
    body = b"" if req.method == "HEAD" else (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by FaultProxy</Message>"
        f"<Resource>{req.target.split('?', 1)[0]}</Resource><RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
    ).encode()
    length = len(body) if req.method != "HEAD" else 0
    head = (f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()
    return head + body
