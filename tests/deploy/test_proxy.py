"""deploy/nginx.conf, validated offline: nginx -t, then a real nginx with that configuration in front of the real
service (only the upstream address and the listening port changed)."""
from __future__ import annotations

import io
import shutil
import subprocess
import time

import httpx
import pytest
from PIL import Image

from conftest import REPO, serve
from service.process import free_port

CONF = REPO / "deploy" / "nginx.conf"


@pytest.fixture(scope="module")
def proxy(digits_run, tmp_path_factory):
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    work = tmp_path_factory.mktemp("nginx")
    with serve(digits_run[0] / "model.onnx", "--api-keys", "k") as service:
        port = free_port()
        text = CONF.read_text()
        assert "server astguard:8000;" in text and "listen 8080;" in text
        conf = work / "nginx.conf"
        conf.write_text(text.replace("server astguard:8000;", f"server {service.url.removeprefix('http://')};")
                        .replace("listen 8080;", f"listen 127.0.0.1:{port};")
                        .replace("access_log /dev/stdout;", "access_log off;"))
        base = [nginx, "-p", str(work), "-c", str(conf), "-g", f"pid {work}/nginx.pid; daemon off;"]
        check = subprocess.run([*base[:-2], "-t", "-g", f"pid {work}/nginx.pid;"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:  # until nginx answers (each try is a real request)
                try:
                    if httpx.get(url + "/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "nginx did not start"
            yield url, service
        finally:
            proc.terminate()
            proc.wait(10)


def test_requests_pass_through_the_proxy(proxy):
    url, _ = proxy
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "PNG")
    image = [("files", ("a.png", buf.getvalue(), "image/png"))]
    r = httpx.post(url + "/predict", files=image, headers={"X-API-Key": "k"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    assert httpx.post(url + "/predict", files=image).status_code == 401


def test_the_proxy_refuses_large_bodies_and_hides_the_metrics(proxy):
    url, service = proxy
    before = service.metric("astguard_requests_total", route="/predict", status="413")
    r = httpx.post(url + "/predict", content=b"x" * (17 * 1024 * 1024), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert service.metric("astguard_requests_total", route="/predict", status="413") == before  # never forwarded
    assert httpx.get(url + "/metrics").status_code == 403
    assert httpx.get(service.url + "/metrics").status_code == 200  # the scraper's, inside the network
