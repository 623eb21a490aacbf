"""The serve extra alone serves: the CPU image's install (deploy/docker/Dockerfile's COPY lines and its pip line),
done in a clean virtual environment from a copy of the checkout, then `gen serve` from that environment answers
Generate, Sample and OIP inference over gRPC and REST, and torch is not there.

Needs PyPI (or pip's cache) for the extra's packages, as the image build does."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve.launch import start_server, stop_server
from tests.deploy.test_manifests import dockerfile

ROOT = Path(__file__).resolve().parents[2]


def _image_install() -> tuple[list[str], list[str]]:
    """The CPU image's COPY sources from the repository (not the models) and its pip install arguments."""
    _, instructions = dockerfile("Dockerfile")
    sources, pip = [], None
    for keyword, *rest in instructions:
        if keyword == "COPY" and "${" not in rest[0]:
            sources += shlex.split(rest[0])[:-1]
        if keyword == "RUN" and (m := re.search(r"pip install (.+)$", rest[0])):
            pip = shlex.split(m.group(1))
    assert sources and pip, "the Dockerfile no longer copies the package and installs it with pip"
    return sources, pip


@pytest.fixture(scope="module")
def serve_env(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("serve-extra")
    src = base / "src"
    src.mkdir()
    sources, pip = _image_install()
    for name in sources:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          *pip], cwd=src, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"pip install {' '.join(pip)} failed:\n{run.stdout}\n{run.stderr}"
    return venv


def test_the_serve_extra_brings_no_torch(serve_env):
    probe = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('trainer') is not None)"
    out = subprocess.run([str(serve_env / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         cwd=serve_env, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr  # the package, without torch


def test_gen_serve_from_the_serve_extra_answers_every_protocol(serve_env):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    from serve.client import GenClient, Images

    server = start_server(ROOT / "exported", gen=[str(serve_env / "bin" / "gen")])
    try:
        with GenClient(server.target, timeout=120) as client:
            sample = client.sample("mnist-cgan", n=4, seed=1, labels=[0, 1, 2, 3])
            assert sample.pixels.shape == (4, 32, 32, 1)
            events = list(client.generate("mnist-diffusion-student", n=2, seed=1, steps=2))
            assert isinstance(events[-1], Images) and events[-1].pixels.shape == (2, 32, 32, 1)
            assert len(events) == 3  # a progress event per step, then the images
        label = np.array([3, 7], np.int64)
        for module, target in ((triton_grpc, server.target), (triton_http, server.http_target)):
            client = module.InferenceServerClient(target)
            meta = client.get_model_metadata("mnist-cgan.generator", as_json=True) if module is triton_grpc \
                else client.get_model_metadata("mnist-cgan.generator")
            shapes = {i["name"]: i["shape"] for i in meta["inputs"]}
            z = np.random.default_rng(0).standard_normal((2, *[int(d) for d in shapes["z"][1:]])).astype(np.float32)
            feeds = {"z": z, "label": label}
            inputs = []
            for name, array in feeds.items():
                inp = module.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
                inp.set_data_from_numpy(array)
                inputs.append(inp)
            image = client.infer("mnist-cgan.generator", inputs).as_numpy("image")
            assert image.shape == (2, 1, 32, 32) and np.abs(image).max() <= 1.0
            client.close()
    finally:
        assert stop_server(server) == 0


def test_a_command_that_needs_another_extra_says_which(serve_env):
    run = subprocess.run([str(serve_env / "bin" / "gen"), "train", "vae", "--steps", "1"], capture_output=True,
                         text=True, cwd=serve_env, timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "train extra" in run.stderr and "torch" in run.stderr
