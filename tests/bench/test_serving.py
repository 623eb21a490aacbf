"""The bench never hangs on another process: a PyTriton that prints warnings and then nothing is given up
on at its deadline, with the reason in one line (the fake below stands in for it; no PyTriton needed)."""
from __future__ import annotations

import subprocess
import sys
import time

from bench import serving
from serve.launch import wait_for_line

SILENT = "import time; print('NVML warning: no GPU', flush=True); print('DCGM warning', flush=True); time.sleep(600)"


def test_wait_for_line_gives_up_at_its_deadline_while_the_process_is_silent():
    proc = subprocess.Popen([sys.executable, "-c", SILENT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        t0 = time.monotonic()
        line, seen = wait_for_line(proc, lambda text: text.strip() == "ready", timeout=2)
        assert line is None and time.monotonic() - t0 < 10
        assert seen == ["NVML warning: no GPU\n", "DCGM warning\n"]
    finally:
        proc.kill()
        proc.wait()


def test_a_pytriton_that_never_gets_ready_is_reported_in_one_line(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"{SILENT}\"\n")
    fake.chmod(0o755)
    monkeypatch.setattr(serving, "PYTRITON_PY", fake)
    t0 = time.monotonic()
    proc, targets, why = serving.start_pytriton(tmp_path / "g.onnx", "generator", timeout=2)
    assert proc is None and targets == {} and time.monotonic() - t0 < 60
    assert "\n" not in why and "printed no 'ready' within 2 s" in why and "DCGM warning" in why


def test_a_pytriton_that_exits_is_reported_in_one_line(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'RuntimeError: no libcuda'\necho 'second line'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(serving, "PYTRITON_PY", fake)
    proc, _, why = serving.start_pytriton(tmp_path / "g.onnx", "generator", timeout=30)
    assert proc is None and "exited with 3" in why and "RuntimeError: no libcuda" in why and "\n" not in why
