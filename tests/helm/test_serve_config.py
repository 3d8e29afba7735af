"""serveConfigV2 is deployments/<profile>.yaml with the chart's overrides applied, nothing else."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart import CHART, ROOT, VALUE_SETS, Render, chart_values, deep_merge

pytestmark = pytest.mark.helm


_deep_merge = deep_merge
_values = chart_values


def expected_serve_config(values: dict[str, Any]) -> dict[str, Any]:
    """The override rules of templates/_serve.tpl, written again in Python."""
    serve = values["serve"]
    cfg: dict[str, Any] = yaml.safe_load((ROOT / "deployments" / f"{serve['profile']}.yaml").read_text())
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "0.0.0.0", "port": serve["port"]}
    if serve["proxyLocation"]:
        cfg["proxy_location"] = serve["proxyLocation"]
    groups = [g for g in values["workerGroups"].values() if g.get("enabled")]
    gpus = sum(g["replicas"] * g["gpus"] for g in groups)
    gpus_min = sum(g["minReplicas"] * g["gpus"] for g in groups)
    gpus_max = sum(g["maxReplicas"] * g["gpus"] for g in groups)
    for app in cfg["applications"]:
        for dep in app["deployments"]:
            over = {"Gateway": serve["gateway"], "Edge": serve["edge"]}.get(dep["name"], {})
            for key, field in (("numReplicas", "num_replicas"), ("maxOngoingRequests", "max_ongoing_requests")):
                if over.get(key) is not None:
                    dep[field] = over[key]
            opts = dep.setdefault("ray_actor_options", {})
            for key, field in (("numCpus", "num_cpus"), ("numGpus", "num_gpus")):
                if over.get(key) is not None:
                    opts[field] = over[key]
            if dep["name"] == "Gateway" and values["gateway"]["direct"]["enabled"]:
                # Pinned to the head, the pod behind <release>-gateway-direct.
                opts["resources"] = {**opts.get("resources", {}), "gazsi_gateway": 1}
            if over.get("userConfig"):
                dep["user_config"] = _deep_merge(dep.get("user_config", {}), over["userConfig"])
            per = float(opts.get("num_gpus", 0))
            if (dep["name"] == "Edge" and over.get("numReplicas") is None and serve["profile"] == "gpu"
                    and per > 0 and gpus > 0):
                if values["autoscaling"]["enabled"]:
                    dep.pop("num_replicas", None)
                    dep["autoscaling_config"] = {
                        "min_replicas": max(1, math.floor(gpus_min / per)),
                        "initial_replicas": max(1, math.floor(gpus / per)),
                        "max_replicas": max(1, math.floor(gpus_max / per)),
                        "target_ongoing_requests": values["autoscaling"]["targetOngoingRequests"],
                    }
                else:
                    dep["num_replicas"] = max(1, math.floor(gpus / per))
    return cfg


def _rendered(objects: list[dict[str, Any]]) -> dict[str, Any]:
    rs = next(o for o in objects if o["kind"] == "RayService")
    assert isinstance(rs["spec"]["serveConfigV2"], str)
    cfg: dict[str, Any] = yaml.safe_load(rs["spec"]["serveConfigV2"])
    return cfg


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_chart_reads_the_deployments_files_themselves(profile: str) -> None:
    # One source of truth: the chart's files are symlinks to deployments/, which helm follows
    # (and `helm package` stores as regular files). A copy would be allowed to drift; this is not.
    link = CHART / "files" / "serve" / f"{profile}.yaml"
    target = ROOT / "deployments" / f"{profile}.yaml"
    assert link.is_symlink(), f"{link} must be a symlink to {target}, not a copy"
    assert link.resolve() == target.resolve()
    assert link.read_bytes() == target.read_bytes()


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_serve_config_is_deployments_plus_overrides(render: Render, value_set: str) -> None:
    files = VALUE_SETS[value_set]
    assert _rendered(render(files)) == expected_serve_config(_values(files))


def test_default_gpu_profile_runs_one_edge_per_gpu(render: Render) -> None:
    cfg = _rendered(render())
    base = yaml.safe_load((ROOT / "deployments" / "gpu.yaml").read_text())
    edge = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Edge")
    # Two enabled groups with one 1-GPU pod each.
    assert edge["num_replicas"] == 2
    # Everything but the documented overrides is the file's.
    unchanged = copy.deepcopy(cfg)
    unchanged["http_options"] = base["http_options"]
    deps = {d["name"]: d for d in unchanged["applications"][0]["deployments"]}
    deps["Edge"]["num_replicas"] = 1
    # gateway.direct (on by default) pins the gateways to the head's custom resource.
    assert deps["Gateway"]["ray_actor_options"].pop("resources") == {"gazsi_gateway": 1}
    assert unchanged == base


def test_explicit_overrides_win(render: Render, tmp_path: Path) -> None:
    # A values file, not --set: helm's --set turns 0.5 into a string.
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"serve": {
        "port": 9000, "proxyLocation": "HeadOnly", "gateway": {"numCpus": 0.5},
        # Two replicas per 1-GPU pod: at 6 CPUs each they fit the pools' 14 (12 would be refused).
        "edge": {"numReplicas": 5, "numGpus": 0.5, "numCpus": 6, "userConfig": {"batcher": {"max_wait_us": 250}}},
    }}))
    cfg = _rendered(render([overrides]))
    assert cfg == expected_serve_config(_values([overrides]))
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    assert deps["Edge"]["num_replicas"] == 5
    assert deps["Edge"]["ray_actor_options"] == {"num_cpus": 6, "num_gpus": 0.5}
    # Deep merge: the file's other batcher settings stay.
    assert deps["Edge"]["user_config"]["batcher"] == {
        "max_batch_size": 512, "max_wait_us": 250, "max_batch_tokens": 65536, "queue_capacity": 16384,
        "max_queued_tokens": 16000000, "pipeline_depth": 2}
    assert deps["Gateway"]["ray_actor_options"] == {"num_cpus": 0.5, "resources": {"gazsi_gateway": 1}}
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 9000}
    assert cfg["proxy_location"] == "HeadOnly"


def test_autoscaling_spans_the_gpu_range(render: Render) -> None:
    cfg = _rendered(render(VALUE_SETS["no-smartnic"]))
    edge = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Edge")
    assert "num_replicas" not in edge
    # gpu group: 1..6 pods (2 now) of 2 GPUs, one replica per GPU.
    assert edge["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 4, "max_replicas": 12,
                                          "target_ongoing_requests": 64}
