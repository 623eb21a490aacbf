"""A long fuzz run: 10,000+ hypothesis-generated requests to both gRPC services and the REST port of a real
`gen serve`.

    .venv/bin/python -m bench.fuzz [--requests 10500] [--max-seconds 900]

Trains and exports one tiny model per family into a temporary folder (seconds; nothing shipped is
needed), starts `gen serve` on 127.0.0.1 (port 0, repository control off), sends the requests of
tests/serve/strategies.py (gen.v1 and OIP messages, bytes that are not messages, OIP v2 REST requests
valid and hostile: JSON, binary tensor data, any JSON, garbage bodies, odd paths), counts the
statuses, checks health and memory afterwards, stops the server with SIGTERM and prints a summary
(Markdown, for docs/reliability.md). Exit status 1 if any status was undocumented or the server died.
Bounded: stops after --requests requests or --max-seconds, whichever comes first.
"""
from __future__ import annotations

import argparse
import collections
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_tiny_repo(base: Path, log=print) -> Path:
    """One tiny model per family, trained a few steps and exported as tiny-<family> (as the tests do)."""
    from tests.conftest import FAMILIES, tiny_config
    from trainer.export import export_model
    from trainer.loop import fit

    for family in FAMILIES:
        log(f"  training and exporting tiny-{family}")
        fit(tiny_config(family, base / "runs" / family, steps=2), progress=False)
        export_model(base / "runs" / family, f"tiny-{family}", repo=base / "exported")
    return base / "exported"


def rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (gen serve --workers' workers), KiB."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10500)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="gen serve --workers N")
    parser.add_argument("--repo", help="an exported repository of tiny-<family> models to reuse (default: build one)")
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    from serve.launch import start_server, stop_server
    from tests.serve.strategies import (
        DOCUMENTED,
        DOCUMENTED_HTTP,
        garbage,
        generator_calls,
        oip_calls,
        rest_calls,
        send,
        send_rest,
    )

    with tempfile.TemporaryDirectory(prefix="gen-fuzz-") as tmp:
        if args.repo:
            repo = Path(args.repo)
        else:
            print("building the tiny models", file=sys.stderr)
            repo = build_tiny_repo(Path(tmp), log=lambda m: print(m, file=sys.stderr))
        server = start_server(repo, "--workers", str(args.workers))
        channel = grpc.insecure_channel(server.target)
        counts: collections.Counter = collections.Counter()
        per_method: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        bad: list[str] = []
        sent = 0
        t0 = time.monotonic()
        rss_start = rss_kb(server.proc.pid)
        control = st.tuples(st.just("oip"), st.sampled_from(["RepositoryModelLoad", "RepositoryModelUnload"]),
                            st.sampled_from(["tiny-gan", "../x", "", "a/b", "%2e%2e"]))
        calls = st.one_of(generator_calls().map(lambda c: ("gen", *c)), oip_calls().map(lambda c: ("oip", *c)),
                          garbage(), control, rest_calls().map(lambda c: ("rest", c[0], c)))

        @seed(args.seed)
        @settings(max_examples=args.requests, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(call=calls)
        def fuzz(call):
            nonlocal sent
            if sent >= args.requests or time.monotonic() - t0 > args.max_seconds:
                return
            service, method, request = call
            if service == "rest":
                outcome = send_rest(server.http_target, request, timeout=60)
                sent += 1
                path = request[1]
                last = path.rsplit("/", 1)[-1]
                endpoint = (last if last in ("infer", "ready", "config", "stats") else "metadata") \
                    if path.startswith("/v2/models/") else path
                counts[f"HTTP {outcome.code}"] += 1
                per_method[f"rest:{method} {endpoint[:40]}"][f"HTTP {outcome.code}"] += 1
                if int(outcome.code) not in DOCUMENTED_HTTP or (outcome.code != "200" and not outcome.details):
                    bad.append(f"REST {method} {path[:100]} -> {outcome.code}: {outcome.details[:200]}")
                return
            if method in ("RepositoryModelLoad", "RepositoryModelUnload"):
                from tritonclient.grpc import service_pb2 as oip

                cls = oip.RepositoryModelLoadRequest if method.endswith("Load") else oip.RepositoryModelUnloadRequest
                request = cls(model_name=request)
            outcome = send(channel, service, method, request, timeout=60)
            sent += 1
            kind = "bytes" if isinstance(request, bytes) else service
            counts[outcome.code] += 1
            per_method[f"{kind}:{method}"][outcome.code] += 1
            if outcome.code not in DOCUMENTED or (outcome.code != "OK" and not outcome.details.strip()):
                bad.append(f"{service}.{method}({request!r:.200}) -> {outcome.code}: {outcome.details[:200]}")

        fuzz()
        seconds = time.monotonic() - t0
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        alive = server.proc.poll() is None
        rss_end = rss_kb(server.proc.pid) if alive else 0
        channel.close()
        code = stop_server(server)

    workers = f" --workers {args.workers}" if args.workers > 1 else ""
    print(f"## Fuzz run: `python -m bench.fuzz --requests {args.requests} --seed {args.seed}{workers}`\n")
    print(f"- machine: {platform.machine()}, {__import__('os').cpu_count()} CPU cores, no GPU used "
          f"(device cpu), Python {platform.python_version()}")
    print(f"- requests sent: {sent} in {seconds:.0f} s ({sent / seconds:.0f}/s)")
    print("- statuses: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    print(f"- undocumented statuses or empty messages: {len(bad)}")
    print(f"- server afterwards: {'alive' if alive else 'DEAD'}, health "
          f"{health_pb2.HealthCheckResponse.ServingStatus.Name(health)}, exit status on SIGTERM {code}")
    print(f"- server resident memory: {rss_start / 1024:.0f} MiB at the start, {rss_end / 1024:.0f} MiB after\n")
    print("| method | statuses |\n|---|---|")
    for method, c in sorted(per_method.items()):
        print(f"| {method} | " + ", ".join(f"{k} {v}" for k, v in c.most_common()) + " |")
    for line in bad[:20]:
        print(f"\nUNEXPECTED: {line}")
    return 0 if not bad and alive and code == 0 and health == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
