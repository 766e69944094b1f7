"""The connection layer, from a raw socket against the real server: a client that disconnects mid-body is counted
as 499 (no 5xx, no traceback, nothing charged), headers and bodies that never finish get 408 and the connection
is closed, and connections over the cap get 503."""
from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from conftest import serve
from helpers import digits_test_images, files, png


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket timeout bounds the wait)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _until(condition, what: str, timeout: float = 20):
    """Poll the server's own state until `condition()` holds (no fixed sleeps: each try is a real request)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def model(digits_run):
    return digits_run[0] / "model.onnx"


def test_a_client_that_disconnects_mid_body_gets_499_one_log_line_and_no_charge(model, tmp_path):
    name = "digits-ast"
    routes = [("/predict", "multipart/form-data; boundary=xyz"), ("/predict", "application/json"),
              (f"/v2/models/{name}/infer", "application/json")]
    db = tmp_path / "budgets.sqlite"
    with serve(model, "--api-keys", "k", "--budget-images", "5", "--budget-db", str(db)) as s:
        for path, ctype in routes:
            sock = _connect(s.url)
            # Expect: 100-continue makes the server say when the app starts reading the body: then we leave.
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nContent-Type: {ctype}\r\n"
                         "Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 100")
            sock.sendall(b"x" * 1000)
            sock.close()
        _until(lambda: s.metric("astguard_requests_total", route="/predict", status="499") == 2
               and s.metric("astguard_requests_total", route="/v2/models/{name}/infer", status="499") == 1,
               "three 499s in the metrics")
        text = httpx.get(s.url + "/metrics").text
        assert 'status="500"' not in text
        r = httpx.post(s.url + "/predict", files=files([png(digits_test_images(1)[0])]), headers={"X-API-Key": "k"})
        assert r.headers["x-budget-remaining"] == "4"  # the three disconnects cost nothing
    log = s.proc.stdout.read()
    assert "Traceback" not in log
    assert log.count("client_disconnect") == 3, log


def test_headers_that_never_finish_get_408_and_the_connection_is_closed(model):
    with serve(model, "--header-timeout-s", "1") as s:
        sock = _connect(s.url)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")  # no blank line: never complete
        answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408") and b"header_timeout" in answer
        # A complete request on a fresh connection is not affected, and keep-alive requests re-arm the deadline.
        with httpx.Client(base_url=s.url) as c:
            assert [c.get("/v2/health/live").status_code for _ in range(3)] == [200] * 3
        assert s.metric("astguard_rejections_total", reason="header_timeout") == 1


def test_a_body_that_never_finishes_gets_408_and_the_connection_is_closed(model):
    with serve(model, "--body-timeout-s", "1") as s:
        for path in ("/predict", "/v2/models/digits-ast/infer"):
            sock = _connect(s.url)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "Content-Length: 1000\r\n\r\n{\"images\": [".encode())
            answer = _read_all(sock)  # the server answers and closes: the socket is not held
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"not complete within 1 s" in answer and b"connection: close" in answer.lower()
        assert s.metric("astguard_requests_total", route="/predict", status="408") == 1


def test_connections_over_the_cap_get_503_and_a_freed_slot_is_reused(model):
    with serve(model, "--max-connections", "2") as s:
        held = [_connect(s.url) for _ in range(2)]
        extra = _connect(s.url)
        extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        held.pop().close()

        def live():
            try:
                return httpx.get(s.url + "/v2/health/live").status_code == 200
            except httpx.HTTPError:
                return False
        _until(live, "a freed connection slot")
        for sock in held:
            sock.close()
