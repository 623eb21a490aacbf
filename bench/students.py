"""Case 5: images per second through the server, a distilled student against its teacher, in one run.

A real `gen serve` (subprocess, CPU) over the shipped teacher `mnist-diffusion` and its student
`mnist-diffusion-student` from exported/ (the trained weights, so that each row's quality numbers belong to the
model measured; speed does not depend on the weights). Each setting sends CLIENTS concurrent gRPC Generate
streams of IMAGES_PER_CALL images each (gen.v1 through serve.client, PNGs back, as a user would); the settings take
turns `repeats` times and the table has the median images per second:

  * the student at 1, 2 and 4 steps (consistency sampling, guidance as its input: one U-Net row per image-step);
  * the teacher at the server's default (UniPC, 10 steps) and at 50 DDIM steps, classifier-free guidance as a
    doubled batch (two rows per image-step).

The quality columns are not measured here: they are `gen eval`'s (n = 1,000, seed 0) for the same settings,
read from docs/quality.json and docs/teacher-quality.json, which say how they were made.
"""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "mnist-diffusion", "mnist-diffusion-student"
CLIENTS = 8
# (label, model, sampler, steps); None: the model's default
SETTINGS = (("student, 1 step", STUDENT, None, 1), ("student, 2 steps", STUDENT, None, 2),
            ("student, 4 steps", STUDENT, None, 4), ("teacher, server default (UniPC 10)", TEACHER, None, None),
            ("teacher, 50 DDIM steps", TEACHER, "ddim", 50))
QUALITY_FILES = ("docs/quality.json", "docs/teacher-quality.json")


def _images_per_s(target: str, model: str, sampler: str | None, steps: int | None, images_per_call: int) -> float:
    from serve.client import GenClient, Images

    def call(seed: int) -> int:
        with GenClient(target, timeout=600) as client:
            for event in client.generate(model, n=images_per_call, seed=seed, sampler=sampler, steps=steps):
                if isinstance(event, Images):
                    return len(event.pixels)
        raise RuntimeError(f"{model}: the stream ended without images")

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        t0 = time.perf_counter()
        done = sum(pool.map(call, range(CLIENTS)))
        seconds = time.perf_counter() - t0
    assert done == CLIENTS * images_per_call
    return done / seconds


def quality(model: str, sampler: str, steps: int) -> dict | None:
    """gen eval's class accuracy and Frechet ratio for this setting, from the committed eval files."""
    for name in QUALITY_FILES:
        path = ROOT / name
        if not path.is_file():
            continue
        for report in json.loads(path.read_text()):
            s = report.get("details", {}).get("sampling", {})
            if report["model"] == model and s.get("sampler") == sampler and s.get("steps") == steps:
                m = {x["name"]: x["value"] for x in report["metrics"]}
                return {"class_accuracy": m.get("class accuracy"), "frechet_ratio": m.get("frechet / baseline"),
                        "n": report["details"].get("frechet_samples"), "file": name}
    return None


def run(repeats: int, images_per_call: int, log=print) -> dict:
    from serve.launch import start_server, stop_server
    from serve.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS

    src = ROOT / "exported"
    missing = [m for m in (TEACHER, STUDENT) if not (src / m).is_dir()]
    if missing:
        return {"error": f"exported/ has no {', '.join(missing)}: run `make models` first"}
    tmp = Path(tempfile.mkdtemp(prefix="gen-bench-students-"))
    repo = tmp / "exported"
    for m in (TEACHER, STUDENT):
        shutil.copytree(src / m, repo / m)
    student_default = json.loads((src / STUDENT / "1" / "manifest.json").read_text())["diffusion"]["student"]
    samples: dict[str, list[float]] = {label: [] for label, *_ in SETTINGS}
    server = start_server(repo, "--no-http")
    try:
        for _, model, sampler, _ in SETTINGS:  # warm: sessions built, scheduler threads started
            _images_per_s(server.target, model, sampler, 1 if model == STUDENT else 2, 1)
        for rep in range(repeats):
            for label, model, sampler, steps in SETTINGS:
                rate = _images_per_s(server.target, model, sampler, steps, images_per_call)
                samples[label].append(rate)
                log(f"  [{rep + 1}/{repeats}] {label}: {rate:.1f} images/s")
    finally:
        stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for label, model, sampler, steps in SETTINGS:
        if model == STUDENT:
            steps = steps or student_default["default_steps"]
            sampler = student_default["samplers"][str(steps)]
        else:
            sampler, steps = sampler or DEFAULT_SAMPLER, steps or DEFAULT_STEPS
        rows.append({"setting": label, "model": model, "sampler": sampler, "steps": steps,
                     "rows_per_image": steps * (1 if model == STUDENT else 2),
                     "images_per_s": statistics.median(samples[label]), "repeats": len(samples[label]),
                     "quality": quality(model, sampler, steps)})
    return {"clients": CLIENTS, "images_per_call": images_per_call, "rows": rows}
