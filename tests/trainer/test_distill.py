"""Distilling a student (trainer/distill.py and the diffusion family's student mode): the teacher's weights read
back from its ONNX file, the trajectories, the option checks, exact resume and `gen distill`."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import STUDENT, tiny_config
from trainer.denoising import UNet
from trainer.distill import TeacherError, check_same_outputs, load_teacher, student_grid, trajectories, unet_from_onnx
from trainer.loop import fit
from trainer.models import ConfigError


@pytest.fixture(scope="module")
def teacher(tiny_repo):
    return load_teacher(tiny_repo / "exported" / "tiny-diffusion")  # a model folder: its newest version


def student_options(teacher, **extra):
    return {**STUDENT, "distill_from": str(teacher.path), **extra}


def test_the_teachers_weights_come_back_from_onnx(teacher):
    c = teacher.config
    unet = UNet(1, 32, c["width"], tuple(c["channel_mult"]), c["num_res_blocks"], c["attn_resolution"], 0.0, 10,
                guidance_input=True)
    missing = unet_from_onnx(teacher.onnx_path, unet)
    assert missing and all(k.startswith("guidance_emb.") for k in missing), "only the student's own additions"
    assert check_same_outputs(teacher, unet.eval(), 10) <= 1e-5


def test_eps_below_starts_a_v_student_at_its_teachers_prediction(teacher):
    c = teacher.config
    unet = UNet(1, 32, c["width"], tuple(c["channel_mult"]), c["num_res_blocks"], c["attn_resolution"], 0.0, 10,
                guidance_input=True)
    unet_from_onnx(teacher.onnx_path, unet)
    abar = torch.from_numpy(teacher.schedule.abar)
    x, t, label = torch.randn(2, 1, 32, 32), torch.tensor([100, 600]), torch.tensor([3, 10])
    with torch.no_grad():
        eps = unet(x, t, label, torch.ones(2))
        unet.set_eps_below(250, abar)
        v = unet(x, t, label, torch.ones(2))
    a, s = abar[100].sqrt().float(), (1 - abar[100]).sqrt().float()
    assert torch.allclose(a * x[0] - s * v[0], (x[0] - s * eps[0]) / a, atol=1e-4), "the teacher's x0 below 250"
    assert torch.equal(v[1], eps[1]), "the U-Net's own output (v) from 250 on"
    assert "_alpha" not in unet.state_dict(), "checkpoints and the teacher's weights keep their keys"


def test_a_mismatched_onnx_file_is_refused(teacher):
    unet = UNet(1, 32, 16, (1, 2), 1, 8, 0.0, 10)  # twice the teacher's width
    with pytest.raises(TeacherError, match="architecture"):
        unet_from_onnx(teacher.onnx_path, unet)


def test_trajectories_are_a_pure_function_of_the_seed(teacher):
    grid = student_grid(4, 1000)
    assert grid == [999, 749, 499, 249] and set(student_grid(2, 1000)) <= set(grid)
    a = trajectories(teacher, 6, grid, 4, (1.0, 3.0), 0.5, seed=3, chunk=4)
    b = trajectories(teacher, 6, grid, 4, (1.0, 3.0), 0.5, seed=3, chunk=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["x"].shape == (6, 4, 1, 32, 32) and a["x0"].shape == (6, 1, 32, 32)
    assert np.abs(a["x0"]).max() <= 1.0 and 1.0 <= a["guidance"].min() <= a["guidance"].max() <= 3.0
    assert set(a["label"]) <= set(range(11))
    rng = np.random.default_rng(np.random.SeedSequence([3, 0]))  # chunk 0 draws x_T first
    assert np.array_equal(a["x"][:4, 0], rng.standard_normal((4, 1, 32, 32), dtype=np.float32))
    with pytest.raises(TeacherError, match="teacher_steps"):
        trajectories(teacher, 2, grid, 6, (1.0, 3.0), 0.0, seed=0)


@pytest.mark.parametrize("extra,match", [
    ({"width": 16}, "width=16"), ({"teacher_steps": 6}, "teacher_steps"), ({"student_steps": [2, 3]}, "student_steps"),
    ({"guidance_range": [2.0, 1.0]}, "guidance_range"), ({"distill_from": "/nowhere"}, "no exported model"),
    ({"student_sampler": {"4": "ddim"}}, "student_sampler"), ({"student_sampler": "heun"}, "student_sampler"),
    ({"eps_below": 250, "prediction": "eps"}, "eps_below")])
def test_student_options_are_checked(teacher, tmp_path, extra, match):
    config = tiny_config("diffusion", tmp_path / "run", family_options=student_options(teacher, **extra))
    with pytest.raises(ConfigError, match=match):
        fit(config, progress=False)


def test_a_student_cannot_be_a_teacher(tiny_repo, tmp_path):
    student = tiny_repo / "exported" / "tiny-diffusion-student" / "1"
    config = tiny_config("diffusion", tmp_path / "run", family_options={**STUDENT, "distill_from": str(student)})
    with pytest.raises(ConfigError, match="distilled student"):
        fit(config, progress=False)


def test_distillation_resumes_exactly(teacher, tmp_path):
    config = lambda run: tiny_config("diffusion", run, steps=6, checkpoint_every=100, sample_every=100,  # noqa: E731
                                     family_options=student_options(teacher))
    fit(config(tmp_path / "straight"), progress=False)
    fit(config(tmp_path / "split"), progress=False, stop_at=3)
    fit(config(tmp_path / "split"), resume=True, progress=False)
    a, b = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "split"))
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 for x, y in zip(a, b))
    final = {run: torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["family"]["extra"]
             for run in ("straight", "split")}
    assert final["straight"]["trajectory_seed"] == final["split"]["trajectory_seed"]


def test_gen_distill_trains_a_student_and_says_what_is_wrong(teacher, tmp_path):
    run = tmp_path / "student"
    cmd = [sys.executable, "-m", "gen.cli", "distill", str(teacher.path), "--steps", "2", "--batch-size", "4",
           "--run-dir", str(run), "--set", "trajectories=4", "--set", "teacher_steps=4", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((run / "config.json").read_text())
    assert record["family"]["distill_from"] == str(teacher.path) and record["family"]["width"] == 8
    # the teacher predicts eps; its student predicts v (x0 = a x_t - s v: one step needs no division by a)
    assert teacher.config["prediction"] == "eps" and record["family"]["prediction"] == "v"
    assert record["family"]["eps_below"] == teacher.schedule.T // 4 == 250, "the preset's, scaled to the teacher's T"
    assert "distilled 2 steps" in done.stdout

    bad = subprocess.run([sys.executable, "-m", "gen.cli", "distill", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "no exported model" in bad.stderr
