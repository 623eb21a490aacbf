"""Triton's perf_analyzer as case 2's load generator: one (server, model, protocol, concurrency) point per run.

    perf_analyzer -m MODEL -u HOST:PORT -i grpc|http --concurrency-range C --input-data zero
                  --measurement-interval MS --max-trials 6 --stability-percentage 999 -f CSV

perf_analyzer reports the last three windows once they are "stable" (max / min of their throughput and latency within
the threshold). At 999% three windows almost always are, so a run measures three windows of MS milliseconds (about
3 x MS of load, plus a fraction of a second to start) and reports them together: throughput, p50 and p99 from its CSV
(microseconds there, milliseconds here). When a stall made one window more than 10x off (seen with 100 ms windows),
it measures more windows, up to six, instead of failing. perf_analyzer stops at the first
failed request, so a run either has no errors or fails as a whole; then the result carries its first error line.

The binary comes with tritonclient 2.41's wheel, installed into .venv-perf by `make perf-analyzer`. It needs
libb64 (`apt-get install libb64-0d`) and libcudart.so.12, which the nvidia-cuda-runtime-cu12 wheel in the same
venv provides (put on LD_LIBRARY_PATH here), as tests/serve/test_perf_analyzer.py runs it.
"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-perf"
BINARY = VENV / "bin" / "perf_analyzer"
TRIALS = 3  # the windows a run reports
MAX_TRIALS = 6  # the windows it may take to find three within the stability threshold
# the request cannot be built from the model's config (e.g. a per-row input declared with no dims): another driver
SHAPE_ERRORS = ("unable to set shape for the input", "is incompatible with the model's input shape")


class Unavailable(RuntimeError):
    """perf_analyzer is not installed or cannot start here; the message says why in one line."""


def env() -> dict:
    libs = sorted(VENV.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*map(str, libs), os.environ.get("LD_LIBRARY_PATH", "")])}


def _cannot_start(text: str) -> str | None:
    """The one-line reason when the dynamic loader refused the binary."""
    line = next((s.strip() for s in text.splitlines() if "error while loading shared libraries" in s), None)
    if line is None:
        return None
    hint = ("apt-get install libb64-0d" if "libb64" in line else
            "libcudart.so.12 comes from the nvidia-cuda-runtime-cu12 wheel in .venv-perf" if "libcudart" in line else
            "libb64: apt-get install libb64-0d; libcudart.so.12: nvidia-cuda-runtime-cu12 in .venv-perf")
    return f"perf_analyzer cannot start: {line} ({hint})"


def probe(binary: Path | None = None) -> str:
    """'perf_analyzer 2.41.0 (tritonclient wheel)' when the binary runs here; raises Unavailable (one line) if not."""
    binary = binary or BINARY
    if not Path(binary).is_file():
        raise Unavailable(f"{binary} is missing (`make perf-analyzer` installs it: tritonclient 2.41's wheel)")
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env(), timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"perf_analyzer cannot start: {e}") from None
    why = _cannot_start(out.stdout + out.stderr)
    if why:
        raise Unavailable(why)
    version = re.search(r"Version\s+([\d.]+)", out.stdout + out.stderr)
    if version is None:
        raise Unavailable("perf_analyzer --version printed no version: "
                          + " ".join((out.stdout + out.stderr).split())[:200])
    return f"perf_analyzer {version.group(1)} (tritonclient wheel)"


def first_error(text: str) -> str:
    """The most telling error line of a failed run ('Thread [0] had error: ...' before the summary lines)."""
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    for pattern in (r"error:", r"error|failed|unable|incompatible"):
        hit = next((s for s in lines if re.search(pattern, s, re.IGNORECASE)), None)
        if hit:
            return hit[:300]
    return (lines[-1] if lines else "no output")[:300]


def run(target: str, model: str, protocol: str, concurrency: int, interval_ms: int, *, binary: Path | None = None,
        timeout: float | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One perf_analyzer run: {"throughput": infer/s, "p50_ms", "p99_ms", "requests" (completed in the measured
    windows), "errors": 0 or 1 (the run failed), "first_error", "shape_error" (the request could not be built),
    "seconds" (the run's wall time)}. A failed run has throughput 0 and no latencies. Raises Unavailable when the
    binary cannot start at all, so that the caller can fall back to another load generator."""
    import time

    binary = binary or BINARY
    if timeout is None:  # up to six windows, which stretch when the server falls behind, plus the start
        timeout = 90 + 3 * MAX_TRIALS * interval_ms / 1e3
    with tempfile.TemporaryDirectory(prefix="gen-perf-analyzer-") as tmp:
        csv_path = Path(tmp) / "point.csv"
        cmd = [str(binary), "-m", model, "-u", target, "-i", protocol, "--concurrency-range", str(concurrency),
               "--input-data", "zero", "--measurement-interval", str(int(interval_ms)), "--max-trials", str(MAX_TRIALS),
               "--stability-percentage", "999", "-f", str(csv_path), *extra]
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
        except FileNotFoundError as e:
            raise Unavailable(f"perf_analyzer cannot start: {e}") from None
        except subprocess.TimeoutExpired:
            return _failed(f"perf_analyzer did not finish within {timeout:g} s", time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        text = out.stdout + out.stderr
        why = _cannot_start(text)
        if why:
            raise Unavailable(why)
        if out.returncode != 0 or not csv_path.is_file():
            return _failed(first_error(text) + f" (exit {out.returncode})", seconds)
        with csv_path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("Concurrency", "").strip() == str(concurrency)]
    if not rows:
        return _failed(f"perf_analyzer wrote no CSV row for concurrency {concurrency}", seconds)
    row = rows[-1]
    count = re.findall(r"Request count:\s*(\d+)", out.stdout)
    return {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1e3,
            "p99_ms": float(row["p99 latency"]) / 1e3, "requests": int(count[0]) if count else None,
            "errors": 0, "first_error": "", "shape_error": False, "seconds": seconds}


def _failed(why: str, seconds: float) -> dict:
    return {"throughput": 0.0, "p50_ms": None, "p99_ms": None, "requests": 0, "errors": 1, "first_error": why,
            "shape_error": any(s in why for s in SHAPE_ERRORS), "seconds": seconds}
