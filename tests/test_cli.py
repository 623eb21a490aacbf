"""The `gen` command line as a user runs it: real subprocesses, exit codes, one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gen(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gen", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


def assert_one_line_error(proc, match):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gen: error:") and match in lines[0], proc.stderr


def test_train_help_documents_every_option_and_layout():
    proc = gen("train", "--help")
    assert proc.returncode == 0
    for opt in ("--data", "--image-size", "--channels", "--direction", "--steps", "--epochs", "--batch-size",
                "--lr", "--seed", "--device", "--run-dir", "--sample-every", "--checkpoint-every", "--resume",
                "--set"):
        assert opt in proc.stdout, opt
    for section in ("Presets", "options of vae", "options of gan", "options of pix2pix", "options of cyclegan",
                    "options of diffusion", "trainA", "A|B"):
        assert section in proc.stdout, section


def test_train_runs_and_resumes_from_the_cli(tmp_path):
    run = tmp_path / "run"
    common = ["--data", "digits", "--batch-size", "8", "--run-dir", str(run), "--set", "width=8",
              "--set", "z_dim=8", "--sample-every", "2", "--no-progress"]
    proc = gen("train", "gan", "--steps", "2", *common)
    assert proc.returncode == 0, proc.stderr
    assert "trained 2 steps" in proc.stdout
    assert (run / "checkpoint.pt").exists() and (run / "samples" / "step_000002.png").exists()
    proc = gen("train", "gan", "--steps", "3", "--resume", *common)
    assert proc.returncode == 0, proc.stderr
    assert "trained 3 steps" in proc.stdout


def test_progress_bar_shows_losses(tmp_path):
    proc = gen("train", "vae", "--data", "digits", "--steps", "3", "--batch-size", "8", "--set", "width=8",
               "--run-dir", str(tmp_path / "r"), "--progress")
    assert proc.returncode == 0, proc.stderr
    assert "3/3" in proc.stderr and "loss=" in proc.stderr


@pytest.mark.parametrize("args,match", [
    (["train", "nosuch"], "unknown model 'nosuch'"),
    (["train", "vae", "--data", "/nonexistent/dir"], "--data /nonexistent/dir: no such folder"),
    (["train", "gan", "--image-size", "48"], "--image-size 48"),
    (["train", "vae", "--set", "nosuch=1"], "--set nosuch"),
    (["train", "vae", "--set", "oops"], "--set oops: use KEY=VALUE"),
    (["train", "pix2pix", "--data", "mnist"], "--data mnist"),
])
def test_user_mistakes_get_one_line(args, match, tmp_path):
    assert_one_line_error(gen(*args, "--run-dir", str(tmp_path / "r")), match)


def test_resume_without_checkpoint(tmp_path):
    assert_one_line_error(gen("train", "vae", "--resume", "--run-dir", str(tmp_path / "r")), "--resume")
