"""Case 2: serving throughput, latency and server CPU per request under 1..128 concurrent clients.

Two graphs (the VAE decoder of mnist-vae and the DCGAN generator of mnist-cgan), each request one image's inputs,
behind these servers, all up at once, each with a temporary repository holding the two models:
  * gen serve, batching on (the manifest's policy: max batch 64, max queue delay 2 ms);
  * gen serve --max-batch-size 1: batching off, one request per onnxruntime run;
  * gen serve --threads 1: one onnxruntime intra-op thread per session;
  * gen serve --workers 2 --threads 1 (two processes, one intra-op thread each), when this tree's
    `gen serve --help` lists --workers (else skipped, with a note);
  * gen before issue 25: the tree at OLD_REV in a temporary git worktree (removed at the end, also on error),
    started from that tree so that its own code is imported, batching on;
  * PyTriton 0.7.0: Triton's dynamic batcher (same max batch size and delay) in front of a Python function that
    runs each file with onnxruntime and the same session options.
Each is measured over gRPC and over REST (OIP v2 over HTTP, binary tensor data). The load comes from Triton's
perf_analyzer (bench/perf_analyzer.py) when it runs here, else from bench/loadgen.py; a (server, model) whose
requests perf_analyzer cannot build from the model's config (the old tree declares the generator's per-row label
with no dims) falls back to bench/loadgen.py, and the result says so. For each repeat, concurrency, model,
protocol and server in turn, one load run; the table keeps the medians of the repeats.

Server CPU per request: the CPU seconds (utime + stime, /proc/PID/stat) of the server process and all its
descendants (gen's workers, Triton and PyTriton's stubs) over one load run, divided by the requests the server
itself counted as successful over the same run (Triton's statistics extension, GET /v2/models/M/stats, which gen
serves too). Every wait on another process has a deadline that holds while it waits; when an optional server
cannot start or fails under load, the result says why in one line and the run goes on.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTRITON_PY = ROOT / "bench" / ".venv-pytriton" / "bin" / "python"
MODELS = (("mnist-vae", "decoder"), ("mnist-cgan", "generator"))
MODEL, GRAPH = "mnist-cgan", "generator"  # the graph the case measured alone before
CONCURRENCY = (1, 8, 32, 128)
WORKERS = "gen, 2 workers, one thread each"
PROTOCOLS = {"grpc": "gRPC", "http": "REST"}
OLD_REV = "060f875"  # the last commit before issue 25
OLD_LABEL = "gen before issue 25"
LOADGEN = "bench/loadgen.py"
OIP_TYPES = {"float32": "FP32", "int64": "INT64"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _specs(manifest: dict, batch_dim_for_vectors: bool, graph: str = GRAPH) -> list[dict]:
    """One request (batch 1) of the graph's inputs; PyTriton sends [B] inputs as [B, 1]."""
    specs = []
    for t in manifest["graphs"][graph]["inputs"]:
        shape = [1, *t["shape"][1:]]
        if batch_dim_for_vectors and len(shape) == 1:
            shape = [1, 1]
        specs.append({"name": t["name"], "datatype": OIP_TYPES[t["dtype"]], "shape": shape})
    return specs


