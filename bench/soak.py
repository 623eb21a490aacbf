"""A soak run: 64 concurrent clients against a real `gen serve` for 60 s, mixed workload.

    .venv/bin/python -m bench.soak [--clients 64] [--seconds 60] [--warmup 10] [--workers N]

Builds tiny models of every family (as bench/fuzz.py does), starts `gen serve` on 127.0.0.1, and runs
--clients clients in one process, each looping over Sample (gan, vae), Translate (pix2pix, cyclegan) and
Generate (diffusion; one in three cancelled by the client after two events) over gRPC, and OIP v2 infer
over REST (the gan and vae graphs, JSON or binary tensor data, through aiohttp). Counts
every status; anything but OK and the client's own cancellations is unexpected. The server's resident
memory (VmRSS from /proc/PID/status, its workers included) is sampled every second of the run: the median of
the last third must stay within 10% of the median of the first third. Prints a Markdown summary; exit status 1
on an unexpected error or too much growth.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
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
    parser.add_argument("--workers", type=int, default=1, help="gen serve --workers N")
    parser.add_argument("--repo", help="an exported repository of tiny-<family> models to reuse (default: build one)")
    args = parser.parse_args(argv)

    from serve.launch import start_server, stop_server

    with tempfile.TemporaryDirectory(prefix="gen-soak-") as tmp:
        repo = Path(args.repo) if args.repo else build_tiny_repo(Path(tmp), log=lambda m: print(m, file=sys.stderr))
        server = start_server(repo, "--workers", str(args.workers))
        pid = server.proc.pid
        rss_start = rss_kb(pid)
        asyncio.run(run(server.target, server.http_target, args.clients, args.warmup, collections.Counter(), []))
        rss_before = rss_kb(pid)
        counts: collections.Counter = collections.Counter()
        errors: list[str] = []
        samples: list[int] = []  # resident memory once a second during the run
        done = threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                samples.append(rss_kb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        asyncio.run(run(server.target, server.http_target, args.clients, args.seconds, counts, errors))
        elapsed = time.monotonic() - t0
        done.set()
        sampler.join()
        alive = server.proc.poll() is None
        rss_after = rss_kb(pid) if alive else 0
        code = stop_server(server)

    total = sum(counts.values())
    # the resident size swings by tens of MiB from second to second (allocator caches, onnxruntime's arenas per
    # batch size), so growth compares the median of the run's last third with that of its first third
    third = max(1, len(samples) // 3)
    first, last = statistics.median(samples[:third] or [rss_before]), statistics.median(samples[-third:] or [rss_after])
    growth = (last - first) / first * 100 if first else float("inf")
    workers = f" --workers {args.workers}" if args.workers > 1 else ""
    print(f"## Soak run: `python -m bench.soak --clients {args.clients} --seconds {args.seconds:g} "
          f"--warmup {args.warmup:g}{workers}`\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU (device cpu), "
          f"Python {platform.python_version()}")
    print(f"- {args.clients} concurrent clients for {elapsed:.1f} s after a {args.warmup:g} s warm-up: "
          f"{total} requests ({total / elapsed:.1f}/s)")
    print("- statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"- unexpected errors: {len(errors)}")
    print(f"- server resident memory (VmRSS, its workers included): {rss_start / 1024:.0f} MiB at start, "
          f"{rss_before / 1024:.0f} MiB after warm-up, {rss_after / 1024:.0f} MiB at the end; during the run "
          f"{min(samples, default=0) / 1024:.0f} to {max(samples, default=0) / 1024:.0f} MiB (sampled each second), "
          f"median of the first third {first / 1024:.0f} MiB, of the last third {last / 1024:.0f} MiB: growth "
          f"{growth:+.1f}% (limit +10%)")
    print(f"- server exit status on SIGTERM: {code}")
    for line in errors[:10]:
        print(f"\nUNEXPECTED: {line}")
    return 0 if not errors and alive and code == 0 and growth < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
