"""Case 6 (bench/large_model.py) runs end to end in smoke mode: a tiny UNet2DModel of the DDPM CIFAR-10 block layout
saved with save_pretrained, exported by `gen export --from-diffusers`, served by a real `gen serve`, timed against
DDIMPipeline, the cost-vs-batch table, and its BENCHMARKS.md section. Its numbers mean nothing."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench import large_model, report  # noqa: E402
from bench.__main__ import MODES  # noqa: E402


def test_case_6_runs_in_smoke_mode_and_renders(tmp_path):
    mode = MODES["smoke"]
    result = large_model.run(mode, log=lambda msg: None, cache=tmp_path)
    n, steps = mode["large_requests"], mode["large_steps"]
    sides = {(r["side"], r["batch"], r["steps"]) for r in result["rows"]}
    assert sides == {(side, batch, s) for s in steps for side, batch in (("gen", n), ("diffusers", n),
                                                                            ("diffusers", 1))}
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert all(r["server_cpu_seconds"] > 0 for r in result["rows"] if r["side"] == "gen")
    cost = {(r["model"], r["batch"]) for r in result["cost"]["rows"]}
    assert cost == {(m, b) for m in (large_model.NAME, "mnist-diffusion") for b in large_model.COST_BATCHES}
    assert all("torch_ms" in r for r in result["cost"]["rows"] if r["model"] == large_model.NAME)
    assert result["export_parity"]  # the export's served-loop check against PyTorch
    ceiling = result["ceiling"]  # the float32 bound the report sets gen / diffusers against
    assert ceiling["batch"] == n and ceiling["gflop_per_image_step"] > 0 and ceiling["matmul_peak_gflops"] > 0

    section = "\n".join(report._large_model(result, {"started": "another run"}))
    assert section.startswith("## Case 6: a real-size model from diffusers")
    assert "### Cost per image-step against batch size" in section and "nan" not in section
    targets = "\n".join(report._targets({"large_model": result}))
    assert targets.count("| 6 |") == 2 and "diffusers' DDIMPipeline at batch 1 " in targets
