"""Edges outside the cluster in the chart (issue 17, ``outsideEdges``).

With ``outsideEdges.enabled`` the head pod runs the control plane's HTTPS join API and the gateways' reverse-tunnel
listener, each behind its own Service; every Ray pod gets the control plane settings `gazsi up` sets
(gazsi_cli/outside.py: serve_https, the join token as a file) and the head the tunnel ones (gateway.tunnel_*). The
cluster CA is the internal-TLS one, with its key (only the head mounts it). Off by default: it opens ports to the
outside and its certificates must name addresses only the operator knows. No Kubernetes cluster is involved.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from _chart import Render

pytestmark = pytest.mark.helm

ON = ["outsideEdges.enabled=true", "outsideEdges.hosts={edge.example.com,203.0.113.7}"]
FULL = "gz-gazsi-cluster"
HEAD_ONLY_ENV = ("GAZSI_GATEWAY__TUNNEL_",)


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rc = _by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]
    return {"head": rc["headGroupSpec"]["template"]} | {g["groupName"]: g["template"] for g in rc["workerGroupSpecs"]}


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(pod)["env"]}


def _services(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}


def _secrets(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["metadata"]["name"]: s for s in _by_kind(objects, "Secret")}


def test_off_by_default_and_disabled_renders_nothing(render: Render) -> None:
    for objects in (render(), render(sets=["outsideEdges.enabled=false", "outsideEdges.hosts={x.example}"])):
        services = _services(objects)
        assert f"{FULL}-control-plane" not in services and f"{FULL}-tunnel" not in services
        assert f"{FULL}-tunnel-tls" not in _secrets(objects)
        for name, pod in _pods(objects).items():
            env = _env(pod)
            assert not [k for k in env if k.startswith("GAZSI_GATEWAY__TUNNEL")], name
            assert "GAZSI_CONTROL_PLANE__SERVE_HTTPS" not in env and "GAZSI_CONTROL_PLANE__JOIN_TOKEN_FILE" not in env
            assert "GAZSI_CONTROL_PLANE__JOIN_TOKEN" in env  # as before: the in-cluster edges' token
            volumes = {v["name"] for v in pod["spec"]["volumes"]}
            assert not volumes & {"cluster-ca", "tunnel-tls", "join-token"}, name
            assert "initContainers" not in pod["spec"]
            ports = {p["name"] for p in _container(pod)["ports"]}
            assert not ports & {"control-plane", "tunnel"}


def test_each_listener_has_its_own_service_on_the_head(render: Render) -> None:
    objects = render(sets=[*ON, "outsideEdges.tunnel.service.type=NodePort", "outsideEdges.tunnel.service.nodePort=30444",
                           "outsideEdges.controlPlane.service.port=443", "outsideEdges.tunnel.port=9444"])
    services = _services(objects)
    head_ports = {p["name"]: p["containerPort"] for p in _container(_pods(objects)["head"])["ports"]}
    assert head_ports["control-plane"] == 8443 and head_ports["tunnel"] == 9444
    cp, tunnel = services[f"{FULL}-control-plane"]["spec"], services[f"{FULL}-tunnel"]["spec"]
    assert cp["type"] == "LoadBalancer" and tunnel["type"] == "NodePort"
    assert cp["ports"] == [{"name": "control-plane", "port": 443, "targetPort": "control-plane", "protocol": "TCP"}]
    assert tunnel["ports"] == [{"name": "tunnel", "port": 8444, "targetPort": "tunnel", "protocol": "TCP",
                                "nodePort": 30444}]
    for spec in (cp, tunnel):
        # The head: where the gateways (gateway.direct's resource) and the pinned control plane actor run.
        assert spec["selector"]["app.kubernetes.io/component"] == "head"
    cluster_ip = render(sets=[*ON, "outsideEdges.controlPlane.service.type=ClusterIP",
                              "outsideEdges.controlPlane.service.nodePort=30443"])
    assert "nodePort" not in _services(cluster_ip)[f"{FULL}-control-plane"]["spec"]["ports"][0]


def test_env_gives_the_settings_gazsi_up_sets(render: Render, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gazsi_cluster.config import load_settings, read_join_token

    pods = _pods(render(sets=ON))
    for name, pod in pods.items():
        for key in [k for k in os.environ if k.startswith("GAZSI_")]:
            monkeypatch.delenv(key)
        for item in _container(pod)["env"]:
            monkeypatch.setenv(item["name"], item.get("value", "secret-value"))
        env = _env(pod)
        # The token only as a file, like `gazsi up`: no Secret value in the environment.
        assert "GAZSI_CONTROL_PLANE__JOIN_TOKEN" not in env, name
        s = load_settings()
        cp = s.control_plane
        assert cp.serve_https and cp.host == "0.0.0.0" and cp.port == 8443, name
        assert str(cp.join_token_file) == "/etc/gazsi/join/join-token"
        assert {"edge.example.com", "203.0.113.7", f"{FULL}-control-plane.gazsi.svc"} <= set(cp.server_hosts)
        assert cp.ray_resources == {"gazsi_gateway": 1.0}  # the head's resource: the actor lands behind its Service
        mounts = {m["name"]: m["mountPath"] for m in _container(pod)["volumeMounts"]}
        assert mounts["join-token"] == "/etc/gazsi/join"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["join-token"]["secret"] == {"secretName": f"{FULL}-join-token", "defaultMode": 0o440,
                                                   "items": [{"key": "join-token", "path": "join-token"}]}
        # Every pod's TLS mount leaves the CA key out; only the head gets it, for the control plane.
        assert [i["key"] for i in volumes["tls"]["secret"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
        gw = s.gateway
        if name == "head":
            assert gw.tunnel_port == 8444 and gw.tunnel_host == "0.0.0.0"
            assert str(gw.tunnel_tls.certfile) == "/etc/gazsi/tunnel/tls.crt"
            assert str(gw.tunnel_tls.client_ca_file) == "/etc/gazsi/tls/ca.crt" and gw.tunnel_tls.require_client_cert
            assert mounts["tunnel-tls"] == "/etc/gazsi/tunnel"
            assert volumes["tunnel-tls"]["secret"]["secretName"] == f"{FULL}-tunnel-tls"
            assert [i["key"] for i in volumes["cluster-ca"]["secret"]["items"]] == ["ca.crt", "ca.key"]
        else:
            assert gw.tunnel_port is None and not [k for k in env if k.startswith(HEAD_ONLY_ENV)], name
            assert not {"cluster-ca", "tunnel-tls"} & volumes.keys()
    # The token file the settings name reads back as the Secret's value.
    (tmp_path / "join-token").write_text("t0k3n\n")
    monkeypatch.setenv("GAZSI_CONTROL_PLANE__JOIN_TOKEN_FILE", str(tmp_path / "join-token"))
    assert read_join_token(load_settings().control_plane) == "t0k3n"


def test_head_copies_the_ca_where_the_control_plane_loads_it(render: Render) -> None:
    head = _pods(render(sets=ON))["head"]
    init = head["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["cluster-ca"]
    script = init[0]["command"][-1]
    # control_plane/ca.py loads <data dir>/ca/ca.{crt,key}; GAZSI_DATA_DIR is /data/gazsi on the data emptyDir.
    assert "/data/gazsi/ca/ca.key" in script and "/data/gazsi/ca/ca.crt" in script
    assert _env(head)["GAZSI_DATA_DIR"] == "/data/gazsi"
    assert {m["name"] for m in init[0]["volumeMounts"]} == {"data", "cluster-ca"}


def test_generated_certificates_chain_to_the_cluster_ca(render: Render, tmp_path: Path) -> None:
    from cryptography import x509

    from control_plane.ca import ClusterCA

    secrets = _secrets(render(sets=ON))
    tls, tunnel = secrets[f"{FULL}-tls"]["data"], secrets[f"{FULL}-tunnel-tls"]["data"]
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    for key in ("ca.crt", "ca.key"):
        (ca_dir / key).write_bytes(base64.b64decode(tls[key]))
    # The control plane loads the chart's CA (an EC key, as control_plane/ca.py needs) and signs with it.
    ca = ClusterCA.load_or_create(tmp_path)
    issued = x509.load_pem_x509_certificate(ca.issue_node_cert("edge-1").cert_pem)
    ca_cert = x509.load_pem_x509_certificate(base64.b64decode(tls["ca.crt"]))
    issued.verify_directly_issued_by(ca_cert)
    tunnel_cert = x509.load_pem_x509_certificate(base64.b64decode(tunnel["tls.crt"]))
    tunnel_cert.verify_directly_issued_by(ca_cert)
    san = tunnel_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edge.example.com" in san.get_values_for_type(x509.DNSName)
    assert "203.0.113.7" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


@pytest.mark.parametrize(("sets", "message"), [
    (["tls.enabled=false"], "needs tls.enabled"),
    (["gateway.direct.enabled=false"], "needs gateway.direct.enabled"),
    (["outsideEdges.hosts=null"], "needs outsideEdges.hosts"),
    (["tls.existingSecret=mine"], "needs outsideEdges.tunnel.existingSecret"),
    (["outsideEdges.tunnel.port=8090"], "collides with gateway.direct.port"),
])
def test_incomplete_setups_are_refused_at_template_time(render: Render, sets: list[str], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        render(sets=[*ON, *sets])


def test_existing_secrets_are_used_not_generated(render: Render) -> None:
    objects = render(sets=[*ON, "tls.existingSecret=my-ca", "outsideEdges.tunnel.existingSecret=my-tunnel",
                           "controlPlane.existingSecret=my-token"])
    assert not {"gz-gazsi-cluster-tls", f"{FULL}-tunnel-tls", f"{FULL}-join-token"} & _secrets(objects).keys()
    head = _pods(objects)["head"]
    volumes = {v["name"]: v["secret"]["secretName"] for v in head["spec"]["volumes"] if "secret" in v}
    assert volumes == {"tls": "my-ca", "cluster-ca": "my-ca", "tunnel-tls": "my-tunnel", "join-token": "my-token"}


def test_notes_print_the_join_command(helm_bin: Path) -> None:
    from _chart import CHART, run_helm, value_args

    out = run_helm(helm_bin, "install", "gz", str(CHART), "--namespace", "gazsi", "--dry-run=client",
                   *value_args([], ON)).stdout
    notes = out[out.index("NOTES:"):]
    assert ("gazsi edge serve --control-plane https://edge.example.com:8443 --ca-file gazsi-ca.crt \\\n"
            '      --join-token "$(cat gazsi-join-token)" --tunnel edge.example.com:8444') in notes
    assert "get secret gz-gazsi-cluster-join-token -o jsonpath='{.data.join-token}' | base64 -d" in notes
    assert "get secret gz-gazsi-cluster-tls -o jsonpath='{.data.ca\\.crt}' | base64 -d" in notes
    assert "{{" not in notes and "<no value>" not in notes
