"""The fault-injecting proxy itself (tests/faultproxy.py), against SeaweedFS and a plain HTTP upstream:
forwarding verbatim on kept-alive connections, injected 503s, resets, holds, delays and outages, and chunked
bodies both ways. The fleet's faults through it are in test_faults.py and test_faults_s3.py.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from faultproxy import FaultProxy

pytestmark = pytest.mark.slow


def _client(endpoint: str, attempts: int = 8, timeout: float = 10):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, config=Config(
        retries={"mode": "standard", "max_attempts": attempts}, connect_timeout=timeout, read_timeout=timeout))


class _ChunkedEcho(http.server.BaseHTTPRequestHandler):
    """A plain HTTP/1.1 upstream: echoes a chunked request body back as a chunked response."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                break
            body += self.rfile.read(size)
            self.rfile.readline()
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(body), 1000):
            piece = body[i:i + 1000]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args):
        pass


BUCKET = "faultproxy"


@pytest.fixture
def proxied(s3_endpoint, s3_client):
    """A proxy in front of SeaweedFS and a client through it; the bucket holds `a`, 100,000 bytes of x."""
    if BUCKET not in {b["Name"] for b in s3_client.list_buckets()["Buckets"]}:
        s3_client.create_bucket(Bucket=BUCKET)
    s3_client.put_object(Bucket=BUCKET, Key="a", Body=b"x" * 100_000)
    with FaultProxy(s3_endpoint) as proxy:
        yield proxy, _client(proxy.endpoint)


def test_proxy_forwards_verbatim_on_kept_alive_connections(proxied, s3_client, tmp_path):
    """List, put, get, ranged get, a multi-MB upload_file (Expect: 100-continue): SigV4 still verifies."""
    proxy, client = proxied
    assert BUCKET in {b["Name"] for b in client.list_buckets()["Buckets"]}
    client.put_object(Bucket=BUCKET, Key="a", Body=b"x" * 100_000)
    assert client.get_object(Bucket=BUCKET, Key="a")["Body"].read() == b"x" * 100_000
    assert client.get_object(Bucket=BUCKET, Key="a", Range="bytes=5-9")["Body"].read() == b"xxxxx"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3_000_000))
    client.upload_file(str(big), BUCKET, "big")
    assert s3_client.get_object(Bucket=BUCKET, Key="big")["Body"].read() == big.read_bytes()
    assert proxy.faults == 0 and ("GET", "/") in proxy.seen


def test_proxy_injects_errors_and_resets_that_retries_absorb(proxied, s3_client):
    proxy, client = proxied
    # Two 503 SlowDown: botocore's standard retries absorb them; the proxy saw three PUTs.
    proxy.fail(503, "SlowDown", match=r"^PUT /faultproxy/b\b", times=2)
    client.put_object(Bucket=BUCKET, Key="b", Body=b"b")
    assert proxy.faults == 2 and proxy.seen.count(("PUT", "/faultproxy/b")) == 3
    assert s3_client.get_object(Bucket=BUCKET, Key="b")["Body"].read() == b"b"
    # A reset connection is retried too; a callable sees the method, path and headers.
    proxy.reset(match=lambda method, path, headers: method == "GET" and "range" in headers, times=1)
    assert client.get_object(Bucket=BUCKET, Key="a", Range="bytes=0-2")["Body"].read() == b"xxx"
    assert proxy.faults == 3


def test_proxy_holds_a_request_until_released(proxied, s3_client):
    """A held request is neither forwarded nor answered until released."""
    import botocore.exceptions

    proxy, client = proxied
    gate = proxy.hold(r"^PUT /faultproxy/held$")
    with ThreadPoolExecutor(max_workers=1) as pool:
        put = pool.submit(client.put_object, Bucket=BUCKET, Key="held", Body=b"h")
        assert proxy.wait_for(r"^PUT /faultproxy/held$", timeout=10)
        time.sleep(0.3)
        assert not put.done()
        with pytest.raises(botocore.exceptions.ClientError, match="404"):
            s3_client.head_object(Bucket=BUCKET, Key="held")
        gate.set()
        put.result(timeout=20)
    assert s3_client.get_object(Bucket=BUCKET, Key="held")["Body"].read() == b"h"


def test_proxy_delays_a_request(proxied):
    proxy, client = proxied
    proxy.delay(0.5, match=r"^HEAD /faultproxy/a$")
    started = time.monotonic()
    client.head_object(Bucket=BUCKET, Key="a")
    assert time.monotonic() - started >= 0.5


def test_proxy_outage_lasts_until_up(proxied):
    """An outage: boto3 raises once its (few) retries are spent; up() ends it."""
    import botocore.exceptions

    proxy, _ = proxied
    impatient = _client(proxy.endpoint, attempts=2, timeout=2)
    proxy.down()
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        impatient.list_buckets()
    assert proxy.faults >= 2  # every attempt was refused
    proxy.up()
    assert BUCKET in {b["Name"] for b in impatient.list_buckets()["Buckets"]}


def test_proxy_forwards_chunked_bodies_both_ways():
    """Chunked request and response bodies, through a plain HTTP upstream, twice on one kept-alive connection."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedEcho)
    threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
            port = int(proxy.endpoint.rsplit(":", 1)[1])
            payload = os.urandom(5000)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                body = b"".join(f"{len(payload[i:i + 700]):x}\r\n".encode() + payload[i:i + 700] + b"\r\n"
                                for i in range(0, len(payload), 700)) + b"0\r\n\r\n"
                request = (b"POST /echo HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
                reader = sock.makefile("rb")
                for _ in range(2):  # twice on one connection: keep-alive after chunked bodies
                    sock.sendall(request)
                    assert reader.readline().startswith(b"HTTP/1.1 200")
                    while reader.readline() != b"\r\n":
                        pass
                    echoed = b""
                    while size := int(reader.readline().split(b";")[0], 16):
                        echoed += reader.read(size)
                        reader.readline()
                    reader.readline()
                    assert echoed == payload
            assert proxy.seen == [("POST", "/echo"), ("POST", "/echo")]
    finally:
        upstream.shutdown()
        upstream.server_close()
