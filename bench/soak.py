"""A soak run: 64 concurrent clients against a real `gen serve` for 60 s, mixed workload.

    .venv/bin/python -m bench.soak [--clients 64] [--seconds 60] [--warmup 10]

Builds tiny models of every family (as bench/fuzz.py does), starts `gen serve` on 127.0.0.1, and runs
--clients clients in one process, each looping over Sample (gan, vae), Translate (pix2pix, cyclegan) and
Generate (diffusion; one in three cancelled by the client after two events) over gRPC, and OIP v2 infer
over REST (the gan and vae graphs, JSON or binary tensor data, through aiohttp). Counts
every status; anything but OK and the client's own cancellations is unexpected. The server's resident
memory (VmRSS from /proc/PID/status) is read after the warm-up and at the end: growth must stay
under 10%. Prints a Markdown summary; exit status 1 on an unexpected error or too much growth.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fuzz import build_tiny_repo, rss_kb  # noqa: E402


def _rest_infer(rng: random.Random, i: int) -> tuple[str, bytes, dict]:
    """(path, body, headers) of one REST infer request on a tiny generator or decoder."""
    import json

    import numpy as np

    from tests.serve.strategies import LATENT

    name = rng.choice(sorted(LATENT))
    n = rng.randint(1, 4)
    z = np.random.default_rng(i).standard_normal((n, LATENT[name])).astype("<f4")
    labels = [rng.randint(0, 9) for _ in range(n)]
    if rng.random() < 0.5:  # JSON data
        body = {"inputs": [{"name": "z", "shape": [n, LATENT[name]], "datatype": "FP32", "data": z.ravel().tolist()},
                           {"name": "label", "shape": [n], "datatype": "INT64", "data": labels}]}
        return f"/v2/models/{name}/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    header = json.dumps({"inputs": [
        {"name": "z", "shape": [n, LATENT[name]], "datatype": "FP32", "parameters": {"binary_data_size": z.nbytes}},
        {"name": "label", "shape": [n], "datatype": "INT64", "parameters": {"binary_data_size": 8 * n}}],
        "parameters": {"binary_data_output": True}}).encode()
    body = header + z.tobytes() + np.array(labels, "<i8").tobytes()
    return f"/v2/models/{name}/infer", body, {"Inference-Header-Content-Length": str(len(header))}


async def client(i: int, target: str, http_target: str, stop_at: float, counts: collections.Counter,
                 errors: list) -> None:
    import aiohttp
    import grpc

    from protos import generator_pb2 as pb
    from protos import generator_pb2_grpc as pb_grpc
    from tests.serve.strategies import GOOD_IMAGES

    rng = random.Random(i)
    timeout = aiohttp.ClientTimeout(total=60)
    async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession(timeout=timeout) as http:
        stub = pb_grpc.GeneratorStub(channel)
        while time.monotonic() < stop_at:
            kind = rng.choices(["sample", "translate", "generate", "REST infer"], [0.25, 0.25, 0.25, 0.25])[0]
            try:
                if kind == "REST infer":
                    path, body, headers = _rest_infer(rng, i)
                    async with http.post(f"http://{http_target}{path}", data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            counts[f"{kind}: HTTP {resp.status}"] += 1
                            errors.append(f"{kind}: HTTP {resp.status}: {(await resp.text())[:200]}")
                            continue
                elif kind == "sample":
                    model = rng.choice(["tiny-gan", "tiny-vae"])
                    await stub.Sample(pb.SampleRequest(model=model, n=rng.randint(1, 4), seed=i), timeout=60)
                elif kind == "translate":
                    model = rng.choice(["tiny-pix2pix", "tiny-cyclegan"])
                    await stub.Translate(pb.TranslateRequest(model=model, images=[GOOD_IMAGES[0]] * rng.randint(1, 2)),
                                         timeout=60)
                else:
                    cancel = rng.random() < 1 / 3
                    call = stub.Generate(pb.GenerateRequest(model="tiny-diffusion", n=rng.randint(1, 2), seed=i,
                                                            steps=rng.randint(5, 20), labels=[i % 10]), timeout=120)
                    seen = 0
                    async for _ in call:
                        seen += 1
                        if cancel and seen == 2:
                            call.cancel()
                            break
                    if cancel:
                        kind = "generate (cancelled by the client)"
                counts[f"{kind}: OK"] += 1
            except grpc.aio.AioRpcError as e:
                counts[f"{kind}: {e.code().name}"] += 1
                errors.append(f"{kind}: {e.code().name}: {e.details()}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                counts[f"{kind}: {type(e).__name__}"] += 1
                errors.append(f"{kind}: {type(e).__name__}: {e}")


async def run(target: str, http_target: str, clients: int, seconds: float, counts, errors) -> None:
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(client(i, target, http_target, stop_at, counts, errors) for i in range(clients)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--repo", help="an exported repository of tiny-<family> models to reuse (default: build one)")
    args = parser.parse_args(argv)

    from serve.launch import start_server, stop_server

    with tempfile.TemporaryDirectory(prefix="gen-soak-") as tmp:
        repo = Path(args.repo) if args.repo else build_tiny_repo(Path(tmp), log=lambda m: print(m, file=sys.stderr))
        server = start_server(repo)
        pid = server.proc.pid
        rss_start = rss_kb(pid)
        asyncio.run(run(server.target, server.http_target, args.clients, args.warmup, collections.Counter(), []))
        rss_before = rss_kb(pid)
        counts: collections.Counter = collections.Counter()
        errors: list[str] = []
        t0 = time.monotonic()
        asyncio.run(run(server.target, server.http_target, args.clients, args.seconds, counts, errors))
        elapsed = time.monotonic() - t0
        alive = server.proc.poll() is None
        rss_after = rss_kb(pid) if alive else 0
        code = stop_server(server)

    total = sum(counts.values())
    growth = (rss_after - rss_before) / rss_before * 100 if rss_before else float("inf")
    print(f"## Soak run: `python -m bench.soak --clients {args.clients} --seconds {args.seconds:g} "
          f"--warmup {args.warmup:g}`\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU (device cpu), "
          f"Python {platform.python_version()}")
    print(f"- {args.clients} concurrent clients for {elapsed:.1f} s after a {args.warmup:g} s warm-up: "
          f"{total} requests ({total / elapsed:.1f}/s)")
    print("- statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"- unexpected errors: {len(errors)}")
    print(f"- server resident memory (VmRSS): {rss_start / 1024:.0f} MiB at start, {rss_before / 1024:.0f} MiB "
          f"after warm-up, {rss_after / 1024:.0f} MiB at the end: growth {growth:+.1f}% (limit +10%)")
    print(f"- server exit status on SIGTERM: {code}")
    for line in errors[:10]:
        print(f"\nUNEXPECTED: {line}")
    return 0 if not errors and alive and code == 0 and growth < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
