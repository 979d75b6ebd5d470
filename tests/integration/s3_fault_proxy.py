"""A fault-injecting HTTP proxy in front of an S3 endpoint (the moto server), standard library only.

It forwards every request faithfully (method, path and query, headers including ``Host``, body)
and, for a share ``rate`` of the requests a predicate selects (by default: GETs of shard
objects), answers with a fault instead:

``slowdown``  ``503 Slow Down`` with S3's XML error body (``<Code>SlowDown</Code>``)
``internal``  ``500 Internal Server Error`` with ``<Code>InternalError</Code>``
``truncate``  the upstream's real status and headers (full ``Content-Length``), then half of
              the body, then the connection is closed: a drop in the middle of the response
``reset``     no answer at all: the request is read and the socket is reset (TCP RST)

Whether the ``n``-th request for a given (method, object) is faulted, and how, is a pure
function of ``(seed, method, key, n)``, where ``key`` is the path without its first segment (the
bucket, in path-style addressing): a run's faults depend neither on thread timing nor on a test's
random bucket name, and a client that retries an object sees the same answers every run. ``counts`` says how many of each
kind were injected, ``forwarded`` how many requests went through.

Use as a context manager; it serves from a daemon thread on 127.0.0.1 and stops on exit, or by
itself after ``lifetime`` seconds, whichever comes first.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("slowdown", "internal", "truncate", "reset")

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business, never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
              "te", "trailer", "transfer-encoding", "upgrade"}


def shard_gets(method: str, path: str) -> bool:
    """Default predicate: only GETs of shard objects are eligible for faults."""
    return method == "GET" and "/shard-" in path


def _s3_error(code: str, message: str, resource: str, request_id: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>").encode()


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:5000", rate=0.3, seed=1) as proxy: ... proxy.endpoint``"""

    def __init__(self, upstream: str, *, rate: float = 0.3, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 should_fault: Callable[[str, str], bool] = shard_gets, lifetime: float = 300.0,
                 timeout: float = 30.0):
        url = urllib.parse.urlsplit(upstream)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.upstream_host, self.upstream_port = url.hostname, url.port or 80
        self.rate, self.seed, self.kinds = rate, seed, tuple(kinds)
        self.should_fault, self.lifetime, self.timeout = should_fault, lifetime, timeout
        self.counts: Counter[str] = Counter()  # faults injected, by kind
        self.forwarded = 0  # requests answered by the upstream (a truncated one included)
        self.log: list[tuple[str, str, str]] = []  # (method, path, kind or "ok") in arrival order
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"proxy": self, "timeout": self.timeout})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        server.shutdown()
        server.server_close()
        with self._lock:  # idle keep-alive connections would otherwise linger until their timeout
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- decisions ------------------------------------------------------------------------
    def decide(self, method: str, path: str) -> str | None:
        """The fault for this request (None: forward it), recorded in ``counts`` and ``log``."""
        eligible = self.should_fault(method, path)
        key = path.lstrip("/").partition("/")[2]  # path-style: /bucket/key
        with self._lock:
            n = self._seen[(method, path)]
            self._seen[(method, path)] += 1
            kind = None
            if eligible and self.rate > 0:
                digest = hashlib.sha256(f"{self.seed}\0{method}\0{key}\0{n}".encode()).digest()
                u, pick = struct.unpack(">QQ", digest[:16])
                if u / 2**64 < self.rate:
                    kind = self.kinds[pick % len(self.kinds)]
                    self.counts[kind] += 1
            if kind is None:
                self.forwarded += 1
            self.log.append((method, path, kind or "ok"))
            return kind

    @property
    def faults(self) -> int:
        return sum(self.counts.values())


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.proxy._lock:
                self.proxy._conns.discard(self.connection)

    def log_message(self, format: str, *args) -> None:  # quiet; the proxy keeps its own log
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        method, path = self.command, self.path
        kind = self.proxy.decide(method, urllib.parse.urlsplit(path).path)
        if kind == "reset":
            # SO_LINGER 0: close() sends RST instead of FIN; the client sees "connection reset".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if kind in ("slowdown", "internal"):
            status, code, message = ((503, "SlowDown", "Please reduce your request rate.") if kind == "slowdown"
                                     else (500, "InternalError", "We encountered an internal error. Please try again."))
            payload = _s3_error(code, message, urllib.parse.urlsplit(path).path, f"FAULT{self.proxy.faults:08d}")
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("x-amz-request-id", f"FAULT{self.proxy.faults:08d}")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
            return

        status, reason, headers, data = self._forward(method, path, body)
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() in HOP_BY_HOP or name.lower() == "content-length":
                continue
            self.send_header(name, value)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            length = next((v for n, v in headers if n.lower() == "content-length"), None)
            if length is not None:
                self.send_header("Content-Length", length)  # HEAD: the object's size, no body
            data = b""
        else:
            self.send_header("Content-Length", str(len(data)))
        if kind == "truncate":
            self.send_header("Connection", "close")
        self.end_headers()
        if kind == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client reads a short body
            return
        self.wfile.write(data)

    def _forward(self, method: str, path: str, body: bytes):
        conn = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port,
                                          timeout=self.proxy.timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                lower = name.lower()
                # The body is re-sent with an exact Content-Length; Expect was answered here.
                if lower in HOP_BY_HOP or lower in ("content-length", "expect"):
                    continue
                conn.putheader(name, value)
            if body or method in ("PUT", "POST", "PATCH") or "Content-Length" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()  # http.client undoes chunked transfer coding; HEAD reads nothing
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _dispatch(self) -> None:
        try:
            self._handle()
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _dispatch
