"""Case 7: the first request after `gen serve` reports ready, against the median of the next 20.

A version is READY only when warm (serve/runtime.py: each graph's batcher and a denoising model's loop answered
warm-up requests on the threads that serve them), so the first request should cost what the next ones do. For
each model below a fresh `gen serve` (subprocess, CPU, the shipped models of exported/) is started; as soon as it
reports ready the first call is timed (after a ListModels call has connected the channel), then 20 more in turn,
one at a time (gRPC through serve.client, as a user would), and last the first call of a second, new channel to
the same (now warm) server: what a connection's first call costs apart from the model. Each row repeats that
`repeats` times with a new server and keeps the medians.

    python -m bench.warmup [--repeats N]    # this case alone: updates bench/results.json and BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLLOWING = 20
# (model, what is called): Generate at the server's defaults (a student: its own), Sample for a generator
CALLS = (("mnist-diffusion", "generate"), ("mnist-flow", "generate"), ("mnist-diffusion-student", "generate"),
         ("mnist-cgan", "sample"))


def _call(client, model: str, kind: str) -> float:
    t0 = time.perf_counter()
    if kind == "generate":
        for _ in client.generate(model, n=1, seed=0, labels=[3]):
            pass
    else:
        client.sample(model, n=1, seed=0, labels=[3])
    return (time.perf_counter() - t0) * 1000


def run(repeats: int, log=print) -> dict:
    from serve.client import GenClient
    from serve.launch import start_server, stop_server

    rows = []
    for model, kind in CALLS:
        firsts, medians, channels = [], [], []
        for _ in range(repeats):
            server = start_server(ROOT / "exported", "--no-http", "--device", "cpu")
            try:
                with GenClient(server.target, timeout=600) as client:
                    client.list_models()  # the channel's connection is the client's cost, not the model's
                    firsts.append(_call(client, model, kind))
                    medians.append(statistics.median(_call(client, model, kind) for _ in range(FOLLOWING)))
                with GenClient(server.target, timeout=600) as client:  # the control: a new channel, a warm server
                    client.list_models()
                    channels.append(_call(client, model, kind))
            finally:
                stop_server(server)
        row = {"model": model, "call": kind, "first_ms": statistics.median(firsts),
               "next_median_ms": statistics.median(medians), "repeats": repeats,
               "new_channel_ms": statistics.median(channels),
               "firsts_ms": [round(f, 2) for f in firsts], "next_medians_ms": [round(m, 2) for m in medians]}
        row["ratio"] = row["first_ms"] / row["next_median_ms"]
        log(f"  {model} {kind}: first {row['first_ms']:.1f} ms, next {FOLLOWING} median "
            f"{row['next_median_ms']:.1f} ms (x{row['ratio']:.2f}); a new channel's first call "
            f"{row['new_channel_ms']:.1f} ms")
        rows.append(row)
    return {"rows": rows, "following": FOLLOWING}


def main() -> None:
    import os

    from bench import report
    from bench.timing import machine

    ap = argparse.ArgumentParser(prog="python -m bench.warmup", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    result = run(args.repeats, print)
    m = machine()
    result.update(command=f"python -m bench.warmup --repeats {args.repeats}", started=started,
                  load=[*load, *os.getloadavg()], cpu=m["cpu"], cores=m["cores"], commit=m["commit"])
    report.update_case("warmup", result)


if __name__ == "__main__":
    main()
