"""One run on the GPU machine: model-only ceiling, this edge node, vanilla Ray Serve (issue 8).

Same GPU, same model (all-MiniLM-L6-v2 architecture, fp16; random weights, generated on the
machine: speed only), same load generator (``wrk``, 4 threads pinned to the last 4 cores; every
server pinned to the other cores), same inputs (8-16-token sentences and ~128-token texts).

    python3 benchmarks/h100_bench.py --out $OUT --wrk .whl_perf_tools/wrk --model-src .whl_perf_tools/model

System ``infinity`` (issue 14's peer) runs Infinity 0.0.78 from ``--infinity-site``, a folder holding it and
the pinned versions it needs (numpy<2, scipy 1.13, sentence-transformers 3.4, transformers 4.57, ...),
installed there with ``pip install --no-deps --target``; saturation only.

Per system: saturation (closed loop, wrk -c256) for 1-input and 32-input ``POST /v1/embeddings``
and 1 long input; then latency at 10/50/90 % of that system's own 1-input saturation. wrk has no
open-loop mode: those runs are *paced* (each connection waits a random delay between requests,
enough connections that the delay dominates), and the achieved rate is what is reported. Mean
batch size comes from the server (``gazsi_batch_size`` histogram, or the peer's ``/stats``).
CPU per request sums user+system time over the server's whole process tree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import SENTENCES, long_text  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
_GPU_BATCHER: dict[str, Any] = {"batcher.pipeline_depth": 1}  # the gpu plane's systems: its measured best and the product default
CORES = {"server": "0-11", "wrk": "12-15"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- model -----------------------------------------------------------------------------------
def prepare_model(src: Path, dst: Path) -> Path:
    """Copy the carried tokenizer/config files and add random fp32 weights (BERT layout)."""
    if (dst / "model.safetensors").is_file():
        return dst
    shutil.copytree(src, dst, dirs_exist_ok=True)
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig.from_pretrained(str(dst)), add_pooling_layer=False)
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst


# -- wrk --------------------------------------------------------------------------------------
_LUA = r"""
local bodies = %(bodies)s
local path = "%(path)s"
local method = "%(method)s"
local lo, hi = %(lo)d, %(hi)d
local i = 0
request = function()
  i = i + 1
  local b = bodies[(i %% #bodies) + 1]
  if method == "GET" then return wrk.format("GET", path .. b) end
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, b)
end
if hi > 0 then delay = function() return math.random(lo, hi) end end
%(statuses)s
done = function(summary, latency, requests)
  local e = summary.errors
  if threads then  -- status codes per thread (only with statuses=True: parsing replies costs wrk time)
    local all = {}
    for _, t in ipairs(threads) do
      for code, n in pairs(t:get("counts")) do all[code] = (all[code] or 0) + n end
    end
    local parts = {}
    for code, n in pairs(all) do parts[#parts + 1] = string.format('"%%d":%%d', code, n) end
    io.write('WRKSTATUS {' .. table.concat(parts, ",") .. '}\n')
  end
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"p50":%%d,"p95":%%d,"p99":%%d,' ..
    '"mean":%%f,"max":%%d,"err_connect":%%d,"err_read":%%d,"err_write":%%d,"err_status":%%d,"err_timeout":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


_STATUS_LUA = r"""
threads = {}
setup = function(thread) table.insert(threads, thread) end
counts = {}
response = function(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
"""


def _lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def payloads(kind: str, n: int = 64) -> tuple[str, str, list[str]]:
    """(method, path, bodies) for kind in single | batch32 | long | inference."""
    rng = random.Random(7)
    if kind == "inference":
        from urllib.parse import quote

        return "GET", "/inference?d=", [quote(f"{rng.choice(SENTENCES)} {i}") for i in range(n)]
    bodies = []
    for i in range(n):
        if kind == "single":
            inp: Any = f"{rng.choice(SENTENCES)} {i}"
        elif kind == "long":
            inp = long_text(i)
        else:
            inp = [f"{rng.choice(SENTENCES)} {i} {j}" for j in range(32)]
        bodies.append(json.dumps({"input": inp, "model": MODEL}))
    return "POST", "/v1/embeddings", bodies


class Wrk:
    def __init__(self, folder: Path, out: Path) -> None:
        self.bin = folder / "usr/bin/wrk"
        self.env = {**os.environ, "LD_LIBRARY_PATH": str(folder / "usr/lib/x86_64-linux-gnu")}
        self.out = out

    def run(self, url: str, kind: str, conns: int, duration: float, delay_ms: tuple[int, int] = (0, 0),
            statuses: bool = False) -> dict[str, Any]:
        method, path, bodies = payloads(kind)
        script = self.out / f"wrk_{kind}.lua"
        script.write_text(_LUA % {"bodies": "{" + ",".join(_lua_str(b) for b in bodies) + "}", "path": path,
                                  "method": method, "lo": delay_ms[0], "hi": delay_ms[1],
                                  "statuses": _STATUS_LUA if statuses else ""})
        threads = min(4, conns)
        cmd = ["taskset", "-c", CORES["wrk"], str(self.bin), f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s",
               "--timeout", "10s", "-s", str(script), url]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=duration + 60)
        codes = {}
        for line in proc.stdout.splitlines():
            if line.startswith("WRKSTATUS "):
                codes = json.loads(line[10:])
            if line.startswith("WRKJSON "):
                r: dict[str, Any] = json.loads(line[8:])
                if codes:
                    r["statuses"] = codes
                secs = r["duration_us"] / 1e6
                r["rps"] = r["requests"] / secs if secs else 0.0
                r["errors"] = sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
                return r
        raise RuntimeError(f"wrk gave no result: {proc.stdout[-500:]} {proc.stderr[-500:]}")


# -- servers ----------------------------------------------------------------------------------
def http_get(url: str, timeout: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bytes(resp.read())
    except Exception:
        return None


def cpu_seconds(root_pid: int) -> float:
    import psutil

    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def cpu_by_process(root_pid: int) -> dict[int, tuple[float, dict[int, float]]]:
    """CPU seconds (user+system) of every process of the server, and of each of its threads."""
    import psutil

    out: dict[int, tuple[float, dict[int, float]]] = {}
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, {th.id: th.user_time + th.system_time for th in p.threads()})
        except psutil.Error:
            pass
    return out


def cpu_split(before: dict[int, tuple[float, dict[int, float]]], after: dict[int, tuple[float, dict[int, float]]],
              requests: int) -> list[dict[str, Any]]:
    """Per process: CPU ms per request and its busiest threads' (where a single thread is the limit)."""
    rows = []
    for pid, (total, threads) in after.items():
        t0, th0 = before.get(pid, (0.0, {}))
        busiest = sorted(((v - th0.get(tid, 0.0)) for tid, v in threads.items()), reverse=True)[:3]
        rows.append({"pid": pid, "threads": len(threads), "ms_per_req": (total - t0) * 1e3 / requests,
                     "busiest_threads_ms_per_req": [round(b * 1e3 / requests, 4) for b in busiest]})
    return sorted(rows, key=lambda r: -r["ms_per_req"])


class System:
    """A server under test: how to start it, where to send load, how to read its batch sizes."""

    def __init__(self, name: str, cmd: list[str], url: str, ready_url: str, batch_url: str | None,
                 kinds: list[str], env: dict[str, str] | None = None, ready_s: float = 120.0,
                 paced: bool = True, cwd: Path | None = None) -> None:
        self.cwd = cwd or ROOT
        self.name, self.cmd, self.url, self.ready_url = name, cmd, url, ready_url
        self.paced = paced  # False: saturation only (A/B variants, to save device time)
        self.batch_url, self.kinds, self.env, self.ready_s = batch_url, kinds, env, ready_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, out: Path) -> None:
        logf = (out / f"server_{self.name}.log").open("wb")
        self.proc = subprocess.Popen(["taskset", "-c", CORES["server"], *self.cmd], stdout=logf, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})}, start_new_session=True, cwd=self.cwd)
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            if http_get(self.ready_url) is not None:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {self.ready_s}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except Exception:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def plane_detail(self) -> dict[str, Any] | None:
        """The gpu plane's part of ``/readyz`` (admission counters, stage table), None on other systems."""
        if not self.name.startswith("edge-gpu"):
            return None
        raw = http_get(self.ready_url)
        try:
            transport = json.loads(raw or b"{}").get("transport") or {}
        except ValueError:
            return None
        return transport if isinstance(transport.get("gpu"), dict) else None

    def batch_counters(self) -> tuple[float, float] | None:
        if not self.batch_url:
            return None
        raw = http_get(self.batch_url)
        if raw is None:
            return None
        text = raw.decode()
        if text.startswith("{"):
            d = json.loads(text)
            return float(d["items"]), float(d["batches"])
        s = c = None
        for line in text.splitlines():
            if line.startswith("gazsi_batch_size_sum "):
                s = float(line.split()[1])
            elif line.startswith("gazsi_batch_size_count "):
                c = float(line.split()[1])
        return (s, c) if s is not None and c is not None else None


