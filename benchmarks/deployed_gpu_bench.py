"""What users deploy, measured like the standalone node (issue 14): ``gazsi up --profile gpu``.

Same model (random-weight MiniLM fp16, prepared as in ``h100_bench.py``), same wrk load (4 threads
on the last 4 cores, the cluster pinned to the others), cache off, auth off (as the standalone runs
of ``h100_bench.py``), inputs that do not repeat within a body set of 64:

    python3 benchmarks/deployed_gpu_bench.py --out $OUT --wrk .carry/perf/wrk --model-src .carry/perf/model

Paths: the edge URL that ``GET /v1/route`` names (the CDN path), the gateway's direct listener
(:8080) and Ray Serve's proxy (:8000). Single-input at c=256 (``--conns``), 32-input at c=64 on the edge, and
p50 at ~10 % of the edge's own saturation. ``--standalone`` first runs ``gazsi edge serve`` with the
settings an Edge replica of that profile gets (the profile's defaults, the Serve config's Edge
``user_config``, the worker count its ``num_cpus`` gives) under the same load, so the deployed edge is
compared with a standalone node inside one run (machine starts differ by ~25 %).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.h100_bench import CORES, Wrk, paced, prepare_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def gateway_views(n: int = 8) -> list[Any]:
    """What the gateway replicas behind :8080 say on ``/readyz`` (a new connection each: SO_REUSEPORT spreads
    them): the edges in each replica's table and the ones it routes over. Taken before the gateway run, so a
    run's 503s can be told apart: an empty table (NoHealthyNode, no send at all) or failed sends to the edge."""
    views: list[Any] = []
    for _ in range(n):
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=5) as resp:
                views.append(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            views.append({"status": exc.code, "body": exc.read()[:300].decode(errors="replace")})
        except Exception as exc:
            views.append({"error": repr(exc)})
    return views


class TableWatch:
    """What the gateway replicas' ``/readyz`` say every 0.25 s while the edge is loaded: does a saturated edge
    drop out of the routing table (its heartbeats late), and for how long."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TableWatch:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                view = get_json("http://127.0.0.1:8080/readyz")
            except urllib.error.HTTPError as exc:  # 503 when not ready: its body still says why
                view = json.loads(exc.read() or b"{}")
            except Exception as exc:
                view = {"error": repr(exc)}
            keep = {k: view.get(k) for k in ("edges", "routable_edges", "table_version", "ready", "error") if k in view}
            self.samples.append((round(time.monotonic() - self._t0, 2), keep))

    def summary(self) -> dict[str, Any]:
        # ``edges``: the control plane's current table; ``routable_edges`` also counts the last non-empty one.
        out = [s for s in self.samples if not s[1].get("edges")]
        return {"samples": len(self.samples), "no_edge_in_table": len(out), "first_out": out[:5],
                "versions": sorted({str(s[1].get("table_version")) for s in self.samples})}


def cpu_by_command() -> dict[int, tuple[str, float]]:
    """Every process's CPU seconds so far, with a short name: who else used the cores during a run."""
    import psutil

    seen: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        try:
            t = p.info["cpu_times"]
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])
            seen[p.info["pid"]] = (cmd[:90], t.user + t.system)
        except Exception:
            continue
    return seen


def cpu_top(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], secs: float,
            n: int = 14) -> list[tuple[str, float]]:
    """Cores used per process over ``secs`` (top ``n``), from two :func:`cpu_by_command` snapshots."""
    used = [(cmd, (t - before.get(pid, (cmd, 0.0))[1]) / secs) for pid, (cmd, t) in after.items()]
    return [(cmd, round(c, 3)) for cmd, c in sorted(used, key=lambda x: -x[1])[:n] if c > 0.005]


