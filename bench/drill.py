"""Rolling restarts behind nginx under load from plain tritonclient (no retries): how many calls are lost.

    .venv/bin/python -m bench.drill [--workers 1] [--rounds 3] [--threads 4]

Starts three `gen serve` replicas (the shipped mnist-cgan and mnist-diffusion; `--workers N` each) behind real
nginx running deploy/nginx/gen.conf (tests/deploy/test_nginx.py's set-up), then --threads threads call
ModelInfer on mnist-cgan.generator back to back through nginx with tritonclient.grpc at its default options
(no retries) while every replica in turn is stopped with SIGTERM (it drains) and started again, --rounds times.
Prints every status counted and the errors nginx logged. Needs nginx (apt-get install nginx-light).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.drill", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)

    import numpy as np
    import tritonclient.grpc as triton

    from serve.launch import stop_server
    from tests.deploy.test_nginx import MAIN_CONF, NGINX, render, start_replica, wait_listening
    from tests.replicas import free_ports, small_repo

    if NGINX is None:
        print("nginx is not installed (apt-get install nginx-light)", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="gen-drill-"))
    replicas, nginx = [], None
    counts: collections.Counter = collections.Counter()
    stop = threading.Event()
    try:
        repo = small_repo(folder / "exported")
        proxy_port, *ports = free_ports(4)
        replicas = [start_replica(repo, p, args.workers) for p in ports]
        (folder / "gen.conf").write_text(render(proxy_port, ports))
        user = "user root root;" if os.geteuid() == 0 else ""
        (folder / "nginx.conf").write_text(MAIN_CONF.format(d=folder, user=user))
        nginx = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e",
                                  str(folder / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(proxy_port, nginx)

        def load() -> None:
            client = triton.InferenceServerClient(f"127.0.0.1:{proxy_port}")
            z_dim = int(client.get_model_metadata("mnist-cgan.generator", as_json=True)["inputs"][0]["shape"][1])
            while not stop.is_set():
                inputs = [triton.InferInput("z", [1, z_dim], "FP32"), triton.InferInput("label", [1], "INT64")]
                inputs[0].set_data_from_numpy(np.zeros((1, z_dim), np.float32))
                inputs[1].set_data_from_numpy(np.array([3], np.int64))
                try:
                    client.infer("mnist-cgan.generator", inputs)
                    counts["OK"] += 1
                except triton.InferenceServerException as e:
                    counts[str(e.status())] += 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(args.threads)]
        for t in threads:
            t.start()
        time.sleep(1)
        t0 = time.monotonic()
        for _ in range(args.rounds):
            for i in range(len(replicas)):
                replicas[i].proc.send_signal(signal.SIGTERM)
                replicas[i].proc.wait(timeout=120)
                replicas[i] = start_replica(repo, ports[i], args.workers)
                time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=70)
        elapsed = time.monotonic() - t0
        total = sum(counts.values())
        lost = total - counts["OK"]
        print(f"## Drill: `python -m bench.drill --workers {args.workers} --rounds {args.rounds} "
              f"--threads {args.threads}`\n")
        print(f"- {args.rounds * len(replicas)} rolling restarts in {elapsed:.0f} s, {total} calls: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; lost {lost}")
        logged = collections.Counter(
            re.sub(r"^\*\d+ ", "", line.split("] ", 1)[1].split(", client:")[0].split(": ", 1)[-1])
            for line in (folder / "error.log").read_text(errors="replace").splitlines() if "[error]" in line)
        for message, n in logged.most_common():
            print(f"- nginx error log: {n} x {message}")
        return 0 if lost == 0 else 1
    finally:
        stop.set()
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=15)
        for r in replicas:
            if r.proc.poll() is None:
                stop_server(r, timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