def measure(system: System, wrk: Wrk, kind: str, conns: int, duration: float,
            delay_ms: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    assert system.proc is not None
    before, cpu0, split0 = system.batch_counters(), cpu_seconds(system.proc.pid), cpu_by_process(system.proc.pid)
    plane0 = system.plane_detail()
    r = wrk.run(system.url, kind, conns, duration, delay_ms)
    after, cpu1, split1 = system.batch_counters(), cpu_seconds(system.proc.pid), cpu_by_process(system.proc.pid)
    plane1 = system.plane_detail()
    # wrk counts every answer as a request: a 429 storm is not throughput, so 2xx answers are counted too.
    secs = r["duration_us"] / 1e6
    r["ok_rps"] = (r["requests"] - r["errors"]) / secs if secs else 0.0
    if plane0 and plane1:  # the gpu plane's admission counters over this run, and its ring's stage table
        r["gpu_stats"] = {k: plane1["gpu"][k] - plane0["gpu"].get(k, 0) for k in plane1["gpu"]}
        r["gpu_stages_us"] = plane1.get("gpu_stages_us")
    if before and after and after[1] > before[1]:
        r["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1])
    if r["requests"]:
        r["cpu_ms_per_req"] = (cpu1 - cpu0) * 1e3 / r["requests"]
        r["cpu_split"] = cpu_split(split0, split1, r["requests"])
    r.update(kind=kind, conns=conns, delay_ms=list(delay_ms))
    log(f"  {system.name:14s} {kind:9s} c={conns:4d} delay={delay_ms}: {r['rps']:10,.0f} req/s "
        f"p50 {r['p50'] / 1e3:7.2f} ms p99 {r['p99'] / 1e3:7.2f} ms errors {r['errors']} "
        f"batch {r.get('mean_batch', float('nan')):.1f} cpu/req {r.get('cpu_ms_per_req', float('nan')):.3f} ms "
        f"2xx {r['ok_rps']:,.0f}/s" + (f" gpu {r['gpu_stats']}" if "gpu_stats" in r else ""))
    return r


def paced(target_rps: float) -> tuple[int, tuple[int, int]]:
    """Connections and delay range (ms) for a paced run near ``target_rps``; ~20 ms per connection cycle."""
    conns = max(4, min(4000, round(target_rps * 0.02)))
    mean_ms = conns / target_rps * 1000
    return conns, (max(0, round(mean_ms * 0.5)), max(1, round(mean_ms * 1.5)))


def bench_system(system: System, wrk: Wrk, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"name": system.name}
    t0 = time.monotonic()
    system.start(out)
    res["start_s"] = time.monotonic() - t0
    log(f"{system.name}: ready in {res['start_s']:.1f}s")
    try:
        for kind in system.kinds:  # warm-up: captures the batch shapes' graphs, JIT, connection pools
            wrk.run(system.url, kind, 64, 2)
        sat = {}
        for kind in system.kinds:
            conns = 64 if kind == "batch32" else args.conns
            sat[kind] = measure(system, wrk, kind, conns, args.duration)
        res["saturation"] = sat
        main_kind = system.kinds[0]  # the paced runs and the 2x overload use the first kind
        top = sat[main_kind]["rps"]
        res["latency"] = {}
        for frac in (0.1, 0.5, 0.9) if system.paced else ():
            conns, delay = paced(top * frac)
            r = measure(system, wrk, main_kind, conns, args.duration, delay)
            r["target_rps"] = top * frac
            r["load_frac"] = r["rps"] / top if top else 0.0
            res["latency"][str(frac)] = r
        if system.paced and top:
            # Issue 15's goodput at 2x overload: twice the saturation rate offered (paced connections),
            # 2xx answers per second against the 2xx rate at saturation.
            conns, delay = paced(top * 2)
            r = measure(system, wrk, main_kind, conns, args.duration, delay)
            r["target_rps"] = top * 2
            r["goodput_vs_saturation"] = r["ok_rps"] / sat[main_kind]["ok_rps"] if sat[main_kind]["ok_rps"] else 0.0
            res["overload_2x"] = r
            log(f"  {system.name}: goodput at 2x overload {r['goodput_vs_saturation']:.1%} of saturation")
        if args.profile and system.name.startswith(("edge-fast", "edge-gpu")):
            try:
                res["profile"] = profile(system, wrk, args, out)
            except Exception as exc:  # a profiler problem must not lose the measurements
                res["profile"] = {"error": repr(exc)}
    except Exception as exc:
        log(f"{system.name}: FAILED {exc!r}")
        res["error"] = repr(exc)
    finally:
        system.stop()
    return res


def profile(system: System, wrk: Wrk, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """py-spy on the engine process and one worker (an HTTP worker, or a gpu plane's feed process) while wrk
    saturates (top self-time frames)."""
    import psutil

    assert system.proc is not None
    # Today the node process (engine, slot batcher) is the server itself and workers are
    # ``python -m edge_node.worker_process`` children. The tree before issue 13 forked both from the
    # CLI: its engine process is the child with several threads, its workers the single-threaded ones.
    root = psutil.Process(system.proc.pid)
    engine, workers = system.proc.pid, []
    for p in root.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "edge_node.worker_process" in cmd:
                workers.append(p.pid)
            elif cmd == " ".join(root.cmdline()):
                if p.num_threads() > 1:
                    engine = p.pid
                else:
                    workers.append(p.pid)
        except psutil.Error:
            continue
    roles = {"engine": engine, **({"worker": min(workers)} if workers else {})}
    pyspy = shutil.which("py-spy") or "/tmp/site/bin/py-spy"
    # Per thread (the node process runs the slot batcher's threads beside its event loop), and for the
    # node process a second recording of only the samples that hold the GIL: which thread it limits.
    runs = [(role, pid, ["--threads"]) for role, pid in roles.items()] + [("engine-gil", engine, ["--threads", "--gil"])]
    procs = {role: subprocess.Popen([pyspy, "record", "-d", "4", "-r", "200", "--nonblocking", "-f", "raw", *flags,
                                     "-o", str(out / f"pyspy_{system.name}_{role}.txt"), "-p", str(pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for role, pid, flags in runs}
    wrk.run(system.url, system.kinds[0], args.conns, 5)
    top: dict[str, Any] = {}
    for role, p in procs.items():
        p.wait(30)
        path = out / f"pyspy_{system.name}_{role}.txt"
        counts: dict[str, int] = {}
        threads: dict[str, int] = {}
        total = 0
        if path.is_file():
            for line in path.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if not n.isdigit():
                    continue
                frames = stack.split(";")
                leaf = frames[-1]
                counts[leaf] = counts.get(leaf, 0) + int(n)
                thread = frames[0] if frames[0].startswith("thread") else "-"
                threads[thread] = threads.get(thread, 0) + int(n)
                total += int(n)
        top[role] = {"samples": total, "top": sorted(counts.items(), key=lambda kv: -kv[1])[:15],
                     "by_thread": sorted(threads.items(), key=lambda kv: -kv[1])[:12]}
    return top


# -- main -------------------------------------------------------------------------------------
def our_config(path: Path, model_dir: Path | None, port: int, workers: int, dataplane: str = "fast",
               backend: str = "torch-cuda", flavor: str = "now", data_dir: str = "/tmp/gz-data",
               **edge_extra: Any) -> Path:
    """The node's settings. ``flavor="before"``: the keys of the tree before issue 13's refactor (its
    fast front was ``dataplane: socket`` with ``workers`` > 0, its FastAPI port ``api_port``).
    ``model_dir=None``: the bundled model's files (the fake engine needs only its tokenizer)."""
    import yaml

    edge: dict[str, Any] = {"host": "127.0.0.1", "port": port, "workers": workers, "dataplane": dataplane,
                            "ring_slots_per_worker": 256, "admin_port": port + 1, **edge_extra}
    if flavor == "before":
        edge["api_port"] = port + 1
        edge["dataplane"] = {"fast": "socket", "asgi": "socket"}.get(dataplane, dataplane)
    sections: dict[str, dict[str, Any]] = {}  # "batcher.pipeline_depth" and the like: other sections' keys
    for key in [k for k in edge if "." in k]:
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = edge.pop(key)
    cfg: dict[str, Any] = {
        "log_level": "warning",
        "data_dir": data_dir,
        "engine": {"backend": backend, **({"model_dir": str(model_dir)} if model_dir is not None else {}),
                   "max_batch_size": 512, "max_seq_len": 256},
        "batcher": {"max_batch_size": 512, "max_wait_us": 50, "pipeline_depth": 2, "queue_capacity": 16384,
                    "max_batch_tokens": 65536, "max_queued_tokens": 16_000_000},
        "auth": {"enabled": False},
        "cache": {"enabled": False},  # repeated sentences must not be served from the cache
        "edge": edge,
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--wrk", type=Path, required=True)
    ap.add_argument("--model-src", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=256)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--systems", default="ceiling,edge-fast,edge-fast-before,edge-asgi,edge-gpu,ray-serve")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--saturation-only", action="store_true",
                    help="no paced runs or 2x overload (peers beside deployed_gpu_bench.py, to save device time)")
    ap.add_argument("--server-cores", default=CORES["server"], help="taskset list for the servers")
    ap.add_argument("--wrk-cores", default=CORES["wrk"], help="taskset list for wrk")
    ap.add_argument("--backend", default="torch-cuda", help="fake/onnx-cpu: dry runs of this script off the GPU")
    ap.add_argument("--before-tree", type=Path, help="a checkout of the commit before the refactor (edge-fast-before)")
    ap.add_argument("--kinds", default="single,batch32,long,inference", help="request kinds for edge-fast")
    ap.add_argument("--infinity-site", type=Path, default=Path("/tmp/inf"),
                    help="folder with Infinity 0.0.78 and its pinned dependencies (system infinity)")
    ap.add_argument("--gpu-variant", action="append", default=[],
                    help="NAME:KEY=VALUE,...: one more gpu-plane system (edge-gpu-NAME) with these edge.* settings "
                         "(SECTION.KEY=VALUE: another section's, e.g. batcher.pipeline_depth=1)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:KEY=VALUE,...: one more edge-fast system with these edge.* settings")
    args = ap.parse_args()
    CORES.update(server=args.server_cores, wrk=args.wrk_cores)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.systems.split(",")
    model_dir = prepare_model(args.model_src, Path("/tmp/gz-model")) if args.backend == "torch-cuda" else args.model_src
    results: dict[str, Any] = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": machine(), "systems": {}}

    def save() -> None:
        (out / "h100_bench.json").write_text(json.dumps(results, indent=1))

    py = sys.executable
    if "ceiling" in wanted:
        log("model-only ceiling (engine_bench torch-graphs)")
        subprocess.run([py, "benchmarks/engine_bench.py", "--backends", "torch-graphs", "--model-dir", str(model_dir),
                        "--seqs", "16,128", "--min-time", "0.2", "--json", str(out / "engine_bench.json")],
                       cwd=ROOT, check=False, timeout=300)
        try:
            results["ceiling"] = json.loads((out / "engine_bench.json").read_text())["results"]["torch-graphs"]
        except Exception as exc:
            results["ceiling_error"] = repr(exc)
        save()

    wrk = Wrk(args.wrk, out)
    cli = [py, "-c", "import sys; from gazsi_cli.main import main; sys.exit(main(sys.argv[1:]))"]
    systems = []
    if "edge-fast" in wanted:
        cfg = our_config(out / "cfg_fast.yaml", model_dir, 8100, args.workers, backend=args.backend)
        systems.append(System("edge-fast", [*cli, "--config", str(cfg), "edge", "serve"], "http://127.0.0.1:8100",
                              "http://127.0.0.1:8101/readyz", "http://127.0.0.1:8101/metrics",
                              args.kinds.split(",")))
    # Settings tried side by side in one lease: edge-fast-NAME with edge.KEY=VALUE overrides.
    for i, variant in enumerate(args.variant):
        name, _, sets = variant.partition(":")
        extra = {k: yaml_scalar(v) for k, _, v in (kv.partition("=") for kv in sets.split(",") if kv)}
        port = 8600 + 10 * i
        cfg = our_config(out / f"cfg_fast_{name}.yaml", model_dir, port, args.workers, backend=args.backend, **extra)
        systems.append(System(f"edge-fast-{name}", [*cli, "--config", str(cfg), "edge", "serve"],
                              f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}/readyz",
                              f"http://127.0.0.1:{port + 1}/metrics", args.kinds.split(",")))
    # Issue 13: the same fast front from the tree before the refactor, in the same lease.
    if "edge-fast-before" in wanted and args.before_tree:
        before = args.before_tree.resolve()
        cfg = our_config(out / "cfg_fast_before.yaml", model_dir, 8500, args.workers, backend=args.backend,
                         flavor="before")
        old_cli = [py, "-c", "import sys; from gazsi_cluster.cli.main import main; sys.exit(main(sys.argv[1:]))"]
        systems.append(System("edge-fast-before", [*old_cli, "--config", str(cfg), "edge", "serve"],
                              "http://127.0.0.1:8500", "http://127.0.0.1:8501/readyz", "http://127.0.0.1:8501/metrics",
                              args.kinds.split(","), env={"PYTHONPATH": f"{before}:{os.environ.get('PYTHONPATH', '')}"},
                              cwd=before))
    if "edge-asgi" in wanted:
        cfg = our_config(out / "cfg_asgi.yaml", model_dir, 8200, 0, dataplane="asgi", backend=args.backend)
        systems.append(System("edge-asgi", [*cli, "--config", str(cfg), "edge", "serve"], "http://127.0.0.1:8200",
                              "http://127.0.0.1:8200/readyz", "http://127.0.0.1:8200/metrics", ["single", "batch32"]))
    if "edge-gpu" in wanted:
        # The gpu plane serves /inference from the kernels (POST /v1/embeddings: CPU head parse, same
        # pipeline), in as many feed processes as the fast front has workers (edge.gpu_feed=workers), with the
        # batcher's default pipeline depth (1): 46,155 against 42,005 req/s at depth 2 (H100, 2026-12-07).
        cfg = our_config(out / "cfg_gpu.yaml", model_dir, 8300, args.workers, dataplane="gpu", backend=args.backend,
                         **_GPU_BATCHER)
        systems.append(System("edge-gpu", [*cli, "--config", str(cfg), "edge", "serve"], "http://127.0.0.1:8300",
                              "http://127.0.0.1:8301/readyz", "http://127.0.0.1:8301/metrics",
                              ["inference", "single"]))
    # Issue 15: gpu-plane settings side by side (edge.gpu_sync, feed count as workers=N), /inference only.
    for i, variant in enumerate(args.gpu_variant):
        name, _, sets = variant.partition(":")
        extra = {**_GPU_BATCHER, **{k: yaml_scalar(v) for k, _, v in (kv.partition("=") for kv in sets.split(",") if kv)}}
        feeds = int(extra.pop("workers", args.workers))
        port = 8800 + 10 * i
        cfg = our_config(out / f"cfg_gpu_{name}.yaml", model_dir, port, feeds, dataplane="gpu",
                         backend=args.backend, **extra)
        systems.append(System(f"edge-gpu-{name}", [*cli, "--config", str(cfg), "edge", "serve"],
                              f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}/readyz",
                              f"http://127.0.0.1:{port + 1}/metrics", ["inference"]))
    if "edge-gpu-node" in wanted:  # the plane in the node process alone (issue 15's 2,480 req/s)
        cfg = our_config(out / "cfg_gpu_node.yaml", model_dir, 8350, 0, dataplane="gpu", backend=args.backend,
                         gpu_feed="node")
        systems.append(System("edge-gpu-node", [*cli, "--config", str(cfg), "edge", "serve"],
                              "http://127.0.0.1:8350", "http://127.0.0.1:8351/readyz",
                              "http://127.0.0.1:8351/metrics", ["inference"]))
    if "infinity" in wanted:
        # Issue 14's peer: Infinity 0.0.78 (torch fp16, batch 128, its cache off by default) with the pinned
        # versions it needs in their own folder, first on its PYTHONPATH only (the image's numpy 2 and
        # transformers 5 break it); USE_JAX/FLAX/TF=0 keep transformers off the image's jaxlib.
        site = str(args.infinity_site.resolve())
        inf_cmd = [py, "-c", "import sys; from infinity_emb.cli import cli; sys.argv[0] = 'infinity_emb'; cli()",
                   "v2", "--model-id", str(model_dir), "--served-model-name", MODEL, "--batch-size", "128",
                   "--dtype", "float16", "--device", "cuda", "--engine", "torch", "--no-bettertransformer",
                   "--url-prefix", "/v1", "--host", "127.0.0.1", "--port", "8700"]
        systems.append(System("infinity", inf_cmd, "http://127.0.0.1:8700", "http://127.0.0.1:8700/health", None,
                              ["single", "batch32"], ready_s=240.0, paced=False,
                              env={"PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}", "USE_JAX": "0",
                                   "USE_FLAX": "0", "USE_TF": "0", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                                   "HF_HUB_OFFLINE": "1"}))
    if "ray-serve" in wanted:
        systems.append(System("ray-serve", [py, "benchmarks/_vanilla_serve_gpu.py", str(model_dir), "8400"],
                              "http://127.0.0.1:8400", "http://127.0.0.1:8400/healthz", "http://127.0.0.1:8400/stats",
                              ["single", "batch32", "long"], ready_s=240.0))
    for system in systems:
        system.paced = system.paced and not args.saturation_only
        log(f"== {system.name}")
        try:
            results["systems"][system.name] = bench_system(system, wrk, args, out)
        except Exception as exc:
            log(f"{system.name}: FAILED {exc!r}")
            results["systems"][system.name] = {"error": repr(exc)}
            system.stop()
        save()
    save()
    from benchmarks._h100_report import plot, table

    print(table(results))
    plot(results, out / "h100_latency.png")
    return 0


def yaml_scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    raise SystemExit(main())
