"""Case 2: serving throughput and latency of one graph under 1..128 concurrent tritonclient clients.

Three servers hold the same ONNX file (the DCGAN generator of mnist-cgan) at once:
  * gen serve, batching on (the manifest's policy: max batch 64, max queue delay 2 ms);
  * gen serve --max-batch-size 1: batching off, one request per onnxruntime run;
  * PyTriton 0.7.0: Triton's dynamic batcher (same max batch size and delay) in front of a Python
    function that runs the file with onnxruntime and the same session options.
Each is measured over gRPC and over REST (OIP v2 over HTTP, binary tensor data). For each repeat,
concurrency and server in turn, bench/loadgen.py runs in its own process for a fixed time; the table
keeps the median of the repeats. Every wait on another process has a deadline that holds while it
waits; when PyTriton cannot start or fails under load, the result says why in one line and the run goes on.
"""
from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTRITON_PY = ROOT / "bench" / ".venv-pytriton" / "bin" / "python"
MODEL, GRAPH = "mnist-cgan", "generator"
CONCURRENCY = (1, 8, 32, 128)
OIP_TYPES = {"float32": "FP32", "int64": "INT64"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _specs(manifest: dict, batch_dim_for_vectors: bool) -> list[dict]:
    """One request (batch 1) of the graph's inputs; PyTriton sends [B] inputs as [B, 1]."""
    specs = []
    for t in manifest["graphs"][GRAPH]["inputs"]:
        shape = [1, *t["shape"][1:]]
        if batch_dim_for_vectors and len(shape) == 1:
            shape = [1, 1]
        specs.append({"name": t["name"], "datatype": OIP_TYPES[t["dtype"]], "shape": shape})
    return specs


def start_pytriton(onnx_path: Path, name: str, log=print, timeout: float = 120) -> tuple[subprocess.Popen | None,
                                                                                        dict[str, str], str]:
    """(process, {"grpc": target, "http": target}, why it could not start in one line: "" when it did)."""
    from serve.launch import wait_for_line

    if not PYTRITON_PY.exists():
        return None, {}, "bench/.venv-pytriton is missing (make bench creates it: nvidia-pytriton==0.7.0)"
    grpc_port, http_port = _free_port(), _free_port()
    cmd = [str(PYTRITON_PY), str(ROOT / "bench" / "pytriton_server.py"), "--onnx", str(onnx_path), "--name", name,
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


def run(base: Path, repeats: int, seconds: float, warmup: float, log=print) -> dict:
    from serve.launch import start_server, stop_server

    src = base / "exported" / MODEL / "1"
    manifest = json.loads((src / "manifest.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="gen-bench-serving-"))
    repo = tmp / "exported"
    shutil.copytree(src, repo / MODEL / "1")  # a repository holding only this model
    servers: dict[str, tuple[str, str, list[dict], str]] = {}  # label -> (target, model, request specs, protocol)
    handles = []
    result = {"model": f"{MODEL}.{GRAPH}", "pytriton_error": "", "rows": []}
    proc = None
    try:
        on = start_server(repo, "--device", "cpu")
        handles.append(on)
        off = start_server(repo, "--device", "cpu", "--max-batch-size", "1")
        handles.append(off)
        for protocol, suffix in (("grpc", ""), ("http", " (REST)")):
            for label, h in (("gen, batching on", on), ("gen, batching off", off)):
                servers[label + suffix] = (h.target if protocol == "grpc" else h.http_target, f"{MODEL}.{GRAPH}",
                                           _specs(manifest, False), protocol)
        proc, targets, why = start_pytriton(src / f"{GRAPH}.onnx", "generator", log)
        if proc is not None:
            servers["PyTriton"] = (targets["grpc"], "generator", _specs(manifest, True), "grpc")
            servers["PyTriton (REST)"] = (targets["http"], "generator", _specs(manifest, True), "http")
        else:
            result["pytriton_error"] = why
            log(f"  {why}")
        samples: dict[tuple[str, int], list[dict]] = {}
        for rep in range(repeats):
            for c in CONCURRENCY:
                for label, (target, model, specs, protocol) in list(servers.items()):
                    try:
                        r = _loadgen(target, model, specs, c, seconds, warmup, protocol)
                    except RuntimeError as e:
                        if not label.startswith("PyTriton"):
                            raise
                        result["pytriton_error"] = one_line(f"PyTriton failed under load ({label}, {c} clients): {e}")
                        log(f"  {result['pytriton_error']}")
                        for name in [k for k in servers if k.startswith("PyTriton")]:
                            del servers[name]
                        continue
                    samples.setdefault((label, c), []).append(r)
                    log(f"  [{rep + 1}/{repeats}] {label:24s} {c:3d} clients: {r['throughput']:8.1f} req/s, "
                        f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}")
        for (label, c), rs in samples.items():
            result["rows"].append({
                "server": label, "concurrency": c, "repeats": len(rs),
                "throughput": statistics.median(r["throughput"] for r in rs),
                "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                "throughput_samples": [r["throughput"] for r in rs], "p99_samples": [r["p99_ms"] for r in rs],
                "p50_samples": [r["p50_ms"] for r in rs],
                "errors": sum(r["errors"] for r in rs), "first_error": next((r["first_error"] for r in rs
                                                                             if r["first_error"]), "")})
        if result["pytriton_error"]:  # a PyTriton that failed midway: its partial rows would mislead
            result["rows"] = [r for r in result["rows"] if not r["server"].startswith("PyTriton")]
    finally:
        for h in handles:
            stop_server(h, timeout=30)
        if proc is not None:
            _kill(proc, grace=60)
        shutil.rmtree(tmp, ignore_errors=True)
    return result
