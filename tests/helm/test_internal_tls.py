"""mTLS inside the cluster (issue 18) as the chart wires it: gateway -> edge and edge -> peer.

With ``tls.enabled`` and ``tls.internal`` (both default) every Ray pod gets the client side
(``gateway.edge_tls``, ``edge.peer_tls``) and pods whose data plane can serve TLS get the server side
(``edge.tls`` requiring a cluster client certificate). Besides the env, these tests check that nothing
else the chart renders reaches the edge listener another way (probes, the ServiceMonitor, Services,
NetworkPolicies), and, with the certificate ``helm template`` generated and the env it rendered, that
a real edge and gateway talk mTLS on loopback. No Kubernetes cluster is involved.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from _chart import VALUE_SETS, Render

pytestmark = pytest.mark.helm

TLS_DIR = "/etc/gazsi/tls"
CLIENT_SECTIONS = ("GAZSI_GATEWAY__EDGE_TLS", "GAZSI_EDGE__PEER_TLS")
CLIENT_ENV = {
    f"{s}__{k}": v for s in CLIENT_SECTIONS
    for k, v in (("CA_FILE", f"{TLS_DIR}/ca.crt"), ("CERTFILE", f"{TLS_DIR}/tls.crt"),
                 ("KEYFILE", f"{TLS_DIR}/tls.key"), ("CHECK_HOSTNAME", "false"))
}
SERVER_ENV = {
    "GAZSI_EDGE__TLS__CERTFILE": f"{TLS_DIR}/tls.crt",
    "GAZSI_EDGE__TLS__KEYFILE": f"{TLS_DIR}/tls.key",
    "GAZSI_EDGE__TLS__CLIENT_CA_FILE": f"{TLS_DIR}/ca.crt",
    "GAZSI_EDGE__TLS__REQUIRE_CLIENT_CERT": "true",
}
CLUSTER_TLS_PREFIXES = ("GAZSI_EDGE__TLS__", "GAZSI_GATEWAY__EDGE_TLS__", "GAZSI_EDGE__PEER_TLS__")

# Every structural check runs over the ci value sets plus these switches (and the ServiceMonitor on).
VARIANTS: dict[str, tuple[list[Path], list[str]]] = {
    name: (files, ["metrics.serviceMonitor.enabled=true"]) for name, files in VALUE_SETS.items()
} | {
    "internal-off": ([], ["tls.internal=false", "metrics.serviceMonitor.enabled=true"]),
    "tls-off": ([], ["tls.enabled=false", "metrics.serviceMonitor.enabled=true"]),
    "cpu-only+tls": (VALUE_SETS["cpu-only"], ["tls.enabled=true"]),
    "gpu-pool-only": ([], ["workerGroups.smartnic.enabled=false"]),
    "smartnic-only": ([], ["workerGroups.gpu.enabled=false"]),
}


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _ray_pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod templates of the RayService: ``head`` and one per worker group."""
    rs = _by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]
    return {"head": rs["headGroupSpec"]["template"]} | {g["groupName"]: g["template"] for g in rs["workerGroupSpecs"]}


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def _cluster_tls_env(pod: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _env(pod).items() if k.startswith(CLUSTER_TLS_PREFIXES)}


def _render(render: Render, variant: str) -> list[dict[str, Any]]:
    files, sets = VARIANTS[variant]
    objects: list[dict[str, Any]] = render(files, sets)
    return objects


def test_default_install_wires_mtls_between_gateway_and_edges(render: Render) -> None:
    pods = _ray_pods(render())
    # Gateways and forwarding edges may run on any Ray pod: all of them get the client side.
    for name, pod in pods.items():
        assert CLIENT_ENV.items() <= _env(pod).items(), name
    # The head (fast front, cpu profile edges) and the fast GPU pool serve mTLS ...
    for name in ("head", "gpu"):
        assert _cluster_tls_env(pods[name]) == CLIENT_ENV | SERVER_ENV, name
    assert pods["gpu"]["metadata"]["labels"]["gazsi.io/edge-scheme"] == "https"
    # ... the gpunetio pool cannot (GpuTransport refuses edge.tls), so its edges stay plain HTTP.
    assert _cluster_tls_env(pods["smartnic"]) == CLIENT_ENV
    assert pods["smartnic"]["metadata"]["labels"]["gazsi.io/edge-scheme"] == "http"
    # The files those settings name are the ones the TLS Secret mounts.
    for pod in pods.values():
        mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["tls"]["mountPath"] == TLS_DIR and mounts["tls"]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "gz-gazsi-cluster-tls"


