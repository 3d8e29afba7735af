"""The chart lints clean and every object it renders is valid against its schema, for each value set."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from _chart import CHART, DATA, VALUE_SETS, Render, run_helm

from tests.support.required import unavailable

pytestmark = pytest.mark.helm

# Kubernetes version the core kinds are validated against (the chart's kubeVersion floor is 1.27).
K8S_VERSION = "1.33.0"
CRD_KINDS = {"RayService", "ServiceMonitor"}
SHARED_CRD = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"


def _strict(schema: Any) -> Any:
    """Close every object schema that lists its properties, as `kubectl --validate=strict` does:
    the API server would otherwise prune a misspelt field silently."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    rayservice = _strict(json.loads((DATA / "rayservice-v1.openapi.json").read_text()))
    monitor = json.loads((DATA / "servicemonitor-v1.schema.json").read_text())
    return {
        "RayService": jsonschema.Draft7Validator(rayservice),
        "ServiceMonitor": jsonschema.Draft7Validator(monitor),
    }


def _validate(obj: dict[str, Any], crd_validators: dict[str, jsonschema.Draft7Validator]) -> None:
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind in CRD_KINDS:
        errors = sorted(crd_validators[kind].iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, f"{kind}/{name}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        return
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{kind}/{name}: {'/'.join(map(str, exc.path))}: {exc.message}") from exc


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_lint_strict(helm_bin: Path, value_set: str) -> None:
    args = [a for p in VALUE_SETS[value_set] for a in ("-f", str(p))]
    proc = run_helm(helm_bin, "lint", "--strict", str(CHART), *args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_object_is_valid(render: Render, crd_validators: dict[str, jsonschema.Draft7Validator],
                               value_set: str) -> None:
    objects = render(VALUE_SETS[value_set])
    assert objects
    for obj in objects:
        _validate(obj, crd_validators)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "gz"
        assert len(obj["metadata"]["name"]) <= 63


def test_validator_catches_a_bad_rayservice(render: Render,
                                            crd_validators: dict[str, jsonschema.Draft7Validator]) -> None:
    # The CRD check must be able to fail: a misspelt field and a wrong type are both reported.
    rs = _by_kind(render(), "RayService")[0]
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    with pytest.raises(AssertionError, match="RayService"):
        _validate(rs, crd_validators)


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _workers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rs = _by_kind(objects, "RayService")[0]
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def test_default_values_bring_up_everything(render: Render) -> None:
    objects = render()
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["NetworkPolicy", "PodDisruptionBudget", "RayService", "Secret", "Service", "StatefulSet"]
    sts = {o["metadata"]["name"] for o in _by_kind(objects, "StatefulSet")}
    assert sts == {"gz-gazsi-cluster-postgresql", "gz-gazsi-cluster-redis"}
    for s in _by_kind(objects, "StatefulSet"):
        pod = s["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        assert s["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]

    rs = _by_kind(objects, "RayService")[0]
    assert rs["apiVersion"] == "ray.io/v1"
    assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_env = _env(head["template"]["spec"]["containers"][0])
    assert head_env["GAZSI_AUTH__DATABASE_URL"] == "postgresql://gazsi:$(PGPASSWORD)@gz-gazsi-cluster-postgresql:5432/gazsi"
    assert head_env["GAZSI_AUTH__REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@gz-gazsi-cluster-redis:6379/0"
    assert head_env["GAZSI_AUTH__BOOTSTRAP_ADMIN_KEY"]["secretKeyRef"] == {"name": "gz-gazsi-cluster-admin",
                                                                          "key": "admin-key"}
    assert head_env["GAZSI_CONTROL_PLANE__JOIN_TOKEN"]["secretKeyRef"]["name"] == "gz-gazsi-cluster-join-token"
    # $(VAR) expansion only sees variables defined earlier in the list.
    names = [e["name"] for e in head["template"]["spec"]["containers"][0]["env"]]
    assert names.index("PGPASSWORD") < names.index("GAZSI_AUTH__DATABASE_URL")
    assert names.index("REDIS_PASSWORD") < names.index("GAZSI_AUTH__REDIS_URL")
    assert names.index("GAZSI_AUTH__DATABASE_URL") < names.index("GAZSI_CONTROL_PLANE__DATABASE_URL")
    assert head_env["GAZSI_CONTROL_PLANE__DATABASE_URL"] == "$(GAZSI_AUTH__DATABASE_URL)"
    assert head_env["GAZSI_CONTROL_PLANE__CA_FILE"] == "/etc/gazsi/tls/ca.crt"

    workers = _workers(objects)
    assert set(workers) == {"smartnic", "gpu"}
    nic = workers["smartnic"]
    nic_container = nic["template"]["spec"]["containers"][0]
    assert _env(nic_container)["GAZSI_EDGE__DATAPLANE"] == "gpunetio"
    assert nic["template"]["spec"]["nodeSelector"]["feature.node.kubernetes.io/pci-15b3.present"] == "true"
    for side in ("requests", "limits"):
        res = nic_container["resources"][side]
        assert res["nvidia.com/gpu"] == 1
        assert res["rdma/rdma_shared_device_a"] == 1
        assert res["hugepages-2Mi"] == "2Gi"
    assert nic_container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert {"name": "hugepages", "emptyDir": {"medium": "HugePages-2Mi"}} in nic["template"]["spec"]["volumes"]
    gpu_container = workers["gpu"]["template"]["spec"]["containers"][0]
    assert _env(gpu_container)["GAZSI_EDGE__DATAPLANE"] == "fast"
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "hugepages-2Mi" not in gpu_container["resources"]["limits"]
    for g in workers.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]

    policies = {o["metadata"]["name"]: o for o in _by_kind(objects, "NetworkPolicy")}
    assert set(policies) == {"gz-gazsi-cluster-postgresql", "gz-gazsi-cluster-redis"}
    pg = policies["gz-gazsi-cluster-postgresql"]["spec"]
    assert pg["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "postgresql"
    assert pg["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "gazsi-cluster", "app.kubernetes.io/instance": "gz"}
    assert pg["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5432}]


def test_generated_secrets_are_kept(render: Render) -> None:
    secrets = {o["metadata"]["name"]: o for o in _by_kind(render(), "Secret")}
    assert set(secrets) == {f"gz-gazsi-cluster-{s}" for s in ("admin", "join-token", "postgresql", "redis", "tls")}
    for secret in secrets.values():
        # Kept on uninstall, so a reinstall matches the data on the kept volumes.
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    admin = base64.b64decode(secrets["gz-gazsi-cluster-admin"]["data"]["admin-key"]).decode()
    assert admin.startswith("gz_live_") and len(admin) == len("gz_live_") + 40
    password = base64.b64decode(secrets["gz-gazsi-cluster-postgresql"]["data"]["password"]).decode()
    assert password.isalnum() and len(password) == 32
    tls = secrets["gz-gazsi-cluster-tls"]
    assert tls["type"] == "kubernetes.io/tls"
    assert base64.b64decode(tls["data"]["ca.crt"]).startswith(b"-----BEGIN CERTIFICATE-----")
    # Every template that generates a value goes through the lookup helper.
    text = (CHART / "templates" / "secrets.yaml").read_text()
    assert text.count("randAlphaNum") == text.count('include "gazsi.keptSecretValue"')
    assert 'lookup "v1" "Secret"' in text


def test_external_db_deploys_no_database(render: Render) -> None:
    objects = render(VALUE_SETS["external-db"])
    assert not _by_kind(objects, "StatefulSet")
    assert not _by_kind(objects, "NetworkPolicy")
    secrets = {o["metadata"]["name"]: o for o in _by_kind(objects, "Secret")}
    assert "gz-gazsi-cluster-postgresql" not in secrets and "gz-gazsi-cluster-admin" not in secrets
    external = secrets["gz-gazsi-cluster-external"]["data"]
    assert set(external) == {"database-url"}
    assert base64.b64decode(external["database-url"]).decode().startswith("postgresql://gazsi:s3cret@")
    head = _by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    env = _env(head["template"]["spec"]["containers"][0])
    assert env["GAZSI_AUTH__DATABASE_URL"]["secretKeyRef"] == {"name": "gz-gazsi-cluster-external",
                                                               "key": "database-url"}
    assert env["GAZSI_AUTH__REDIS_URL"]["secretKeyRef"] == {"name": "gazsi-redis-url", "key": "url"}
    assert env["GAZSI_AUTH__BOOTSTRAP_ADMIN_KEY"]["secretKeyRef"]["name"] == "gazsi-admin"
    assert "PGPASSWORD" not in env and "REDIS_PASSWORD" not in env


def test_no_smartnic_pool(render: Render) -> None:
    objects = render(VALUE_SETS["no-smartnic"])
    workers = _workers(objects)
    assert set(workers) == {"gpu"}
    rs = _by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]
    assert rs["enableInTreeAutoscaling"] is True
    assert workers["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert [o["metadata"]["name"] for o in _by_kind(objects, "PodDisruptionBudget")] == ["gz-gazsi-cluster-gpu"]


def test_ingress_with_tls(render: Render) -> None:
    objects = render(VALUE_SETS["ingress"])
    ingress = _by_kind(objects, "Ingress")[0]["spec"]
    assert ingress["tls"] == [{"secretName": "embed-example-com-tls", "hosts": ["embed.example.com"]}]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    services = {o["metadata"]["name"]: o for o in _by_kind(objects, "Service")}
    assert backend["name"] in services
    gateway = services[backend["name"]]["spec"]
    assert gateway["type"] == "LoadBalancer"
    assert gateway["selector"]["ray.io/serve"] == "true"
    monitor = _by_kind(objects, "ServiceMonitor")[0]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= services["gz-gazsi-cluster-metrics"]["metadata"][
        "labels"].items()
    assert "gz-gazsi-cluster-head" in {o["metadata"]["name"] for o in _by_kind(objects, "PodDisruptionBudget")}


def test_cpu_only_has_no_gpu_anywhere(render: Render) -> None:
    objects = render(VALUE_SETS["cpu-only"])
    text = yaml.safe_dump_all(objects)
    assert "nvidia.com/gpu" not in text
    assert set(_workers(objects)) == {"cpu"}
    images = {c["image"] for c in [
        _by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
            "containers"][0]]}
    assert images == {"ghcr.io/gazsi/gazsi-cluster:0.1.0"}
    assert not [o for o in _by_kind(objects, "Secret") if o["metadata"]["name"].endswith("-tls")]


def test_rayservice_schema_matches_shared_crd() -> None:
    # The test copy of the CRD schema must be the one the project pins in ../shared (CI has it beside the clone).
    if not SHARED_CRD.is_file():
        unavailable(f"{SHARED_CRD} is not beside this checkout")
    crd = yaml.load(SHARED_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert json.loads((DATA / "rayservice-v1.openapi.json").read_text()) == v1["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rendered_env_is_accepted_by_settings(render: Render, value_set: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings forbid unknown nested keys, so a GAZSI_* variable the app does not know would stop
    # every pod at start; load the exact environment each container gets.
    from gazsi_cluster.config import load_settings

    rs = _by_kind(render(VALUE_SETS[value_set]), "RayService")[0]["spec"]["rayClusterConfig"]
    pods = [rs["headGroupSpec"]["template"]] + [g["template"] for g in rs["workerGroupSpecs"]]
    for pod in pods:
        for key in [k for k in os.environ if k.startswith("GAZSI_")]:
            monkeypatch.delenv(key)
        resolved: dict[str, str] = {}
        for item in pod["spec"]["containers"][0]["env"]:
            value = item.get("value", "secret-value")
            for name, earlier in resolved.items():
                value = value.replace(f"$({name})", earlier)
            resolved[item["name"]] = value
            monkeypatch.setenv(item["name"], value)
        settings = load_settings()
        assert settings.auth.database_url and settings.auth.redis_url
        if settings.control_plane.serve_https:  # outsideEdges: the token as a file, like `gazsi up`
            assert settings.control_plane.join_token is None
            assert str(settings.control_plane.join_token_file) == "/etc/gazsi/join/join-token"
        else:
            assert settings.control_plane.join_token == "secret-value"
        assert settings.edge.dataplane == resolved["GAZSI_EDGE__DATAPLANE"]
