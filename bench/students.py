"""Case 5: images per second through the server, a distilled student against its teacher, in one run.

A real `gen serve` (subprocess, CPU) over the shipped teacher `mnist-diffusion` and its student
`mnist-diffusion-student` from exported/ (the trained weights, so that each row's quality numbers belong to the
model measured; speed does not depend on the weights). Each setting sends CLIENTS concurrent gRPC Generate
streams of IMAGES_PER_CALL images each (gen.v1 through serve.client, PNGs back, as a user would); the settings take
turns `repeats` times and the table has the median images per second:

  * the student at 1, 2 and 4 steps (consistency sampling, guidance as its input: one U-Net row per image-step);
  * the teacher at the server's default (UniPC, 10 steps) and at 50 DDIM steps, classifier-free guidance as a
    doubled batch (two rows per image-step);
  * where the student has an int8 variant (gen export --quantize int8), the student's settings again from a second
    server with `--precision int8`, after the first has stopped.

Beside them, the student's denoiser alone at batch 64, fp32 and int8 files in turn (the server's session options),
and the CPU's flags that decide int8's speed (VNNI).

The quality columns are not measured here: they are `gen eval`'s (n = 1,000, seed 0) for the same settings,
read from docs/quality.json, docs/teacher-quality.json and docs/quality-int8.json, which say how they were made.

    python -m bench.students [--repeats 3] [--images 16]    # this case alone, into bench/results.json
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
QUALITY_FILES = ("docs/quality.json", "docs/teacher-quality.json", "docs/quality-int8.json")
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


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


def quality(model: str, sampler: str, steps: int, precision: str = "fp32") -> dict | None:
    """gen eval's class accuracy and Frechet ratio for this setting at seed 0, from the committed eval files."""
    for name in QUALITY_FILES:
        path = ROOT / name
        if not path.is_file():
            continue
        for report in json.loads(path.read_text()):
            s = report.get("details", {}).get("sampling", {})
            if report["model"] == model and s.get("sampler") == sampler and s.get("steps") == steps and \
                    report["details"].get("precision", "fp32") == precision and report["details"].get("seed", 0) == 0:
                m = {x["name"]: x["value"] for x in report["metrics"]}
                return {"class_accuracy": m.get("class accuracy"), "frechet_ratio": m.get("frechet / baseline"),
                        "n": report["details"].get("frechet_samples"), "file": name}
    return None


def cpu_flags() -> list[str]:
    """The flags of INT8_FLAGS this CPU has."""
    try:
        line = next(x for x in open("/proc/cpuinfo") if x.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in INT8_FLAGS if f in have]


def denoiser_alone(version_dir: Path, rounds: int = 7) -> dict:
    """The student's denoiser at batch 64: median ms of the fp32 and the int8 file, run in turn with the server's
    session options. Without a shipped int8 variant (export keeps one only above its speed bar) one is made here
    as `gen export --quantize int8` makes it, calibrated on this measurement's inputs, to say what was measured."""
    import numpy as np

    from trainer.quantize import quantize_graph, speedup

    manifest = json.loads((version_dir / "manifest.json").read_text())
    entry = manifest["graphs"]["denoiser"]
    rng = np.random.default_rng(0)
    feeds = {"x_t": rng.standard_normal((64, 1, 32, 32)).astype(np.float32),
             "t": rng.choice([999, 749, 499, 249], 64), "label": rng.integers(0, 10, 64),
             "guidance": rng.uniform(1, 3, 64).astype(np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        int8 = version_dir / entry["int8"]["file"] if "int8" in entry else Path(tmp) / "denoiser.int8.onnx"
        if "int8" not in entry:
            quantize_graph(version_dir / entry["file"], int8, [feeds])
        timed = speedup(version_dir / entry["file"], int8, feeds, rounds)
    ms = {"fp32": timed["fp32_ms"], "int8": timed["int8_ms"]}
    return {"batch": 64, "ms": ms, "speedup": timed["speedup"], "int8_shipped": "int8" in entry}


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
    student_manifest = json.loads((src / STUDENT / "1" / "manifest.json").read_text())
    student_default = student_manifest["diffusion"]["student"]
    int8 = "int8" in student_manifest["graphs"]["denoiser"]
    servers = [("fp32", SETTINGS)] + ([("int8", [s for s in SETTINGS if s[1] == STUDENT])] if int8 else [])
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        alone = denoiser_alone(repo / STUDENT / "1")
        for precision, settings in servers:
            server = start_server(repo, "--no-http", "--precision", precision)
            try:
                for _, model, sampler, _ in settings:  # warm: sessions built, scheduler threads started
                    _images_per_s(server.target, model, sampler, 1 if model == STUDENT else 2, 1)
                for rep in range(repeats):
                    for label, model, sampler, steps in settings:
                        rate = _images_per_s(server.target, model, sampler, steps, images_per_call)
                        samples.setdefault((precision, label), []).append(rate)
                        log(f"  [{rep + 1}/{repeats}] {label} ({precision}): {rate:.1f} images/s")
            finally:
                stop_server(server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for (precision, label), rates in samples.items():
        model, sampler, steps = next(s[1:] for s in SETTINGS if s[0] == label)
        if model == STUDENT:
            steps = steps or student_default["default_steps"]
            sampler = student_default["samplers"][str(steps)]
        else:
            sampler, steps = sampler or DEFAULT_SAMPLER, steps or DEFAULT_STEPS
        rows.append({"setting": label, "precision": precision, "model": model, "sampler": sampler, "steps": steps,
                     "rows_per_image": steps * (1 if model == STUDENT else 2),
                     "images_per_s": statistics.median(rates), "repeats": len(rates),
                     "quality": quality(model, sampler, steps, precision)})
    return {"clients": CLIENTS, "images_per_call": images_per_call, "rows": rows, "denoiser_alone": alone,
            "cpu_flags": cpu_flags()}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.report import update_case
    from bench.timing import machine

    parser = argparse.ArgumentParser(prog="python -m bench.students", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=16, help="images per Generate call")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = run(args.repeats, args.images)
    m = machine()
    result.update(command=f"python -m bench.students --repeats {args.repeats} --images {args.images}",
                  started=started, cpu=m["cpu"], cores=m["cores"], commit=m["commit"], load=m["load_average"])
    update_case("students", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