@pytest.mark.parametrize("variant", ["internal-off", "tls-off", "cpu-only"])
def test_without_internal_tls_no_cluster_tls_setting_is_rendered(render: Render, variant: str) -> None:
    objects = _render(render, variant)
    for name, pod in _ray_pods(objects).items():
        assert _cluster_tls_env(pod) == {}, name
        if name != "head":
            assert pod["metadata"]["labels"]["gazsi.io/edge-scheme"] == "http"
        # tls.enabled alone still mounts the CA for the control plane's join endpoint.
        assert ("GAZSI_CONTROL_PLANE__CA_FILE" in _env(pod)) is (variant == "internal-off"), name
    edge_services = [s for s in _by_kind(objects, "Service") if s["metadata"]["labels"].get(
        "app.kubernetes.io/component") == "edge"]
    assert [s["metadata"]["name"] for s in edge_services] == ["gz-gazsi-cluster-edge"]
    assert edge_services[0]["spec"]["ports"][0]["appProtocol"] == "http"


def test_rendered_env_gives_the_settings_the_app_reads(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    from gazsi_cluster.config import load_settings

    for name, pod in _ray_pods(render()).items():
        _set_pod_env(monkeypatch, pod)
        s = load_settings()
        for client in (s.gateway.edge_tls, s.edge.peer_tls):
            assert client.enabled and client.check_hostname is False
            assert (str(client.ca_file), str(client.certfile)) == (f"{TLS_DIR}/ca.crt", f"{TLS_DIR}/tls.crt")
        if name == "smartnic":
            assert not s.edge.tls.enabled
        else:
            assert s.edge.tls.enabled and s.edge.tls.require_client_cert
            assert str(s.edge.tls.client_ca_file) == f"{TLS_DIR}/ca.crt"


def _set_pod_env(monkeypatch: pytest.MonkeyPatch, pod: dict[str, Any], tls_dir: Path | None = None) -> None:
    """The container's env as the kubelet gives it: $(VAR) expanded, Secret values stand-ins."""
    for key in [k for k in os.environ if k.startswith("GAZSI_")]:
        monkeypatch.delenv(key)
    resolved: dict[str, str] = {}
    for item in pod["spec"]["containers"][0]["env"]:
        value = item.get("value", "secret-value")
        for earlier, earlier_value in resolved.items():
            value = value.replace(f"$({earlier})", earlier_value)
        if tls_dir is not None:
            value = value.replace(TLS_DIR, str(tls_dir))
        resolved[item["name"]] = value
        monkeypatch.setenv(item["name"], value)


@pytest.mark.parametrize(
    ("sets", "group", "dataplane"),
    [
        (["workerGroups.smartnic.edgeTLS=true"], "smartnic", "gpunetio"),
        (["workerGroups.gpu.dataplane=gpu"], "gpu", "gpu"),
        (["workerGroups.gpu.dataplane=auto"], "gpu", "auto"),
    ],
)
def test_data_planes_that_cannot_serve_tls_are_refused_at_template_time(
    render: Render, sets: list[str], group: str, dataplane: str
) -> None:
    # Rendered, such a group's replicas would raise ConfigError at start (gpu/transport.py) and crash-loop.
    with pytest.raises(AssertionError, match=rf"workerGroups\.{group}: dataplane {dataplane} cannot serve"):
        render(sets=sets)
    # Either switch off makes it a plain HTTP group again.
    for off in ("tls.internal=false", f"workerGroups.{group}.edgeTLS=false"):
        pods = _ray_pods(render(sets=[*sets, off]))
        assert _cluster_tls_env(pods[group]).keys() <= CLIENT_ENV.keys()


def test_a_group_without_edge_tls_counts_as_on(render: Render) -> None:
    # ci/cpu-only adds a `cpu` group that has no edgeTLS key (and turns TLS off; turn it back on).
    pods = _ray_pods(_render(render, "cpu-only+tls"))
    assert _cluster_tls_env(pods["cpu"]) == CLIENT_ENV | SERVER_ENV
    assert pods["cpu"]["metadata"]["labels"]["gazsi.io/edge-scheme"] == "https"


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_edge_services_never_mix_https_and_plain_edges(render: Render, variant: str) -> None:
    objects = _render(render, variant)
    pods = {n: p for n, p in _ray_pods(objects).items() if n != "head"}
    edge_services = [s for s in _by_kind(objects, "Service")
                     if any(p["targetPort"] in ("edge", 8100) for p in s["spec"]["ports"])]
    assert edge_services, "service.edge.enabled is on in every variant"
    covered: list[str] = []
    for svc in edge_services:
        selector = svc["spec"]["selector"]
        scheme = selector["gazsi.io/edge-scheme"]
        assert [p["appProtocol"] for p in svc["spec"]["ports"]] == [scheme]
        selected = [n for n, p in pods.items() if _matches(selector, p["metadata"]["labels"])]
        assert selected, f"{svc['metadata']['name']} selects no pod"
        for name in selected:
            # What the pod's edges serve is what the Service says: https exactly when edge.tls is set.
            assert ("GAZSI_EDGE__TLS__CERTFILE" in _env(pods[name])) is (scheme == "https"), (svc, name)
        covered += selected
    assert sorted(covered) == sorted(pods), "every worker group behind exactly one edge Service"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nothing_else_dials_the_edge_listeners(render: Render, variant: str) -> None:
    objects = _render(render, variant)
    edge_port = 8100
    # The operator app (/readyz, /metrics, /admin) of the fast and gpu data planes sits on edge.port + 1.
    edge_ports = {edge_port, edge_port + 1, "edge"}

    # Probes: the chart sets none on Ray containers. KubeRay injects exec probes (wget to the raylet's
    # dashboard agent, the GCS and, on RayService workers, Serve's proxy `/-/healthz` on the `serve`
    # port), none on the edge port; Serve checks edges in-process (EdgeReplica.check_health).
    for name, pod in _ray_pods(objects).items():
        container = pod["spec"]["containers"][0]
        assert not {"livenessProbe", "readinessProbe", "startupProbe"} & container.keys(), name
        assert {p["name"]: p["containerPort"] for p in container["ports"]}.get("serve") == 8000
    for sts in _by_kind(objects, "StatefulSet"):
        for container in sts["spec"]["template"]["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                action = container.get(probe, {})
                assert action.get("httpGet", {}).get("port") not in edge_ports
                assert action.get("tcpSocket", {}).get("port") not in edge_ports

    # The ServiceMonitor scrapes Ray's metrics agent through the metrics Service, never an edge port.
    services = {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}
    for monitor in _by_kind(objects, "ServiceMonitor"):
        targets = [s for s in services.values()
                   if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert [s["metadata"]["name"] for s in targets] == ["gz-gazsi-cluster-metrics"]
        by_name = {p["name"]: p for p in targets[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            port = by_name[endpoint["port"]]
            assert port["targetPort"] == "metrics" and port["port"] not in edge_ports
            assert endpoint.get("scheme", "http") == "http" and "tlsConfig" not in endpoint

    # NetworkPolicies guard only the databases: none selects Ray pods, so none can cut gateway -> edge.
    for policy in _by_kind(objects, "NetworkPolicy"):
        component = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        assert component in ("postgresql", "redis")


@pytest.fixture
def chart_tls_files(render: Render, tmp_path: Path) -> Path:
    """ca.crt, tls.crt and tls.key of the Secret `helm template` generated (sprig genCA/genSignedCert)."""
    secret = next(s for s in _by_kind(render(), "Secret") if s["metadata"]["name"] == "gz-gazsi-cluster-tls")
    out = tmp_path / "tls"
    out.mkdir(mode=0o700)
    for key in ("ca.crt", "tls.crt", "tls.key"):
        (out / key).write_bytes(base64.b64decode(secret["data"][key]))
    (out / "tls.key").chmod(0o600)
    return out


def test_generated_certificate_serves_and_authenticates(chart_tls_files: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert = x509.load_pem_x509_certificate((chart_tls_files / "tls.crt").read_bytes())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # One certificate per release is both the edges' server and the cluster's client certificate.
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gz-gazsi-cluster-edge.gazsi.svc" in names.get_values_for_type(x509.DNSName)
    # No IP in it: edges are dialled at pod IPs, hence check_hostname=false on the cluster's clients.
    assert not names.get_values_for_type(x509.IPAddress)


def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    # TLS 1.2: the server checks the client certificate inside the handshake, so a refusal fails it there.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
                return f"answered {s.recv(65536)[:12]!r}"
        except (ssl.SSLError, ConnectionError) as exc:
            return f"refused: {getattr(exc, 'reason', None) or type(exc).__name__}"


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dataplane", ["fast", "asgi"])
async def test_chart_certificate_and_env_give_a_working_mtls_edge_and_gateway(
    render: Render, chart_tls_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataplane: str,
) -> None:
    """A real edge (FakeEngine; fast is the GPU pool's data plane, with one worker process) and gateway
    on loopback with exactly the env the chart renders for the GPU pool's pods (paths moved to a temp
    dir), the certificate `helm template` generated, and 127.0.0.1 standing in for a pod IP that the
    certificate does not name."""
    import httpx

    from control_plane.registry import Registry
    from edge_node.engines.fake import FakeEngine
    from gazsi_cluster.auth import AllowAll
    from gazsi_cluster.config import load_settings
    from gazsi_cluster.gateway import Gateway, create_gateway_app
    from gazsi_cluster.protocol import NodeLoad
    from gazsi_cluster.tls import client_context, routing_client_context
    from tests.support.edge import running_node

    pod = _ray_pods(render())["gpu"]
    _set_pod_env(monkeypatch, pod, tls_dir=chart_tls_files)
    for key in [k for k in os.environ if k.startswith("GAZSI_") and not k.startswith(CLUSTER_TLS_PREFIXES)]:
        monkeypatch.delenv(key)  # databases, Redis, join token: not what this test is about
    engine = FakeEngine()
    async with running_node(tmp_path / "edge", dataplane=dataplane, engine=engine, workers=1,
                            cache={"enabled": False}) as node:
        assert node.facts().scheme == "https" and node.url.startswith("https://127.0.0.1:")
        registry = Registry(join_token=None)
        rec = registry.join(node.facts(), None)
        registry.heartbeat(rec.node_id, NodeLoad())
        table = registry.snapshot()

        settings = load_settings(data_dir=str(tmp_path / "gw"), auth={"enabled": False},
                                 control_plane={"retry_attempts": 1, "connect_timeout_s": 2.0})
        gateway = Gateway(settings, authorizer=AllowAll(), table=lambda: table)
        try:
            transport = httpx.ASGITransport(app=create_gateway_app(gateway), raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=20) as gw:
                r = await gw.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["over mTLS"]})
            assert r.status_code == 200, r.text
            assert len(r.json()["data"][0]["embedding"]) == 384
        finally:
            await gateway.aclose()

        ca = chart_tls_files / "ca.crt"
        cert = (chart_tls_files / "tls.crt", chart_tls_files / "tls.key")
        peer = routing_client_context(settings.edge.peer_tls)  # what a forwarding edge dials with
        assert peer is not None and peer.check_hostname is False
        assert await asyncio.to_thread(_handshake, node.port, peer) == "answered b'HTTP/1.1 200'"
        # No client certificate: refused. Host name checked: refused too (the certificate names no pod IP).
        said = await asyncio.to_thread(_handshake, node.port, client_context(ca))
        assert said.startswith("refused"), said
        said = await asyncio.to_thread(_handshake, node.port, client_context(ca, certfile=cert[0], keyfile=cert[1]))
        assert said.startswith("refused") and "CERTIFICATE_VERIFY_FAILED" in said, said
