"""A fault-injecting HTTP reverse proxy on 127.0.0.1, for tests against a real S3 server (SeaweedFS).

    with FaultProxy("http://127.0.0.1:8333") as proxy:
        client = boto3.client("s3", endpoint_url=proxy.endpoint)
        proxy.fail(503, "SlowDown", match=r"^PUT ", times=2)   # the next 2 PUTs answer 503 SlowDown
        proxy.reset(match=r"^GET ", times=1)                    # the next GET's connection is reset (RST)
        gate = proxy.hold(r"^PUT .*/manifest\\.json")          # that PUT waits, unanswered, until gate.set()
        proxy.reset(match=r"/lock\\.json", times=1, after_forward=True)  # S3 acts on it; its answer is lost

Requests are forwarded byte for byte (request line, headers including the client's Host, body), so
SigV4 signatures still verify upstream. Client connections are kept alive (HTTP/1.1, Content-Length or
chunked bodies, `Expect: 100-continue`); every forwarded request gets its own upstream connection. The
HTTP wire itself (reading heads and bodies, RST closes, the injected error answers) is in faultproxy_http.py.

`match`: None (every request), a regex searched in f"{method} {path_with_query}", or a callable
(method, path_with_query) -> bool; a callable that takes a third argument also gets the request's
headers (a dict, lower-case names), e.g. to tell a ranged GET's range.

Rules are checked in the order they were added. `hold` and `delay` rules act and let the request go on
to the next rules; `fail`, `reset` and `down` end it. A rule limited by `times` counts the requests it
acted on; one limited by `seconds` expires that long after it was added.

Besides `seen` (method, path?query) and `faults` (requests answered with an injected fault), `peers`
holds each seen request's client address, and `peer_of(match)` the first matching one's, so that a test
can find the process that sent a held request (its TCP connection's local port).
"""

from __future__ import annotations

import inspect
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from faultproxy_http import _abort, _client_gone, _Closed, _Conn, _Discard, _error_response, _parse_head, _Request

_IDLE_S = 120.0  # a client connection idle this long is closed
_UPSTREAM_TIMEOUT_S = 60.0


def _matcher(match) -> Callable[[str, str, dict], bool]:
    if match is None:
        return lambda method, path, headers: True
    if isinstance(match, str):
        pattern = re.compile(match)
        return lambda method, path, headers: pattern.search(f"{method} {path}") is not None
    if callable(match):
        try:
            params = inspect.signature(match).parameters.values()
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            takes_headers = len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
        except (TypeError, ValueError):
            takes_headers = False
        if takes_headers:
            return lambda method, path, headers: bool(match(method, path, headers))
        return lambda method, path, headers: bool(match(method, path))
    raise TypeError(f"match: expected None, a regex string or a callable, got {match!r}")


@dataclass
class _Rule:
    kind: str  # fail | reset | delay | hold
    test: Callable[[str, str, dict], bool]
    times: int | None = None
    until: float | None = None
    status: int = 503
    code: str = "SlowDown"
    seconds: float = 0.0  # delay
    event: threading.Event | None = None  # hold
    after_forward: bool = False  # reset: forward first, then reset instead of relaying the answer
    acted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, path: str, headers: dict) -> bool:
        """True if this rule acts on this request (and counts it)."""
        if self.until is not None and time.monotonic() >= self.until:
            return False
        if self.event is not None and self.event.is_set():
            return False
        if not self.test(method, path, headers):
            return False
        with self._lock:
            if self.times is not None and self.acted >= self.times:
                return False
            self.acted += 1
        return True


