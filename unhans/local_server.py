"""What the local servers of tests, benchmarks and the demo share: an HTTP client that keeps connections alive."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """HTTP calls to a server on loopback. ``keep_alive``: each calling thread keeps one HTTP/1.1 connection per
    address, as a production client would; a new connection per call (urllib) costs both sides CPU that load tests
    on a small machine then measure."""

    def __init__(self, keep_alive: bool = False):
        self.keep_alive, self._connections = keep_alive, threading.local()

    def call(self, base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, decoded JSON body) of one HTTP call to ``base + path``; status 0 when nothing answered."""
        headers = dict(headers or {})
        if self.keep_alive:
            return self._call_kept(base, method, path, body, headers)
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, data=body, headers=headers, method=method), timeout=60) as response:
                return response.status, decode(response.read())
        except urllib.error.HTTPError as error:
            return error.code, decode(error.read())
        except (urllib.error.URLError, ConnectionError) as error:
            return 0, str(error)

    def _call_kept(self, base: str, method: str, path: str, body: bytes | None, headers: dict):
        connections = self._connections.__dict__  # this thread's, by address
        if base not in connections:
            address = urllib.parse.urlsplit(base)
            connections[base] = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        connection = connections[base]
        try:
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            return response.status, decode(response.read())
        except (http.client.HTTPException, OSError) as error:
            connection.close()  # reconnects on the next call
            return 0, str(error)


def decode(body: bytes):
    """A response body as JSON, or as text when it is not JSON."""
    try:
        return json.loads(body or b"null")
    except ValueError:
        return body.decode(errors="replace")