class NodeThreads:
    """The node process's threads over a run (CPU seconds each), its CPU affinity and a few environment
    variables: why a node inside a Serve replica uses fewer cores than the same node standalone."""

    def __init__(self, match: str | int) -> None:
        import psutil

        self.proc: Any = None
        if isinstance(match, int):
            self.proc = psutil.Process(match)
        else:
            for p in psutil.process_iter(["cmdline"]):
                if match in " ".join(p.info["cmdline"] or []):
                    self.proc = p
                    break

    def __enter__(self) -> NodeThreads:
        self.t0 = time.monotonic()
        self.before = self._threads()
        self.dumps: list[str] = []
        # py-spy stacks of every thread at 2 s and 3.5 s into the run: what the node process is doing.
        self._dumper = threading.Thread(target=self._dump, daemon=True)
        self._dumper.start()
        return self

    def _dump(self) -> None:
        import shutil

        pyspy = shutil.which("py-spy") or "/tmp/site/bin/py-spy"
        for at in (2.0, 3.5):
            time.sleep(max(0.0, self.t0 + at - time.monotonic()))
            if self.proc is None or not Path(pyspy).exists():
                return
            run = subprocess.run([pyspy, "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True,
                                 timeout=20, check=False)
            self.dumps.append(run.stdout[-6000:] + run.stderr[-500:])

    def __exit__(self, *exc: object) -> None:
        self.after = self._threads()
        self.secs = time.monotonic() - self.t0
        self._dumper.join(30)

    def _threads(self) -> dict[int, float]:
        try:
            return {t.id: t.user_time + t.system_time for t in self.proc.threads()} if self.proc else {}
        except Exception:
            return {}

    def summary(self) -> dict[str, Any]:
        if self.proc is None:
            return {"error": "node process not found"}
        busy = sorted(((self.after[k] - self.before.get(k, 0.0)) / self.secs for k in self.after), reverse=True)
        out: dict[str, Any] = {"pid": self.proc.pid, "threads": len(self.after),
                               "busiest_thread_cores": [round(c, 3) for c in busy[:6]], "pyspy": self.dumps}
        try:
            out["affinity"] = len(os.sched_getaffinity(self.proc.pid))
            env = Path(f"/proc/{self.proc.pid}/environ").read_bytes().decode(errors="replace").split("\0")
            out["env"] = {k: v for k, _, v in (e.partition("=") for e in env)
                          if k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")}
        except Exception as exc:
            out["env_error"] = repr(exc)
        return out


def engine_detail(admin: str) -> Any:
    """The node's engine and batcher as its ``/readyz`` says (graph replays vs eager calls, live batch rules)."""
    try:
        detail = get_json(f"{admin}/readyz")
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}")
    except Exception as exc:
        return {"error": repr(exc)}
    log(f"engine at {admin}: {json.dumps(detail)[:600]}")
    return detail


def gazsi(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = ["taskset", "-c", CORES["server"], sys.executable, "-c",
           "import sys; from gazsi_cli.main import main; sys.exit(main(sys.argv[1:]))", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def _ok(r: dict[str, Any]) -> dict[str, Any]:
    """wrk counts every answer as a request: ``ok_rps`` counts the 2xx ones (a 429 storm is not throughput)."""
    r["ok_rps"] = (r["requests"] - r["errors"]) / (r["duration_us"] / 1e6) if r.get("duration_us") else 0.0
    return r


def replica_equivalent(profile: str, env: dict[str, str], path: Path, port: int) -> tuple[Path, int]:
    """A config file for ``gazsi edge serve`` with what an Edge replica of ``profile`` runs, and its workers."""
    import yaml

    from deployments._settings import apply_user_config, replica_settings

    serve_cfg = yaml.safe_load((ROOT / "deployments" / f"{profile}.yaml").read_text())
    edge = next(d for a in serve_cfg["applications"] for d in a.get("deployments", []) if d["name"] == "Edge")
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("GAZSI_")})
    try:
        settings = apply_user_config(replica_settings(profile), edge.get("user_config") or {})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    # As deployments/edge.py sizes the fast front: the replica's CPUs less 2, at least 1.
    workers = settings.edge.workers or max(1, int(float(edge.get("ray_actor_options", {}).get("num_cpus", 1))) - 2)
    dump = settings.model_dump(mode="json")
    dump["edge"].update(host="127.0.0.1", port=port, admin_port=port + 1, workers=workers)
    path.write_text(yaml.safe_dump(dump))
    return path, workers


def run_standalone(args: argparse.Namespace, env: dict[str, str], out: Path, wrk: Wrk) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cfg, workers = replica_equivalent(args.profile, env, out / "standalone.yaml", 8300)
    log(f"standalone gazsi edge serve ({workers} workers, the {args.profile} Edge replica's settings)")
    logf = (out / "standalone.log").open("wb")
    cmd = ["taskset", "-c", CORES["server"], sys.executable, "-c",
           "import sys; from gazsi_cli.main import main; sys.exit(main(sys.argv[1:]))",
           "--config", str(cfg), "edge", "serve"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    res: dict[str, Any] = {"workers": workers}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gazsi edge serve exited with {proc.returncode}")
            try:
                if get_json("http://127.0.0.1:8301/readyz").get("ready"):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        url = "http://127.0.0.1:8300"
        res["single"] = r = _ok(wrk.run(url, "single", args.conns, args.duration))
        log(f"standalone single c={args.conns}: {r['rps']:,.0f} req/s ({r['ok_rps']:,.0f} 2xx/s) "
            f"p50 {r['p50'] / 1000:.2f} ms errors {r['errors']}")
        with NodeThreads(proc.pid) as threads:  # the CLI process is the node process
            res["batch32_c64"] = r = _ok(wrk.run(url, "batch32", 64, args.duration))
        r["node_threads"] = threads.summary()
        log(f"standalone node process during batch32: { {k: v for k, v in r['node_threads'].items() if k != 'pyspy'} }")
        res["engine"] = engine_detail("http://127.0.0.1:8301")
        log(f"standalone batch32 c=64: {r['ok_rps'] * 32:,.0f} seq/s in 2xx answers, errors {r['errors']}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--wrk", type=Path, required=True)
    ap.add_argument("--model-src", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--backend", default="torch-cuda", help="onnx-cpu with --profile cpu: a dry run off the GPU")
    ap.add_argument("--server-cores", default=CORES["server"], help="taskset list for the cluster")
    ap.add_argument("--wrk-cores", default=CORES["wrk"], help="taskset list for wrk")
    ap.add_argument("--conns", type=int, default=256, help="connections of the single-input runs")
    ap.add_argument("--standalone", action="store_true", help="first the same edge standalone (gazsi edge serve)")
    ap.add_argument("--standalone-after", action="store_true",
                    help="the standalone node once more after `gazsi down`: the ratio is then also taken against "
                         "the mean of both, so a machine whose speed drifts during the run (a shared 2-core one) "
                         "does not decide it")
    ap.add_argument("--peers", default="",
                    help="after `gazsi down`, h100_bench.py systems under the same load (saturation only), e.g. "
                    "ceiling,ray-serve,infinity: the model-only ceiling and the peers in the same run")
    ap.add_argument("--infinity-site", type=Path, default=Path("/tmp/inf"), help="for the infinity peer")
    args = ap.parse_args()
    CORES.update(server=args.server_cores, wrk=args.wrk_cores)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args.model_src, Path("/tmp/gz-model")) if args.backend == "torch-cuda" else args.model_src
    home = Path(tempfile.mkdtemp(prefix="gz-deployed-home-"))
    env = {**os.environ, "HOME": str(home), "GAZSI_DATA_DIR": str(home / "data"),
           "GAZSI_ENGINE__BACKEND": args.backend, "GAZSI_ENGINE__MODEL_DIR": str(model_dir),
           "GAZSI_AUTH__ENABLED": "false", "GAZSI_CACHE__ENABLED": "false", "GAZSI_LOG_LEVEL": "warning",
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    results: dict[str, Any] = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "cache": "off", "auth": "off", "paths": {}}

    def save() -> None:
        (out / "deployed_gpu_bench.json").write_text(json.dumps(results, indent=1))

    if args.standalone:
        try:
            results["standalone"] = run_standalone(args, env, out, Wrk(args.wrk, out))
        except Exception as exc:
            results["standalone"] = {"error": repr(exc)}
        save()
    t0 = time.perf_counter()
    up = gazsi(["up", "--profile", args.profile, "--timeout", "420"], env, timeout=480)
    results["up_s"] = round(time.perf_counter() - t0, 1)
    (out / "gazsi_up.log").write_text(up.stdout + "\n--- stderr\n" + up.stderr)
    log(f"gazsi up rc={up.returncode} in {results['up_s']} s")
    try:
        if up.returncode != 0:
            results["error"] = f"gazsi up failed: {up.stderr[-2000:]}"
            return 1
        route = get_json("http://127.0.0.1:8080/v1/route")
        results["route"] = route
        edge = str(route["url"]).rstrip("/")
        log(f"/v1/route names {edge}")
        wrk = Wrk(args.wrk, out)
        paths = {"edge (/v1/route)": edge, "gateway direct :8080": "http://127.0.0.1:8080",
                 "serve proxy :8000": "http://127.0.0.1:8000"}
        for name, url in paths.items():
            if name.startswith("gateway"):
                results.setdefault("gateway_readyz_before", gateway_views())
                log(f"gateway /readyz before its run: {results['gateway_readyz_before']}")
            # Status codes counted on the gateway paths (their rates leave wrk room to parse replies).
            cpu0, t0 = cpu_by_command(), time.monotonic()
            with TableWatch() as watch:
                r = _ok(wrk.run(url, "single", args.conns, args.duration, statuses=not name.startswith("edge")))
            r["cpu_cores_top"] = cpu_top(cpu0, cpu_by_command(), time.monotonic() - t0)
            r["table_watch"] = watch.summary()
            log(f"{name:22s} gateway table while loaded: {r['table_watch']}")
            results["paths"].setdefault(name, {})["single"] = r
            log(f"{name:22s} single c={args.conns}: {r['rps']:,.0f} req/s ({r['ok_rps']:,.0f} 2xx/s) "
                f"p50 {r['p50'] / 1000:.2f} ms errors {r['errors']} statuses {r.get('statuses')}")
            if r["errors"]:  # wrk counts non-2xx without saying which: once more, counting status codes
                mix = wrk.run(url, "single", args.conns, 3, statuses=True)
                # Kept apart from the run above: they are another run's answers (2026-12-06 stored them as its).
                r["rerun"] = {"statuses": mix.get("statuses"), "duration_us": mix.get("duration_us")}
                log(f"{name:22s} status codes in a 3 s rerun: {mix.get('statuses')} "
                    f"in {mix.get('duration_us', 0) / 1e6:.2f} s")
            save()
        cpu0, t0 = cpu_by_command(), time.monotonic()
        with TableWatch() as watch, NodeThreads("ServeReplica:gazsi:Edge") as threads:
            r = _ok(wrk.run(edge, "batch32", 64, args.duration))
        r["node_threads"] = threads.summary()
        log(f"Edge replica (node process) during batch32: { {k: v for k, v in r['node_threads'].items() if k != 'pyspy'} }")
        host, _, port = edge.rpartition(":")
        r["engine"] = engine_detail(f"{host}:{int(port) + 1}")  # the replica's operator app: the next port
        r["cpu_cores_top"] = cpu_top(cpu0, cpu_by_command(), time.monotonic() - t0)
        r["table_watch"] = watch.summary()
        log(f"edge batch32: cores by process {r['cpu_cores_top'][:8]}")
        results["paths"]["edge (/v1/route)"]["batch32_c64"] = r
        log(f"edge batch32 c=64: {r['ok_rps'] * 32:,.0f} seq/s in 2xx answers, p50 {r['p50'] / 1000:.2f} ms "
            f"errors {r['errors']}")
        sat = results["paths"]["edge (/v1/route)"]["single"]["ok_rps"]
        conns, delay = paced(0.1 * sat)
        r = wrk.run(edge, "single", conns, args.duration, delay)
        results["paths"]["edge (/v1/route)"]["paced_10pct"] = r
        log(f"edge paced ~10 %: {r['rps']:,.0f} req/s p50 {r['p50'] / 1000:.2f} ms")
        standalone_ratios(results)
        status = gazsi(["status"], env, timeout=60)
        (out / "gazsi_status.log").write_text(status.stdout + status.stderr)
        save()
        return 0
    finally:
        t1 = time.perf_counter()
        down = gazsi(["down"], env, timeout=120)
        results["down_s"] = round(time.perf_counter() - t1, 1)
        (out / "gazsi_down.log").write_text(down.stdout + "\n--- stderr\n" + down.stderr)
        log(f"gazsi down rc={down.returncode} in {results['down_s']} s")
        save()
        if args.standalone_after:
            try:
                results["standalone_after"] = run_standalone(args, env, out / "after", Wrk(args.wrk, out))
            except Exception as exc:
                results["standalone_after"] = {"error": repr(exc)}
            standalone_ratios(results)
            save()
        if args.peers:
            run_peers(args, out, results)
            save()


def standalone_ratios(results: dict[str, Any]) -> None:
    """The deployed edge against the standalone node before it, after it (``--standalone-after``), and their
    mean (single-input and 32-input, 2xx answers); taken once the deployed runs are in, again after the second
    standalone run."""
    edge = results["paths"].get("edge (/v1/route)", {})
    ratios: dict[str, float] = {}
    for kind in ("single", "batch32_c64"):
        runs = [results.get(k, {}).get(kind, {}).get("ok_rps") for k in ("standalone", "standalone_after")]
        deployed = edge.get(kind, {}).get("ok_rps")
        if not deployed:
            continue
        for label, rate in zip(("before", "after"), runs, strict=True):
            if rate:
                ratios[f"{kind}_vs_{label}"] = deployed / rate
        if all(runs):
            ratios[f"{kind}_vs_mean"] = deployed / (sum(runs) / 2)
    results["edge_vs_standalone_runs"] = {k: round(v, 3) for k, v in ratios.items()}
    if "single_vs_before" in ratios:  # the key of the runs before --standalone-after
        results["edge_vs_standalone"] = results["edge_vs_standalone_runs"]["single_vs_before"]
    log(f"deployed edge / standalone (2xx answers): {results['edge_vs_standalone_runs']}")


def run_peers(args: argparse.Namespace, out: Path, results: dict[str, Any]) -> None:
    """The ceiling and the peers (vanilla Ray Serve, Infinity) by h100_bench.py, and the ratios issue 14 asks."""
    cmd = [sys.executable, str(ROOT / "benchmarks/h100_bench.py"), "--out", str(out / "peers"), "--wrk", str(args.wrk),
           "--model-src", str(args.model_src), "--systems", args.peers, "--saturation-only", "--conns",
           str(args.conns), "--duration", str(args.duration), "--infinity-site", str(args.infinity_site),
           "--server-cores", CORES["server"], "--wrk-cores", CORES["wrk"], "--backend", args.backend]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=1200)
    (out / "peers.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    try:
        peers = json.loads((out / "peers" / "h100_bench.json").read_text())
    except (OSError, ValueError) as exc:
        results["peers"] = {"error": repr(exc), "rc": proc.returncode}
        return
    results["peers"] = {"ceiling": peers.get("ceiling"), "systems": peers.get("systems")}
    edge = results["paths"].get("edge (/v1/route)", {})
    ratios: dict[str, float] = {}
    batch512 = [r["seq_per_s"] for r in peers.get("ceiling") or [] if r.get("seq") == 16 and r.get("batch") == 512]
    if batch512 and "batch32_c64" in edge:
        ratios["edge_batch32_vs_ceiling512"] = edge["batch32_c64"]["ok_rps"] * 32 / batch512[0]
    for name, system in (peers.get("systems") or {}).items():
        single = (system.get("saturation") or {}).get("single") or {}
        if single.get("ok_rps") and "single" in edge:
            ratios[f"edge_single_vs_{name}"] = edge["single"]["ok_rps"] / single["ok_rps"]
        batch = (system.get("saturation") or {}).get("batch32") or {}
        if batch.get("ok_rps") and "batch32_c64" in edge:
            ratios[f"edge_batch32_vs_{name}"] = edge["batch32_c64"]["ok_rps"] / batch["ok_rps"]
    results["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    log(f"ratios: {results['ratios']}")


if __name__ == "__main__":
    raise SystemExit(main())