class FaultProxy:
    """A reverse proxy to `target` on a free port of 127.0.0.1 that can fail, reset, delay and hold
    requests. A context manager; it stops itself (server socket, client connections, held requests)."""

    def __init__(self, target: str):
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target: expected http://host:port, got {target!r}")
        self.target = (parts.hostname, parts.port or 80)
        self.seen: list[tuple[str, str]] = []
        self.peers: list[tuple[str, int]] = []  # the client address of each request in `seen`
        self.faults = 0
        self._seen_full: list[tuple[str, str, dict]] = []
        self._rules: list[_Rule] = []
        self._down = False
        self._lock = threading.Lock()
        self._seen_cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._clients: set[socket.socket] = set()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve(self.request, self.client_address)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            block_on_close = False

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            for rule in self._rules:
                if rule.event is not None:
                    rule.event.set()
            clients = list(self._clients)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for sock in clients:
            _abort(sock)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ rules
    def _add(self, rule: _Rule, seconds: float | None) -> _Rule:
        if seconds is not None:
            rule.until = time.monotonic() + seconds
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail(self, status: int = 503, code: str = "SlowDown", match=None, times: int | None = None,
             seconds: float | None = None) -> None:
        """Answer matching requests with an S3-style XML error instead of forwarding them."""
        self._add(_Rule("fail", _matcher(match), times=times, status=status, code=code), seconds)

    def reset(self, match=None, times: int | None = None, seconds: float | None = None,
              after_forward: bool = False) -> None:
        """Close matching requests' client connections abruptly (RST), without an answer. `after_forward`:
        forward the request first (the server acts on it), then reset instead of relaying the answer: a
        response lost on the way back."""
        self._add(_Rule("reset", _matcher(match), times=times, after_forward=after_forward), seconds)

    def delay(self, seconds_per_request: float, match=None) -> None:
        """Forward matching requests after a pause."""
        self._add(_Rule("delay", _matcher(match), seconds=seconds_per_request), None)

    def hold(self, match) -> threading.Event:
        """Hold matching requests (neither forwarded nor answered) until the returned event is set. A held
        request whose client has gone away meanwhile (killed) is dropped, not forwarded."""
        event = threading.Event()
        self._add(_Rule("hold", _matcher(match), event=event), None)
        return event

    def down(self) -> None:
        """Reset every request's connection until up(): an outage."""
        self._down = True

    def up(self) -> None:
        self._down = False

    def clear(self) -> None:
        """Drop every rule (held requests are released) and end an outage."""
        with self._lock:
            rules, self._rules = self._rules, []
        for rule in rules:
            if rule.event is not None:
                rule.event.set()
        self._down = False

    def wait_for(self, match, timeout: float) -> bool:
        """Block until a request matching `match` has been seen (True) or `timeout` seconds pass (False)."""
        test = _matcher(match)
        deadline = time.monotonic() + timeout
        with self._seen_cond:
            checked = 0
            while True:
                for method, path, headers in self._seen_full[checked:]:
                    if test(method, path, headers):
                        return True
                checked = len(self._seen_full)
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._seen_cond.wait(min(left, 0.2))

    def peer_of(self, match) -> tuple[str, int] | None:
        """The client address (host, port) of the first request seen that matches `match`."""
        test = _matcher(match)
        with self._lock:
            for (method, path, headers), peer in zip(self._seen_full, self.peers, strict=True):
                if test(method, path, headers):
                    return peer
        return None

    # ------------------------------------------------------------------ serving
    def _record(self, req: _Request, peer: tuple[str, int]) -> None:
        with self._seen_cond:
            self.seen.append((req.method, req.target))
            self._seen_full.append((req.method, req.target, req.headers))
            self.peers.append(peer)
            self._seen_cond.notify_all()

    def _count_fault(self) -> None:
        with self._lock:
            self.faults += 1

    def _serve(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.settimeout(_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stalls between head and body
        with self._lock:
            self._clients.add(sock)
        conn = _Conn(sock)
        try:
            while not self._stopping.is_set():
                try:
                    head = conn.read_until(b"\r\n\r\n")
                except (_Closed, TimeoutError):
                    return
                request_line, headers = _parse_head(head)
                parts = request_line.split(" ")
                if len(parts) != 3:
                    return
                req = _Request(head, parts[0], parts[1], headers)
                self._record(req, peer)
                if not self._handle(sock, conn, req):
                    return
        except (_Closed, OSError):
            return
        finally:
            with self._lock:
                self._clients.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _rules_for(self, req: _Request) -> list[_Rule]:
        with self._lock:
            rules = list(self._rules)
        acting = []
        for rule in rules:
            if rule.take(req.method, req.target, req.headers):
                acting.append(rule)
                if rule.kind in ("fail", "reset"):
                    break
        return acting

    def _read_body(self, conn: _Conn, req: _Request) -> bytes:
        if req.headers.get("transfer-encoding", "").lower() == "chunked":
            return b"".join(conn.chunked())
        n = int(req.headers.get("content-length", "0") or 0)
        return conn.read_exact(n) if n else b""

    def _handle(self, sock: socket.socket, conn: _Conn, req: _Request) -> bool:
        """Act on one request; False: the client connection is finished."""
        expects = req.headers.get("expect", "").lower() == "100-continue"
        if self._down:
            self._count_fault()
            _abort(sock)
            return False
        for rule in self._rules_for(req):
            if rule.kind == "hold":
                assert rule.event is not None
                while not rule.event.wait(0.05):
                    if self._stopping.is_set() or _client_gone(conn):
                        _abort(sock)
                        return False
                if self._stopping.is_set() or _client_gone(conn):
                    _abort(sock)
                    return False
            elif rule.kind == "delay":
                if self._stopping.wait(rule.seconds):
                    return False
            elif rule.kind == "reset":
                self._count_fault()
                if rule.after_forward:
                    if expects:
                        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    req.body = self._read_body(conn, req)
                    self._forward(_Discard(), req)
                _abort(sock)
                return False
            elif rule.kind == "fail":
                self._count_fault()
                if not expects:
                    self._read_body(conn, req)  # the client sends it right away
                sock.sendall(_error_response(req, rule.status, rule.code))
                return False  # `Connection: close` was in the answer
        if expects:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        req.body = self._read_body(conn, req)
        return self._forward(sock, req)

    def _forward(self, sock, req: _Request) -> bool:
        try:
            upstream = socket.create_connection(self.target, timeout=_UPSTREAM_TIMEOUT_S)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.sendall(_error_response(req, 502, "BadGateway"))
            return False
        try:
            upstream.sendall(req.head + req.body)
            up = _Conn(upstream)
            while True:
                head = up.read_until(b"\r\n\r\n")
                status_line, headers = _parse_head(head)
                status = int(status_line.split(" ")[1])
                if 100 <= status < 200:  # our own `100 Continue` already went to the client
                    continue
                break
            sock.sendall(head)
            keep = headers.get("connection", "").lower() != "close"
            if req.method == "HEAD" or status in (204, 304):
                pass
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                for piece in up.chunked():
                    sock.sendall(piece)
            elif "content-length" in headers:
                for piece in up.sized(int(headers["content-length"])):
                    sock.sendall(piece)
            else:  # delimited by the end of the stream
                keep = False
                while piece := up.read_some():
                    sock.sendall(piece)
            return keep and req.headers.get("connection", "").lower() != "close"
        except (_Closed, OSError, ValueError, IndexError):
            _abort(sock)
            return False
        finally:
            upstream.close()
