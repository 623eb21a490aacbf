"""The load generator of case 2: N concurrent tritonclient clients calling infer in a loop, over gRPC
(tritonclient.grpc.aio, ModelInfer) or REST (tritonclient.http.aio, binary tensor data).

Runs as its own process (tritonclient's `inference` protobuf descriptors cannot share an interpreter
with the server's), for a fixed time, against any OIP v2 / Triton server on 127.0.0.1:

    python -m bench.loadgen --target 127.0.0.1:P --model M --inputs JSON --concurrency 32 --seconds 10 [--protocol http]

--inputs: [{"name": "z", "datatype": "FP32", "shape": [1, 100]}, ...], one request's tensors.
Prints one JSON line: requests completed in the measured window, throughput (requests/s), p50/p99
latency (ms), errors. Requests finishing in the warm-up are not counted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np

from bench.timing import percentile

NP = {"FP32": np.float32, "INT64": np.int64}


async def _measure(target: str, model: str, specs: list[dict], concurrency: int, seconds: float,
                   warmup: float, protocol: str = "grpc") -> dict:
    if protocol == "http":
        import tritonclient.http.aio as grpcclient  # the same calls; one connection per client

        client = grpcclient.InferenceServerClient(target, conn_limit=concurrency)
    else:
        import tritonclient.grpc.aio as grpcclient

        client = grpcclient.InferenceServerClient(target)
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    errors: list[str] = []
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds

    def inputs():
        out = []
        for s in specs:
            x = grpcclient.InferInput(s["name"], s["shape"], s["datatype"])
            data = rng.standard_normal(s["shape"]) if s["datatype"] == "FP32" else rng.integers(0, 10, s["shape"])
            x.set_data_from_numpy(data.astype(NP[s["datatype"]]))
            out.append(x)
        return out

    timeout = {"client_timeout": 60} if protocol == "grpc" else {}  # http.aio: the session's default timeout

    async def worker():
        request = inputs()
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                await client.infer(model, request, **timeout)
            except Exception as e:  # noqa: BLE001 - counted and reported, the load goes on
                errors.append(str(e).splitlines()[0][:200])
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                latencies.append((t1 - t0) * 1e3)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return {"concurrency": concurrency, "requests": len(latencies), "throughput": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "errors": len(errors),
            "first_error": errors[0] if errors else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    args = ap.parse_args()
    if not args.target.startswith("127.0.0.1:"):
        raise SystemExit("--target: this load generator only talks to 127.0.0.1")
    result = asyncio.run(_measure(args.target, args.model, json.loads(args.inputs), args.concurrency,
                                  args.seconds, args.warmup, args.protocol))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
