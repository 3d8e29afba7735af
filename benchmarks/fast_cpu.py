"""The fast front's CPU per request, by process, this tree against another (issue 13: not more than ``bcad347``).

Starts ``gazsi edge serve`` with the fast front (1 worker, the fake engine, cache and auth off; the settings
of ``h100_bench.py``) from each tree in turn, sends a fixed number of requests of each kind (``inference`` =
``GET /inference?d=...``, ``single`` = one-input ``POST /v1/embeddings``; the bodies of ``h100_bench.py``)
at each concurrency, and reports per request, for the worker process and the engine (node) process:

* ``--tool callgrind`` (default): **instructions**, counted by valgrind's callgrind over exactly the load
  (the servers run under ``valgrind --trace-children=yes --instr-atstart=no``; ``callgrind_control`` turns
  counting on and zeroes it before a load and dumps after it). Independent of other load on the machine
  (this VM has no hardware counters: ``perf stat -e instructions`` says ``<not supported>``).
* ``--tool cpu``: user+system CPU seconds per process over the load (``/proc``) and the request rate:
  wall-clock numbers, noisy on a shared machine.

Both also give the engine's mean batch (its ``gazsi_batch_size`` histogram). Every answer must be 200.

    git archive bcad347 | tar -x -C /tmp/before
    flock /tmp/gazsi-bench.lock python benchmarks/fast_cpu.py --before-tree /tmp/before --out /tmp/fast-cpu

``--main-tree`` adds a third tree of today's layout (the commit before a change), ``--edge KEY=VALUE`` sets
``edge.*`` keys on today's trees (``ring_flush_slots=1``: a write per slot, what the H200 runs). Runs above
concurrency 1 batch: their counts depend on timing (valgrind slows every process), concurrency 1 does not.

Roles are found from sockets: the worker is the process listening on the data port, the engine the one
listening on the admin port (the tree before the refactor also has a supervisor process: "other").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.h100_bench import CORES, System, cpu_by_process, our_config, payloads, yaml_scalar  # noqa: E402

HOST = "127.0.0.1"


# -- a fixed number of requests -----------------------------------------------------------------
def raw_requests(kind: str, n: int, offset: int = 0) -> list[bytes]:
    """``n`` HTTP/1.1 requests of ``kind`` (h100_bench's bodies: inputs differ within a run)."""
    method, path, bodies = payloads(kind, n + offset)
    out = []
    for body in bodies[offset:]:
        if method == "GET":
            out.append(f"GET {path}{body} HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
        else:
            data = body.encode()
            out.append(f"POST {path} HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
                       f"content-length: {len(data)}\r\n\r\n".encode() + data)
    return out


async def _send_all(port: int, requests: list[bytes], conns: int) -> collections.Counter[int]:
    statuses: collections.Counter[int] = collections.Counter()
    todo = iter(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for req in todo:  # shared: each connection takes the next request (closed loop)
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(int(v) for k, _, v in (ln.partition(": ") for ln in lines[1:]) if k == "content-length")
                await reader.readexactly(length)
                statuses[int(lines[0].split()[1])] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(conns)))
    return statuses


def send_all(port: int, requests: list[bytes], conns: int) -> tuple[dict[int, int], float]:
    t0 = time.perf_counter()
    statuses = asyncio.run(_send_all(port, requests, conns))
    return dict(statuses), time.perf_counter() - t0


# -- processes ------------------------------------------------------------------------------------
def roles(root_pid: int, port: int, admin_port: int) -> dict[int, str]:
    """pid -> worker | engine | other, for every process of the server."""
    import psutil

    out: dict[int, str] = {}
    for p in [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]:
        try:
            listening = {c.laddr.port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
        out[p.pid] = "worker" if port in listening else "engine" if admin_port in listening else "other"
    return out


def callgrind(op: str, pid: int) -> None:
    subprocess.run(["callgrind_control", op, str(pid)], check=True, capture_output=True, timeout=120)


def dumped_instructions(pattern: str, seen: set[str]) -> int:
    """Instructions in the dump file matching ``pattern`` that ``seen`` does not hold yet."""
    new = sorted(set(glob.glob(pattern)) - seen, key=os.path.getmtime)
    if len(new) != 1:
        raise RuntimeError(f"expected one new dump for {pattern}, found {new}")
    seen.add(new[0])
    with open(new[0]) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {new[0]}")


# -- one tree -------------------------------------------------------------------------------------
def bench_tree(name: str, tree: Path, flavor: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    extra = args.edge if flavor == "now" else {}  # the tree before the refactor lacks today's keys
    cfg = our_config(out / f"cfg_{name}.yaml", None, port, 1, backend="fake", flavor=flavor,
                     data_dir=str(out / f"data_{name}"), **extra)
    py = sys.executable
    main_mod = "gazsi_cli.main" if flavor == "now" else "gazsi_cluster.cli.main"
    cmd = [py, "-c", f"import sys; from {main_mod} import main; sys.exit(main(sys.argv[1:]))",
           "--config", str(cfg), "edge", "serve"]
    if args.tool == "callgrind":
        cmd = ["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
               f"--callgrind-out-file={out}/cg.{name}.%p", *cmd]
    admin = port + 1
    system = System(name, cmd, f"http://{HOST}:{port}", f"http://{HOST}:{admin}/readyz",
                    f"http://{HOST}:{admin}/metrics", [], cwd=tree, ready_s=900.0,
                    env={"PYTHONPATH": str(tree)})
    res: dict[str, Any] = {"tree": str(tree), "commit": _commit(tree), "edge": extra, "runs": {}}
    system.start(out)
    try:
        assert system.proc is not None
        for kind in args.kinds:  # warm-up: lazy imports, first-use paths
            statuses, _ = send_all(port, raw_requests(kind, args.warmup), 4)
            if set(statuses) != {200}:
                raise RuntimeError(f"{name}: warm-up {kind} answered {statuses}")
        pids = roles(system.proc.pid, port, admin)
        res["roles"] = {str(p): r for p, r in pids.items()}
        if sorted(pids.values()).count("worker") != 1 or "engine" not in pids.values():
            raise RuntimeError(f"{name}: could not tell the worker and the engine apart: {pids}")
        seen = set(glob.glob(str(out / f"cg.{name}.*")))
        if args.tool == "callgrind":
            for pid in pids:
                callgrind("--instr=on", pid)
        offset = args.warmup
        for kind in args.kinds:
            for conns in args.conns:
                n = args.requests if conns == 1 else args.requests * args.loaded_factor
                reqs = raw_requests(kind, n, offset)
                offset += n
                batch0 = system.batch_counters()
                cpu0 = cpu_by_process(system.proc.pid)
                if args.tool == "callgrind":
                    for pid in pids:
                        callgrind("--zero", pid)
                statuses, secs = send_all(port, reqs, conns)
                if args.tool == "callgrind":
                    for pid in pids:
                        callgrind("--dump", pid)
                cpu1 = cpu_by_process(system.proc.pid)
                batch1 = system.batch_counters()
                run: dict[str, Any] = {"requests": n, "conns": conns, "statuses": statuses, "seconds": secs,
                                       "rps": n / secs}
                if batch0 and batch1 and batch1[1] > batch0[1]:
                    run["mean_batch"] = (batch1[0] - batch0[0]) / (batch1[1] - batch0[1])
                per_role: dict[str, float] = collections.defaultdict(float)
                for pid, role in pids.items():
                    if args.tool == "callgrind":
                        per_role[role] += dumped_instructions(str(out / f"cg.{name}.{pid}.*"), seen) / n
                    else:
                        per_role[role] += (cpu1.get(pid, (0.0, {}))[0] - cpu0.get(pid, (0.0, {}))[0]) * 1e3 / n
                per_role["all"] = sum(per_role.values())
                run["per_request"] = dict(per_role)
                res["runs"][f"{kind}/c{conns}"] = run
                print(f"  {name:7s} {kind:9s} c={conns:<3d} {_fmt(run, args.tool)}", flush=True)
                if set(statuses) != {200}:
                    raise RuntimeError(f"{name}: {kind} answered {statuses}")
    finally:
        system.stop()
    return res


def _commit(tree: Path) -> str:
    if (tree / ".git").exists():
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() + (" +changes" if _dirty(tree) else "")
    return "archive"


def _dirty(tree: Path) -> bool:
    return bool(subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip())


def _fmt(run: dict[str, Any], tool: str) -> str:
    pr = run["per_request"]
    unit = "instr/req" if tool == "callgrind" else "CPU ms/req"
    vals = " ".join(f"{r} {pr.get(r, 0):,.0f}" if tool == "callgrind" else f"{r} {pr.get(r, 0):.4f}"
                    for r in ("worker", "engine", "other", "all"))
    return f"{unit}: {vals}; batch {run.get('mean_batch', float('nan')):.1f}; {run['rps']:,.0f} req/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--before-tree", type=Path, help="a tree of the commit before the refactor (bcad347)")
    ap.add_argument("--main-tree", type=Path, help="another tree of today's layout (e.g. main, to show a change)")
    ap.add_argument("--edge", action="append", default=[], metavar="KEY=VALUE",
                    help="edge.* settings for the trees of today's layout (e.g. ring_flush_slots=1, the H200's)")
    ap.add_argument("--tool", choices=("callgrind", "cpu"), default="callgrind")
    ap.add_argument("--kinds", default="inference,single")
    ap.add_argument("--conns", default="1,32", help="concurrencies; each a run of its own")
    ap.add_argument("--requests", type=int, default=500, help="requests per run at concurrency 1")
    ap.add_argument("--loaded-factor", type=int, default=4, help="runs above concurrency 1 send this many times more")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--server-cores", default="0-1")
    ap.add_argument("--trees", default="now,main,before", help="which of them run, in this order")
    args = ap.parse_args()
    args.kinds = args.kinds.split(",")
    args.conns = [int(c) for c in args.conns.split(",")]
    args.edge = {k: yaml_scalar(v) for k, _, v in (kv.partition("=") for kv in args.edge)}
    CORES["server"] = args.server_cores
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "tool": args.tool, "load": os.getloadavg(), "trees": {}}
    trees = {"now": (ROOT, "now", 18700)}
    if args.main_tree:
        trees["main"] = (args.main_tree.resolve(), "now", 18720)
    if args.before_tree:
        trees["before"] = (args.before_tree.resolve(), "before", 18710)
    for name in args.trees.split(","):
        if name not in trees:
            continue
        tree, flavor, port = trees[name]
        print(f"== {name} ({tree})", flush=True)
        results["trees"][name] = bench_tree(name, tree, flavor, port, args)
        (args.out / f"fast_cpu_{args.tool}.json").write_text(json.dumps(results, indent=1))
    for base in ("main", "before"):
        if {"now", base} <= results["trees"].keys():
            print(f"now / {base}, per request:")
            for key, now in results["trees"]["now"]["runs"].items():
                other = results["trees"][base]["runs"].get(key)
                if other:
                    ratios = " ".join(f"{r} {now['per_request'][r] / other['per_request'][r]:.3f}"
                                      for r in ("worker", "engine", "all") if other["per_request"].get(r))
                    print(f"  {key:16s} {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