def start_pytriton(onnx_path: Path, name: str, log=print, timeout: float = 120,
                   extra_models: tuple[tuple[Path, str], ...] = ()) -> tuple[subprocess.Popen | None, dict[str, str],
                                                                             str]:
    """(process, {"grpc": target, "http": target}, why it could not start in one line: "" when it did).
    extra_models: more (onnx file, model name) pairs served by the same Triton."""
    from serve.launch import wait_for_line

    if not PYTRITON_PY.exists():
        return None, {}, "bench/.venv-pytriton is missing (make bench creates it: nvidia-pytriton==0.7.0)"
    grpc_port, http_port = _free_port(), _free_port()
    models = [a for path, n in ((onnx_path, name), *extra_models) for a in ("--onnx", str(path), "--name", n)]
    cmd = [str(PYTRITON_PY), str(ROOT / "bench" / "pytriton_server.py"), *models,
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(_free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    line, seen = wait_for_line(proc, lambda text: text.strip() == "ready", timeout)
    if line is not None:
        return proc, {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}"}, ""
    exited = proc.poll()
    _kill(proc)
    errors = [s.strip() for s in seen if "rror" in s][-3:]
    last = errors or [s.strip() for s in seen[-3:] if s.strip()]
    why = f"exited with {exited}" if exited is not None else f"printed no 'ready' within {timeout:g} s"
    return None, {}, one_line(f"PyTriton did not start ({why}); its last output: " + (" | ".join(last) or "none"))


def one_line(text: str, limit: int = 600) -> str:
    return " ".join(text.split())[:limit]


def _kill(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process is gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _loadgen(target: str, model: str, specs: list[dict], concurrency: int, seconds: float, warmup: float,
             protocol: str) -> dict:
    """One load run; subprocess.run kills the load generator when it overruns its deadline."""
    try:
        out = subprocess.run([sys.executable, "-m", "bench.loadgen", "--target", target, "--model", model,
                              "--inputs", json.dumps(specs), "--concurrency", str(concurrency),
                              "--seconds", str(seconds), "--warmup", str(warmup), "--protocol", protocol],
                             capture_output=True, text=True, cwd=ROOT, timeout=seconds + warmup + 120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"loadgen did not finish within {seconds + warmup + 120:g} s") from None
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-1000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the server side: CPU of a process tree, the server's own request counters ---------------------------------

def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime + stime in seconds) of one process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... utime stime (fields 14, 15)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of the process `pid` and all its live descendants."""
    procs = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    children: dict[int, list[int]] = {}
    for child, (parent, _) in procs.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in procs:
            total += procs[p][1]
        todo += children.get(p, [])
    return total


def served_counts(http_target: str, model: str) -> tuple[int, int] | None:
    """(successful, failed) requests the server counted for `model` (Triton's statistics extension over REST,
    what tritonclient's get_inference_statistics reads); None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{http_target}/v2/models/{model}/stats", timeout=10) as r:
            stats = json.loads(r.read())
    except (OSError, ValueError):
        return None
    rows = [s.get("inference_stats", {}) for s in stats.get("model_stats", [])]
    return (sum(int(s.get("success", {}).get("count", 0)) for s in rows),
            sum(int(s.get("fail", {}).get("count", 0)) for s in rows))


@dataclass
class Server:
    label: str
    proc: subprocess.Popen
    targets: dict[str, str]  # protocol -> host:port
    names: dict[str, str]  # "model.graph" -> the name this server serves it under
    specs: dict[str, list[dict]]  # "model.graph" -> one request's tensors (bench/loadgen.py)
    loadgen_only: dict[str, str] = field(default_factory=dict)  # "model.graph" -> why perf_analyzer cannot drive it


def _gen_flags() -> str:
    try:
        return subprocess.run([sys.executable, "-m", "gen", "serve", "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return ""


def _start_old_tree(tmp: Path, repo: Path, log) -> tuple[Path | None, object, str]:
    """(worktree, running server, why not) for `gen serve` of the tree at OLD_REV, its own code imported."""
    from serve.launch import start_server

    tree = tmp / "old-tree"
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), OLD_REV],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return None, None, one_line(f"git worktree add {OLD_REV} failed: {out.stderr}")
    # python -m gen puts the working directory first on sys.path: the old tree's gen and serve are imported
    gen = ["bash", "-c", f'cd "{tree}" && exec "{sys.executable}" -m gen "$@"', "_"]
    try:
        handle = start_server(repo, "--device", "cpu", gen=gen)
    except RuntimeError as e:
        return tree, None, one_line(f"{OLD_LABEL} ({OLD_REV}) did not start: {e}")
    cwd = os.readlink(f"/proc/{handle.proc.pid}/cwd")
    if Path(cwd).resolve() != tree.resolve():
        from serve.launch import stop_server

        stop_server(handle, timeout=30)
        return tree, None, f"{OLD_LABEL}: the server ran in {cwd}, not in the old tree"
    log(f"  {OLD_LABEL}: {OLD_REV} in {tree}")
    return tree, handle, ""


def _measure(server: Server, key: str, protocol: str, concurrency: int, seconds: float, warmup: float,
             interval_ms: int, pa: bool, log) -> dict:
    """One load run against one server, with the server's CPU and request counts over it."""
    from bench import perf_analyzer

    target, name = server.targets[protocol], server.names[key]
    use_pa = pa and key not in server.loadgen_only
    if use_pa and warmup > 0:  # perf_analyzer has no warm-up of its own: a short run first, not counted
        perf_analyzer.run(target, name, protocol, concurrency, max(50, round(warmup * 1e3 / perf_analyzer.TRIALS)))
    while True:
        before, cpu0 = served_counts(server.targets["http"], name), tree_cpu_seconds(server.proc.pid)
        if use_pa:
            r = perf_analyzer.run(target, name, protocol, concurrency, interval_ms)
            if r["shape_error"]:  # this server's config for the model cannot be fed by perf_analyzer
                server.loadgen_only[key] = r["first_error"]
                log(f"  {server.label}, {key}: perf_analyzer cannot build its requests ({r['first_error']}); "
                    f"{LOADGEN} drives it instead")
                use_pa = False
                continue
        else:
            r = _loadgen(target, name, server.specs[key], concurrency, seconds, warmup, protocol)
            if not r["requests"]:  # its percentiles of no latencies are NaN
                r.update(p50_ms=None, p99_ms=None, first_error=r["first_error"] or
                         f"{LOADGEN}: no request finished within the {seconds:g} s measured")
        cpu, after = tree_cpu_seconds(server.proc.pid) - cpu0, served_counts(server.targets["http"], name)
        break
    r = {**r, "driver": "perf_analyzer" if use_pa else LOADGEN, "server_cpu_s": cpu}
    r["cpu_ms_per_request"], r["requests_counted_by"] = None, "none (the server's statistics did not answer)"
    if before is not None and after is not None:
        served, failed = after[0] - before[0], after[1] - before[1]
        r["served"] = served
        r["errors"] = max(r["errors"], failed)
        # counters that saw fewer requests than the client completed are not the whole server's (one worker's,
        # say): the client's count is then a lower bound of the requests, so CPU per request an upper bound
        client = r.get("requests") or 0
        done = max(served, client)
        r["requests_counted_by"] = "server" if served >= client else "client"
        if done and not r.get("first_error"):  # a failed run's CPU is not that of the requests it counted
            r["cpu_ms_per_request"] = 1e3 * cpu / done
    return r


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run(base: Path, repeats: int, seconds: float, warmup: float, log=print) -> dict:
    from bench import perf_analyzer
    from serve.launch import start_server, stop_server

    keys = [f"{m}.{g}" for m, g in MODELS]
    manifests = {f"{m}.{g}": json.loads((base / "exported" / m / "1" / "manifest.json").read_text())
                 for m, g in MODELS}
    try:
        driver, why_not_pa = perf_analyzer.probe(), ""
    except perf_analyzer.Unavailable as e:
        driver, why_not_pa = LOADGEN, str(e)
        log(f"  {why_not_pa}; {LOADGEN} drives the servers")
    pa = not why_not_pa
    interval_ms = max(50, round(seconds * 1e3 / perf_analyzer.TRIALS))
    log(f"  load: {driver}" + (f", {perf_analyzer.TRIALS} windows of {interval_ms} ms per point" if pa else ""))
    tmp = Path(tempfile.mkdtemp(prefix="gen-bench-serving-"))
    repo = tmp / "exported"
    for m, _ in MODELS:  # a repository holding only these models
        shutil.copytree(base / "exported" / m / "1", repo / m / "1")
    result = {"models": keys, "driver": driver, "driver_fallback": why_not_pa,
              "measurement_interval_ms": interval_ms if pa else None, "trials": perf_analyzer.TRIALS if pa else None,
              "max_trials": perf_analyzer.MAX_TRIALS if pa else None,
              "old_revision": OLD_REV, "pytriton_error": "", "skipped": {}, "loadgen_points": {}, "rows": []}
    servers: list[Server] = []
    handles, pytriton, old_tree = [], None, None
    gen_specs = {k: _specs(manifests[k], False, k.split(".", 1)[1]) for k in keys}

    def add_gen(label: str, handle) -> None:
        handles.append(handle)
        servers.append(Server(label, handle.proc, {"grpc": handle.target, "http": handle.http_target},
                              {k: k for k in keys}, gen_specs))

    try:
        add_gen("gen, batching on", start_server(repo, "--device", "cpu"))
        add_gen("gen, batching off", start_server(repo, "--device", "cpu", "--max-batch-size", "1"))
        add_gen("gen, one intra-op thread", start_server(repo, "--device", "cpu", "--threads", "1"))
        if "--workers" in _gen_flags():
            try:
                add_gen(WORKERS, start_server(repo, "--device", "cpu", "--workers", "2", "--threads", "1"))
            except RuntimeError as e:
                result["skipped"][WORKERS] = one_line(f"gen serve --workers 2 did not start: {e}")
        else:
            result["skipped"][WORKERS] = "this tree's `gen serve --help` lists no --workers"
        old_tree, old, why = _start_old_tree(tmp, repo, log)
        if old is not None:
            add_gen(OLD_LABEL, old)
        else:
            result["skipped"][OLD_LABEL] = why
        names = {k: k.replace("-", "_").replace(".", "_") for k in keys}  # Triton model names: mnist_vae_decoder
        files = [(repo / m / "1" / f"{g}.onnx", names[f"{m}.{g}"]) for m, g in MODELS]
        pytriton, targets, why = start_pytriton(*files[0], log, extra_models=tuple(files[1:]))
        if pytriton is not None:
            servers.append(Server("PyTriton", pytriton, targets, names,
                                  {k: _specs(manifests[k], True, k.split(".", 1)[1]) for k in keys}))
        else:
            result["pytriton_error"] = why
        for label, why in result["skipped"].items():
            log(f"  {label}: skipped ({why})")
        if result["pytriton_error"]:
            log(f"  {result['pytriton_error']}")

        samples: dict[tuple[str, str, str, int], list[dict]] = {}
        for rep in range(repeats):
            for c in CONCURRENCY:
                for key in keys:
                    for protocol in PROTOCOLS:
                        for server in list(servers):
                            try:
                                r = _measure(server, key, protocol, c, seconds, warmup, interval_ms, pa, log)
                            except RuntimeError as e:
                                if server.label != "PyTriton":
                                    raise
                                r = {"errors": 1, "first_error": one_line(str(e)), "throughput": 0.0}
                            if server.label == "PyTriton" and r["errors"] and server.proc.poll() is not None:
                                result["pytriton_error"] = one_line(
                                    f"PyTriton failed under load ({key}, {PROTOCOLS[protocol]}, {c} clients, exited "
                                    f"with {server.proc.returncode}): {r['first_error']}")
                                log(f"  {result['pytriton_error']}")
                                servers.remove(server)
                                continue
                            samples.setdefault((key, server.label, protocol, c), []).append(r)
                            cpu = r.get("cpu_ms_per_request")
                            log(f"  [{rep + 1}/{repeats}] {key:20s} {server.label:24s} {PROTOCOLS[protocol]:4s} "
                                f"{c:3d} clients: {r['throughput']:8.1f} req/s, p50 {_ms(r.get('p50_ms'))}, "
                                f"p99 {_ms(r.get('p99_ms'))}, errors {r['errors']}, server CPU "
                                f"{'-' if cpu is None else f'{cpu:.3f} ms'}/request"
                                + (f" [{r['driver']}]" if r.get("driver") not in (None, "perf_analyzer") else "")
                                + (f" ({r['first_error']})" if r.get("first_error") else ""))
        for (key, label, protocol, c), rs in samples.items():
            result["rows"].append({
                "model": key, "server": label, "protocol": PROTOCOLS[protocol], "concurrency": c, "repeats": len(rs),
                "throughput": statistics.median(r["throughput"] for r in rs),
                "p50_ms": _median([r.get("p50_ms") for r in rs]), "p99_ms": _median([r.get("p99_ms") for r in rs]),
                "cpu_ms_per_request": _median([r.get("cpu_ms_per_request") for r in rs]),
                "throughput_samples": [r["throughput"] for r in rs], "p99_samples": [r.get("p99_ms") for r in rs],
                "p50_samples": [r.get("p50_ms") for r in rs], "cpu_samples": [r.get("cpu_ms_per_request") for r in rs],
                "server_cpu_s": [r.get("server_cpu_s") for r in rs], "served": [r.get("served") for r in rs],
                "requests_counted_by": sorted({r.get("requests_counted_by", "") for r in rs}),
                "driver": "/".join(sorted({r.get("driver", "") for r in rs})),
                "errors": sum(r["errors"] for r in rs),
                "first_error": next((r["first_error"] for r in rs if r.get("first_error")), "")})
        for server in servers:
            for key, why in server.loadgen_only.items():
                result["loadgen_points"][f"{server.label} / {key}"] = one_line(why)
        if result["pytriton_error"]:  # a PyTriton that failed midway: its partial rows would mislead
            result["rows"] = [r for r in result["rows"] if r["server"] != "PyTriton"]
    finally:
        for h in handles:
            stop_server(h, timeout=30)
        if pytriton is not None:
            _kill(pytriton, grace=60)
        if old_tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
                           capture_output=True, check=False, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def main() -> None:
    """`python -m bench.serving [--repeats N] [--seconds S] [--warmup W]`: case 2 alone, on the shipped models of
    exported/; updates bench/results.json and BENCHMARKS.md (the other cases kept)."""
    import argparse
    import datetime

    from bench import plots, report
    from bench.timing import machine

    ap = argparse.ArgumentParser(prog="python -m bench.serving", description=main.__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured per point")
    ap.add_argument("--warmup", type=float, default=1.0, help="uncounted load before each point")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    result = run(ROOT, args.repeats, args.seconds, args.warmup, print)
    m = machine()
    result.update(seconds=args.seconds, warmup=args.warmup, repeats=args.repeats, started=started,
                  command=f"python -m bench.serving --repeats {args.repeats} --seconds {args.seconds:g} "
                          f"--warmup {args.warmup:g}",
                  load=[*load, *os.getloadavg()], cpu=m["cpu"], cores=m["cores"], commit=m["commit"])
    plots.serving(result["rows"], ROOT / "bench" / "plots" / "serving.png")
    report.update_case("serving", result)


if __name__ == "__main__":
    main()
