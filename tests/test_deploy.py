"""deploy/: the Dockerfile, the Kubernetes manifests and the compose file say what they should, and their
command line serves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _documents() -> list[dict[str, Any]]:
    return [
        d for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())
    ]


def _one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _container(deployment: str) -> dict[str, Any]:
    [container] = _one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _expanded(container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The container's command line with ``$(VAR)`` expanded from its literal env, as Kubernetes does."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    line = [*container["command"], *container["args"]]
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), part) for part in line], env


def test_the_manifests_are_the_kinds_a_replicated_deployment_needs() -> None:
    """Valid YAML: virtsvc's Deployment, Service and scenarios ConfigMap, and the Redis they share."""
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in _documents())
    assert kinds == [
        ("ConfigMap", "virtsvc-scenarios"),
        ("Deployment", "virtsvc"),
        ("Deployment", "virtsvc-redis"),
        ("Service", "redis"),
        ("Service", "virtsvc"),
    ]
    assert _one("Deployment", "virtsvc")["spec"]["replicas"] > 1


def test_the_probes_are_the_grpc_health_check_on_the_served_port() -> None:
    """Readiness and liveness are Kubernetes' native gRPC probe, on the port `serve --port` binds."""
    container = _container("virtsvc")
    command, _ = _expanded(container)
    port = int(_flag(command, "--port"))
    assert container["readinessProbe"]["grpc"] == {"port": port}
    assert container["livenessProbe"]["grpc"] == {"port": port}
    assert [p["containerPort"] for p in container["ports"]] == [port]
    [service_port] = _one("Service", "virtsvc")["spec"]["ports"]
    assert service_port["targetPort"] == container["ports"][0]["name"]


def test_the_replicas_share_the_redis_service_with_workers() -> None:
    """--workers > 1 on the Redis store, the URL naming the Redis Service and its port."""
    command, _ = _expanded(_container("virtsvc"))
    assert int(_flag(command, "--workers")) > 1
    store = _flag(command, "--store")
    [redis_port] = _one("Service", "redis")["spec"]["ports"]
    assert store == f"redis://redis:{redis_port['port']}/0"
    assert _container("virtsvc-redis")["ports"][0]["containerPort"] == redis_port["port"]


def test_the_configmap_scenarios_pass_check(tmp_path: Path) -> None:
    """What the ConfigMap mounts over scenarios/ is a valid scenario for the image's contracts."""
    for name, text in _one("ConfigMap", "virtsvc-scenarios")["data"].items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "virtsvc.cli", "check", "--protos", str(ROOT / "protos"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_runs_serve_as_a_user_with_the_redis_extra() -> None:
    """python:3.11-slim, the redis extra installed, a non-root user, `virtsvc serve` the entrypoint."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(re.match(r'RUN pip install .*"/tmp/virtsvc\[redis\]"', line) for line in lines)
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user not in ("root", "0")
    assert 'ENTRYPOINT ["virtsvc", "serve"]' in lines
    # the image's default command line is the manifests' without the store
    [cmd] = [json.loads(line.removeprefix("CMD ")) for line in lines if line.startswith("CMD ")]
    command, _ = _expanded(_container("virtsvc"))
    assert command[: 2 + len(cmd)] == ["virtsvc", "serve", *cmd]


def test_compose_runs_replicas_of_the_image_on_one_redis() -> None:
    """compose.yaml: Redis, and several replicas built from the Dockerfile with the manifests' flags."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service = compose["services"]["virtsvc"]
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert service["deploy"]["replicas"] > 1
    assert _flag(service["command"], "--store") == "redis://redis:6379/0"
    assert "redis" in compose["services"] and service["depends_on"] == ["redis"]
