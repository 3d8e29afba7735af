"""The gateway's direct listener in the chart (issue 14) and the CPUs each Ray pod must hold.

Every gateway replica also serves the API itself on ``gateway.port`` (deployments/gateway.py). The app's
default, 8080, is the chart's ``metrics.port`` (Ray's metrics export port on every Ray pod), and its
default host is loopback. The chart sets ``gateway.direct.port`` (8090) and 0.0.0.0 on the head, pins
every gateway replica there with a custom Ray resource, declares the container port, and exposes it as
Service ``<release>-gateway-direct``; workers get port 0. ``helm template`` refuses a direct port
another listener of the head pod holds, and pods whose CPUs cannot hold the replicas Serve puts there.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart import VALUE_SETS, Render, chart_values, deep_merge

pytestmark = pytest.mark.helm

DIRECT = "gz-gazsi-cluster-gateway-direct"


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _cluster(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]
    return spec


def _groups(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``head`` and one entry per worker group: the group spec (rayStartParams, template)."""
    rc = _cluster(objects)
    return {"head": rc["headGroupSpec"]} | {g["groupName"]: g for g in rc["workerGroupSpecs"]}


def _container(group: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = group["template"]["spec"]["containers"][0]
    return container


def _env(group: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(group)["env"]}


def _ports(group: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in _container(group)["ports"]}


def _deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    cfg = yaml.safe_load(_by_kind(objects, "RayService")[0]["spec"]["serveConfigV2"])
    return {d["name"]: d for app in cfg["applications"] for d in app["deployments"]}


def _ray_resources(params: dict[str, str]) -> dict[str, float]:
    """The custom resources Ray gets from rayStartParams: KubeRay appends ``--resources=<value>`` to the
    `ray start` line it runs through bash, so the value is shell-quoted JSON."""
    if "resources" not in params:
        return {}
    [arg] = shlex.split(f"--resources={params['resources']}")
    parsed: dict[str, float] = json.loads(arg.removeprefix("--resources="))
    return parsed


def _selects(selector: dict[str, str], group: dict[str, Any]) -> bool:
    return selector.items() <= group["template"]["metadata"]["labels"].items()


def _load(monkeypatch: pytest.MonkeyPatch, group: dict[str, Any]) -> Any:
    """The gpu profile's replica settings with exactly this pod's env (Secret values stand-ins)."""
    from deployments._settings import replica_settings

    for key in [k for k in os.environ if k.startswith("GAZSI_")]:
        monkeypatch.delenv(key)
    resolved: dict[str, str] = {}
    for item in _container(group)["env"]:
        value = item.get("value", "secret-value")
        for earlier, earlier_value in resolved.items():
            value = value.replace(f"$({earlier})", earlier_value)
        resolved[item["name"]] = value
        monkeypatch.setenv(item["name"], value)
    return replica_settings("gpu")


# -- the direct listener --------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_direct_listener_binds_the_head_only_and_never_metrics_port(render: Render, value_set: str) -> None:
    objects = render(VALUE_SETS[value_set])
    groups = _groups(objects)
    head = groups.pop("head")
    head_env, head_ports = _env(head), _ports(head)
    assert head_env["GAZSI_GATEWAY__HOST"] == "0.0.0.0"
    assert head_env["GAZSI_GATEWAY__PORT"] == "8090"
    assert head_ports["gateway-direct"] == 8090
    # The collision of issue 14: the listener and Ray's metrics exporter on one port of one pod.
    assert head_ports["metrics"] == 8080 != int(head_env["GAZSI_GATEWAY__PORT"])
    assert int(head["rayStartParams"]["metrics-export-port"]) == head_ports["metrics"]
    # Every port the head's processes bind is distinct (edges may run there in the cpu profile).
    edge = int(head_env["GAZSI_EDGE__PORT"])
    bound = [*head_ports.values(), edge, edge + 1]
    assert len(bound) == len(set(bound)), head_ports
    for name, group in groups.items():
        # No worker opens a direct listener, so nothing there competes for metrics.port either.
        assert _env(group)["GAZSI_GATEWAY__PORT"] == "0", name
        assert "gateway-direct" not in _ports(group), name


def test_the_app_reads_the_rendered_listener_settings(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    groups = _groups(render())
    s = _load(monkeypatch, groups.pop("head"))
    assert (s.gateway.host, s.gateway.port) == ("0.0.0.0", 8090)
    for name, group in groups.items():
        # What deployments/gateway.py checks before it opens the listener: 0 = none.
        assert _load(monkeypatch, group).gateway.port == 0, name


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_gateway_replica_is_pinned_to_the_pods_behind_the_direct_service(
    render: Render, value_set: str
) -> None:
    objects = render(VALUE_SETS[value_set])
    groups = _groups(objects)
    wanted = _deployments(objects)["Gateway"]["ray_actor_options"]["resources"]
    assert wanted == {"gazsi_gateway": 1}
    # Only pods that have the resource can run a gateway replica: the head, and no worker group.
    hosts = [n for n, g in groups.items() if _ray_resources(g["rayStartParams"]).get("gazsi_gateway", 0) >= 1]
    assert hosts == ["head"]
    assert _ray_resources(groups["head"]["rayStartParams"]) == {"gazsi_gateway": 1000}

    services = {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}
    direct = services[DIRECT]["spec"]
    assert direct["ports"] == [{"name": "http", "port": 80, "targetPort": "gateway-direct", "protocol": "TCP"}]
    selected = [n for n, g in groups.items() if _selects(direct["selector"], g)]
    assert selected == hosts
    # The named target port exists on each selected pod and is the port the listener binds.
    for name in selected:
        assert _ports(groups[name])["gateway-direct"] == int(_env(groups[name])["GAZSI_GATEWAY__PORT"])
    # Serve's proxy Service stays as it was: the slow path, on every pod whose proxy is ready.
    proxy = services["gz-gazsi-cluster-gateway"]["spec"]
    assert proxy["selector"]["ray.io/serve"] == "true"
    assert proxy["ports"][0]["targetPort"] == "serve"


def test_direct_service_type_port_and_annotations(render: Render) -> None:
    objects = render(sets=["service.gatewayDirect.type=LoadBalancer", "service.gatewayDirect.port=8443",
                           "service.gatewayDirect.annotations.lb=internal", "gateway.direct.port=9000"])
    direct = next(s for s in _by_kind(objects, "Service") if s["metadata"]["name"] == DIRECT)
    assert direct["spec"]["type"] == "LoadBalancer"
    assert direct["spec"]["ports"][0]["port"] == 8443
    assert direct["metadata"]["annotations"] == {"lb": "internal"}
    head = _groups(objects)["head"]
    assert _ports(head)["gateway-direct"] == 9000 and _env(head)["GAZSI_GATEWAY__PORT"] == "9000"


def test_disabled_sets_port_zero_and_renders_no_direct_service(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(sets=["gateway.direct.enabled=false"])
    groups = _groups(objects)
    for name, group in groups.items():
        assert _env(group)["GAZSI_GATEWAY__PORT"] == "0", name
        assert "gateway-direct" not in _ports(group), name
        assert "gazsi_gateway" not in _ray_resources(group["rayStartParams"]), name
    assert _load(monkeypatch, groups["head"]).gateway.port == 0
    assert DIRECT not in {s["metadata"]["name"] for s in _by_kind(objects, "Service")}
    # Not pinned either: the gateways go wherever Serve places them, behind the proxy.
    assert "resources" not in _deployments(objects)["Gateway"]["ray_actor_options"]
    assert "gz-gazsi-cluster-gateway" in {s["metadata"]["name"] for s in _by_kind(objects, "Service")}


def test_ingress_can_route_to_the_direct_service(render: Render) -> None:
    def backend(objects: list[dict[str, Any]]) -> str:
        rule = _by_kind(objects, "Ingress")[0]["spec"]["rules"][0]
        name: str = rule["http"]["paths"][0]["backend"]["service"]["name"]
        return name

    assert backend(render(VALUE_SETS["ingress"])) == "gz-gazsi-cluster-gateway"
    objects = render(VALUE_SETS["ingress"], ["ingress.backend=direct"])
    assert backend(objects) == DIRECT
    direct = next(s for s in _by_kind(objects, "Service") if s["metadata"]["name"] == DIRECT)
    assert [p["name"] for p in direct["spec"]["ports"]] == ["http"]  # the port the Ingress names
    with pytest.raises(AssertionError, match=r"ingress.backend=direct routes to Service <release>-gateway-direct"):
        render(VALUE_SETS["ingress"], ["ingress.backend=direct", "gateway.direct.enabled=false"])


def _values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    ("values", "taken"),
    [
        ({"gateway": {"direct": {"port": 8080}}}, r"metrics.port \(Ray's metrics export port\)"),
        ({"metrics": {"port": 8090}}, r"metrics.port \(Ray's metrics export port\)"),
        ({"gateway": {"direct": {"port": 8000}}}, r"serve.port \(Serve's HTTP proxy\)"),
        ({"serve": {"port": 8090}}, r"serve.port \(Serve's HTTP proxy\)"),
        ({"gateway": {"direct": {"port": 8100}}}, r"edge.port \(the edges' data plane\)"),
        ({"gateway": {"direct": {"port": 8101}}}, r"edge.port \+ 1 \(an edge replica's operator app"),
        ({"edge": {"port": 8089}}, r"edge.port \+ 1 \(an edge replica's operator app"),
        # A second replica in a pod takes the next free operator port: the whole span is kept.
        ({"gateway": {"direct": {"port": 8116}}}, r"edge.port \+ 16 \(an edge replica's operator app"),
        ({"edge": {"port": 8074}}, r"edge.port \+ 16 \(an edge replica's operator app"),
        ({"gateway": {"direct": {"port": 6379}}}, r"Ray's GCS port"),
        ({"gateway": {"direct": {"port": 8265}}}, r"Ray's dashboard port"),
        ({"gateway": {"direct": {"port": 10001}}}, r"Ray's client server port"),
        ({"gateway": {"direct": {"port": 52365}}}, r"Ray's dashboard agent port"),
        ({"head": {"rayStartParams": {"dashboard-port": "8090"}}}, r"Ray's dashboard port"),
        ({"head": {"rayStartParams": {"metrics-export-port": "8090"}}}, r"metrics.port"),
    ],
)
def test_a_direct_port_another_listener_holds_is_refused(
    render: Render, tmp_path: Path, values: dict[str, Any], taken: str
) -> None:
    port = values.get("gateway", {}).get("direct", {}).get("port", 8090)
    with pytest.raises(AssertionError, match=rf"gateway.direct.port {port} collides with {taken}.* in the head pod"):
        render([_values_file(tmp_path, values)])
    # Off, nothing binds it: the same values render.
    render([_values_file(tmp_path, deep_merge(values, {"gateway": {"direct": {"enabled": False}}}))])


def test_head_resources_that_drop_the_gateway_resource_are_refused(render: Render, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"head.rayStartParams.resources .* add \"gazsi_gateway\": 1000"):
        render([_values_file(tmp_path, {"head": {"rayStartParams": {"resources": '"{\\"foo\\": 1}"'}}})])
    mine = '"{\\"foo\\": 1, \\"gazsi_gateway\\": 1000}"'
    head = _groups(render([_values_file(tmp_path, {"head": {"rayStartParams": {"resources": mine}}})]))["head"]
    assert _ray_resources(head["rayStartParams"]) == {"foo": 1, "gazsi_gateway": 1000}


# -- CPUs: worker groups hold their edges, the head its gateways ------------------------------------


def _millis(q: Any) -> int:
    s = str(q)
    return int(s[:-1]) if s.endswith("m") else math.ceil(float(s) * 1000)


def _ray_millis(group: dict[str, Any]) -> int:
    """What Ray schedules on: num-cpus, else KubeRay's whole-CPU reading of the limit (else the request)."""
    if "num-cpus" in group["rayStartParams"]:
        return _millis(group["rayStartParams"]["num-cpus"])
    res = _container(group)["resources"]
    return math.ceil(_millis(res.get("limits", {}).get("cpu", res["requests"]["cpu"])) / 1000) * 1000


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_worker_groups_run_their_data_plane_with_cpus_for_their_edges(render: Render, value_set: str) -> None:
    objects = render(VALUE_SETS[value_set])
    values = chart_values(VALUE_SETS[value_set])
    groups = _groups(objects)
    deps = _deployments(objects)
    edge = deps["Edge"]["ray_actor_options"]
    edge_cpus = _millis(edge.get("num_cpus", 1))
    for name, group in groups.items():
        if name == "head":
            continue
        # The data plane the group is named for reaches its pods' edges.
        assert _env(group)["GAZSI_EDGE__DATAPLANE"] == values["workerGroups"][name]["dataplane"], name
        gpus = int(group["rayStartParams"]["num-gpus"])
        per_pod = math.floor(gpus / edge["num_gpus"]) if edge.get("num_gpus") else 1
        need = per_pod * edge_cpus
        assert _ray_millis(group) >= need, (name, _ray_millis(group), need)
        assert _millis(_container(group)["resources"]["requests"]["cpu"]) >= need, name
        if values["serve"]["profile"] == "gpu" and _env(group)["GAZSI_EDGE__DATAPLANE"] == "fast":
            # deployments/edge.py: the fast front gets num_cpus - 2 workers; 2 stay with the node process.
            workers = max(1, edge_cpus // 1000 - 2)
            assert workers == 10 and (workers + 2) * per_pod * 1000 <= need, name
    # The head holds every gateway replica (they are pinned there).
    gateway = deps["Gateway"]
    need = gateway["num_replicas"] * _millis(gateway["ray_actor_options"].get("num_cpus", 1))
    assert _ray_millis(groups["head"]) >= need
    assert _millis(_container(groups["head"])["resources"]["requests"]["cpu"]) >= need


def test_default_pools_are_the_ones_they_are_named_for(render: Render) -> None:
    groups = _groups(render())
    assert _env(groups["smartnic"])["GAZSI_EDGE__DATAPLANE"] == "gpunetio"
    assert _env(groups["gpu"])["GAZSI_EDGE__DATAPLANE"] == "fast"
    for name in ("smartnic", "gpu"):
        # 12 for the edge (10 fast-front workers + the node process) and 2 for Ray's own processes.
        assert _container(groups[name])["resources"]["requests"]["cpu"] == "14", name


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # The chart's old default: 8 CPUs under the gpu profile's 12-CPU edge.
        ({"workerGroups": {"gpu": {"resources": {"limits": {"cpu": "8"}, "requests": {"cpu": "8"}}}}},
         r"workerGroups.gpu: its 1 Edge replica\(s\) per pod \(gpus 1 / Edge num_gpus 1\) reserve 12 CPUs "
         r".* the pod gives Ray 8 CPUs"),
        ({"workerGroups": {"smartnic": {"rayStartParams": {"num-cpus": "8"}}}},
         r"workerGroups.smartnic: .* reserve 12 CPUs .* the pod gives Ray 8 CPUs"),
        ({"workerGroups": {"gpu": {"resources": {"requests": {"cpu": "8"}}}}},
         r"workerGroups.gpu: .* reserve 12 CPUs .* resources.requests.cpu is only 8"),
        ({"workerGroups": {"gpu": {"resources": {"requests": {"cpu": "11500m"}}}}},
         r"workerGroups.gpu: .* resources.requests.cpu is only 11.5"),
        ({"workerGroups": {"gpu": {"gpus": 2}}},
         r"workerGroups.gpu: its 2 Edge replica\(s\) per pod \(gpus 2 / Edge num_gpus 1\) reserve 24 CPUs"),
        ({"serve": {"edge": {"numGpus": 0.5}}},
         r"workerGroups.gpu: its 2 Edge replica\(s\) per pod \(gpus 1 / Edge num_gpus 0.5\) reserve 24 CPUs"),
        ({"serve": {"edge": {"numCpus": 16}}}, r"reserve 16 CPUs \(Edge num_cpus 16"),
        ({"serve": {"gateway": {"numReplicas": 7}}},
         r"gateway.direct pins all 7 gateway replica\(s\) to the head pod, 7 CPUs .* the head gives Ray 6 CPUs"),
        ({"head": {"resources": {"requests": {"cpu": "3500m"}}}},
         r"gateway.direct pins all 4 gateway replica\(s\) .* head.resources.requests.cpu is only 3.5"),
    ],
)
def test_pods_that_cannot_hold_their_replicas_are_refused(
    render: Render, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(AssertionError, match=message):
        render([_values_file(tmp_path, values)])


def test_cpu_checks_accept_what_fits(render: Render, tmp_path: Path) -> None:
    # Exactly the edge's 12 CPUs, in millicores, is enough; so are 5 gateways once they are not pinned.
    render([_values_file(tmp_path, {"workerGroups": {"gpu": {"resources": {
        "requests": {"cpu": "12000m"}, "limits": {"cpu": 12}}}}})])
    render(sets=["serve.gateway.numReplicas=5", "gateway.direct.enabled=false"])
    # The cpu profile places edges by CPU alone: one must fit some Ray pod.
    with pytest.raises(AssertionError, match=r"no Ray pod has the 8 CPUs one Edge replica reserves"):
        render(VALUE_SETS["cpu-only"], ["serve.edge.numCpus=8"])


def test_notes_point_at_the_fast_path(helm_bin: Path) -> None:
    from _chart import CHART, run_helm

    def notes(*sets: str) -> str:
        args = [a for s in sets for a in ("--set", s)]
        out = run_helm(helm_bin, "install", "gz", str(CHART), "-n", "gazsi", "--dry-run=client", *args).stdout
        return out.split("NOTES:", 1)[1]

    on = notes()
    assert f"port-forward svc/{DIRECT} 8000:80" in on
    assert "Service gz-gazsi-cluster-gateway serves the same API through Ray Serve's HTTP proxy: the slow path" in on
    off = notes("gateway.direct.enabled=false")
    assert "port-forward svc/gz-gazsi-cluster-gateway 8000:80" in off and "the slow path" in off
