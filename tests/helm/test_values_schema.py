"""values.schema.json turns bad values into a clear `helm template` error; values.yaml is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _chart import CHART, run_helm

pytestmark = pytest.mark.helm


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["workerGroups.gpu.replicas=-1"], r"/workerGroups/gpu/replicas.*minimum"),
        (["workerGroups.smartnic.maxReplicas=-3"], r"/workerGroups/smartnic/maxReplicas.*minimum"),
        (["serve.edge.numReplicas=0"], r"/serve/edge/numReplicas.*minimum"),
        (["serve.gateway.numReplicas=many"], r"/serve/gateway/numReplicas.*got string, want null or integer"),
        (["workerGroups.gpu.gpus=one"], r"/workerGroups/gpu/gpus.*got string, want integer"),
        (["postgresql.enabled=maybe"], r"/postgresql/enabled.*got string, want boolean"),
        (["serve.profile=tpu"], r"/serve/profile"),
        (["replicaCount=3"], r"additional properties 'replicaCount' not allowed"),
        (["redis.passwd=x"], r"/redis.*additional properties 'passwd' not allowed"),
        (["workerGroups.gpu.dataplane=rdma"], r"/workerGroups/gpu/dataplane"),
        (["service.gateway.port=70000"], r"/service/gateway/port.*maximum"),
        (["tls.internal=maybe"], r"/tls/internal.*got string, want boolean"),
        (["workerGroups.gpu.edgeTLS=yes"], r"/workerGroups/gpu/edgeTLS.*got string, want boolean"),
    ],
)
def test_bad_values_fail_with_a_clear_message(helm_bin: Path, sets: list[str], message: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    proc = run_helm(helm_bin, "template", "gz", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"helm template accepted {sets}"
    assert "don't meet the specifications of the schema" in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["postgresql.enabled=false"], "postgresql.enabled=false needs postgresql.external.url"),
        (["redis.enabled=false"], "redis.enabled=false needs redis.external.url"),
        (["workerGroups.gpu.minReplicas=3"], r"workerGroups.gpu: minReplicas \(3\) exceeds replicas \(1\)"),
        (["workerGroups.gpu.maxReplicas=0"], r"workerGroups.gpu: replicas \(1\) exceeds maxReplicas \(0\)"),
    ],
)
def test_inconsistent_values_fail_in_the_templates(helm_bin: Path, sets: list[str], message: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    proc = run_helm(helm_bin, "template", "gz", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr


def test_every_value_is_documented() -> None:
    # helm-docs style: every value has a `# --` comment in the comment block right above it. What
    # sits under a documented key is that value's default and needs none; a key without one must
    # be a plain group (children below it), whose children are then checked in turn.
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z0-9_./-]+):(.*)$")
    undocumented = []
    documented_indent: int | None = None  # indent of the documented key whose default we are inside
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if documented_indent is not None:
            if indent > documented_indent or line.lstrip().startswith("-"):
                continue
            documented_indent = None
        if not m:
            continue
        key, rest = m.group(2), m.group(3).strip()
        if _documented(lines, i):
            documented_indent = indent
            continue
        nxt = next((ln for ln in lines[i + 1:] if ln.strip() and not ln.lstrip().startswith("#")), "")
        is_group = rest == "" and len(nxt) - len(nxt.lstrip()) > indent and not nxt.lstrip().startswith("-")
        if not is_group:
            undocumented.append(f"{i + 1}: {key}")
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


def _documented(lines: list[str], i: int) -> bool:
    j = i - 1
    while j >= 0 and lines[j].lstrip().startswith("#"):
        if lines[j].lstrip().startswith("# --"):
            return True
        j -= 1
    return False
