"""Every deployment file, checked offline: hadolint for the Dockerfiles, the compose spec's schema, and
kubernetes-validate --strict for each Kubernetes resource, the GPU overlay's patches applied."""
import copy
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.31"


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is missing: it comes with the dev extra (pip install -e '.[dev]')")
    return path


def _run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint_and_keep_the_rules(dockerfile):
    _run(_tool("hadolint"), str(DEPLOY / dockerfile))
    text = (DEPLOY / dockerfile).read_text()
    assert re.search(r"^USER 10001$", text, re.M)  # non-root
    assert re.search(r'^CMD \["python", "-m", "service"\]$', text, re.M)  # exec form
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text
    extra = "gpu" if dockerfile.endswith("gpu") else "serve"
    assert f'".[{extra}]"' in text


def test_the_serving_extras_bring_no_torch_and_one_runtime():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, runtime, other in (("serve", "onnxruntime", "onnxruntime-gpu"), ("gpu", "onnxruntime-gpu", "onnxruntime")):
        names = [re.split(r"[<>=\[ ]", d)[0] for d in extras[name]]
        assert runtime in names and other not in names and "torch" not in names


def test_compose_file_matches_the_compose_spec_and_its_cpu_limit_matches_onnxruntime():
    _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    svc = compose["services"]["astguard"]
    assert float(svc["deploy"]["resources"]["limits"]["cpus"]) == int(svc["environment"]["ASTGUARD_INTRA_OP_THREADS"])
    assert svc["environment"]["ASTGUARD_BUDGET_BACKEND"] == "redis"
    assert svc["environment"]["ASTGUARD_API_KEYS_FILE"].startswith("/run/secrets/")
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy" and "healthcheck" in compose["services"]["redis"]
    proxy = compose["services"]["proxy"]  # clients reach the service through nginx only (tests/deploy/test_proxy.py)
    assert "ports" not in svc and proxy["volumes"][0]["source"] == "./nginx.conf"
    assert proxy["depends_on"]["astguard"]["condition"] == "service_healthy"


def _resources(kustomization: Path) -> list[Path]:
    k = yaml.safe_load(kustomization.read_text())
    return [kustomization.parent / r for r in k["resources"]]


def test_every_kubernetes_resource_validates_strictly():
    files = _resources(K8S / "kustomization.yaml")
    on_disk = {p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(files) == on_disk  # nothing left out of the kustomization, nothing missing
    _run(_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, *map(str, files))


def _docs():
    return [d for f in _resources(K8S / "kustomization.yaml") for d in yaml.safe_load_all(f.read_text())]


def _find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_the_deployment_is_one_guaranteed_process_per_pod_with_probes():
    docs = _docs()
    pod = _find(docs, "Deployment", "astguard")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["requests"] == c["resources"]["limits"]
    config = _find(docs, "ConfigMap", "astguard-settings")["data"]
    assert int(config["ASTGUARD_INTRA_OP_THREADS"]) == int(c["resources"]["limits"]["cpu"])
    assert c["startupProbe"]["httpGet"]["path"] == c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "preStop" in c["lifecycle"] and pod["terminationGracePeriodSeconds"] > 5
    assert config["ASTGUARD_BUDGET_BACKEND"] == "redis" and "astguard-redis" in config["ASTGUARD_REDIS_URL"]
    assert _find(docs, "HorizontalPodAutoscaler", "astguard")["apiVersion"] == "autoscaling/v2"
    secret_mount = next(m for m in c["volumeMounts"] if m["name"] == "api-keys")["mountPath"]
    assert config["ASTGUARD_API_KEYS_FILE"].startswith(secret_mount)


def _apply(doc, ops):
    """The JSON-patch subset the overlay uses (add, replace), with ~1 for '/'."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if op["op"] == "replace":
            assert last in node, f"replace of a missing path {op['path']}"
        node[last] = op["value"]
    return doc


def test_the_gpu_overlay_requests_a_gpu_and_still_validates():
    import kubernetes_validate
    overlay = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert [(K8S / "gpu" / r).resolve() for r in overlay["resources"]] == [K8S.resolve()]
    docs = _docs()
    patched = {}
    for p in overlay["patches"]:
        t = p["target"]
        patched[t["kind"]] = _apply(_find(docs, t["kind"], t["name"]), yaml.safe_load(p["patch"]))
    for doc in patched.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    c = patched["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 == c["resources"]["requests"]["nvidia.com/gpu"]
    assert int(patched["ConfigMap"]["data"]["ASTGUARD_INTRA_OP_THREADS"]) == int(c["resources"]["limits"]["cpu"])
    assert patched["ConfigMap"]["data"]["ASTGUARD_DEVICE"] == "cuda"
    assert overlay["images"][0]["name"] == c["image"]
