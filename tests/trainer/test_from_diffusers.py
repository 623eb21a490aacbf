"""`gen export --from-diffusers`: small diffusers UNets (random weights, nothing downloaded) saved with save_pretrained,
exported through the CLI, served by a real `gen serve`, and compared with diffusers' own DDIM loop."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from protos import generator_pb2 as pb  # noqa: E402
from protos import generator_pb2_grpc as pb_grpc  # noqa: E402
from serve.diffusion import row_rng  # noqa: E402
from serve.launch import start_server, stop_server  # noqa: E402
from serve.wire import tensor_from_pb  # noqa: E402
from tests.test_cli import assert_one_line_error, gen  # noqa: E402

SMALL = dict(layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
# name: (UNet2DModel kwargs, scheduler class, scheduler kwargs, --null-class, request guidance)
MODELS = {
    # unconditional, eps, linear betas, trailing spacing, clipped x0, an attention block, 3 channels
    "uncond-eps": (dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), **SMALL),
                   "DDIMScheduler", dict(beta_schedule="linear", timestep_spacing="trailing", clip_sample=True),
                   None, None),
    # class-conditional with a null class (guided), v-prediction, cosine betas, leading spacing with an offset
    "cond-v": (dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), num_class_embeds=4,
                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                    **SMALL),
               "DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                     timestep_spacing="leading", steps_offset=1, clip_sample=False),
               3, 2.0),
    # class-conditional without a null class, a DDPMScheduler config (leading spacing), scaled_linear betas
    "cond-ddpm": (dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), num_class_embeds=5,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), **SMALL),
                  "DDPMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=True, clip_sample_range=1.5),
                  None, None),
}
SEED = 11


def _save(root, name):
    kwargs, scheduler_class, scheduler_kwargs, _, _ = MODELS[name]
    torch.manual_seed(sum(map(ord, name)))
    unet = diffusers.UNet2DModel(**kwargs)
    with torch.no_grad():  # random weights big enough that the output depends on them visibly
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = root / name
    unet.save_pretrained(folder / "unet")
    getattr(diffusers, scheduler_class)(**scheduler_kwargs).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", scheduler_class]}))
    return folder, unet.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The models above exported into one repository and served: (server target, {name: (folder, unet)})."""
    root = tmp_path_factory.mktemp("diffusers")
    repo = root / "repo"
    saved = {}
    for name, (_, _, _, null, _) in MODELS.items():
        saved[name] = _save(root, name)
        args = ["--null-class", str(null)] if null is not None else []
        proc = gen("export", "--from-diffusers", str(saved[name][0]), "--name", name, "--repo", str(repo), *args)
        assert proc.returncode == 0, proc.stderr
        assert "ddim_50_steps" in proc.stdout and f"exported {repo / name / '1'}" in proc.stdout
    server = start_server(repo, "--no-http", "--device", "cpu")
    try:
        yield server.target, saved
    finally:
        stop_server(server)


def _served(target, name, steps, labels, guidance):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        req = pb.GenerateRequest(model=name, n=len(labels) or 3, seed=SEED, labels=labels, sampler="ddim",
                                 steps=steps, eta=0.0, format=pb.RAW)
        if guidance is not None:
            req.guidance = guidance
        final = [e for e in stub.Generate(req, timeout=300) if e.HasField("result")][-1].result
    return tensor_from_pb(final.tensor, "tensor")


def _diffusers_ddim(folder, unet, steps, labels, guidance, shape, n):
    """diffusers' DDIMScheduler (from the saved config) stepping the same UNet from the server's x_T; classifier-free
    guidance as uncond + w (cond - uncond) with the null class."""
    config = diffusers.DDIMScheduler.load_config(folder / "scheduler")
    scheduler = diffusers.DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(np.stack([row_rng(SEED, i).standard_normal(shape, dtype=np.float32) for i in range(n)]))
    label = torch.tensor(labels) if labels else None
    with torch.no_grad():
        for t in scheduler.timesteps:
            tt = torch.full((n,), int(t), dtype=torch.int64)
            out = unet(x, tt, class_labels=label).sample
            if guidance is not None:
                null = torch.full_like(label, unet.config.num_class_embeds - 1)
                uncond = unet(x, tt, class_labels=null).sample
                out = uncond + guidance * (out - uncond)
            # gen's DDIM re-derives eps from the clipped x0 (serve/samplers/ddim.py)
            x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1).numpy()


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("name", list(MODELS))
def test_generate_equals_diffusers_ddim_loop(imported, name, steps):
    target, saved = imported
    folder, unet = saved[name]
    kwargs, _, _, null, guidance = MODELS[name]
    labels = [0, 2, 1] if kwargs.get("num_class_embeds") else []
    shape = (kwargs["in_channels"], kwargs["sample_size"], kwargs["sample_size"])
    got = _served(target, name, steps, labels, guidance)
    expected = _diffusers_ddim(folder, unet, steps, labels, guidance, shape, 3)
    assert got.shape == expected.shape == (3, *shape)
    assert np.abs(expected).max() > 0.05  # not a trivially flat image
    assert np.abs(got - expected).max() <= 1e-4


def test_a_model_without_null_class_refuses_guidance_and_the_null_label(imported):
    target, _ = imported
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for req, field in ((pb.GenerateRequest(model="cond-ddpm", n=1, guidance=2.0, steps=2), "guidance"),
                           (pb.GenerateRequest(model="cond-ddpm", n=1, labels=[-1], steps=2), "labels[0]")):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(req, timeout=60))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()


def test_every_sampler_serves_an_imported_model(imported):
    target, _ = imported
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for sampler in ("ddpm", "dpm++", "unipc", "euler_a"):
            req = pb.GenerateRequest(model="cond-v", n=2, labels=[1], sampler=sampler, steps=4, format=pb.RAW)
            x = tensor_from_pb([e for e in stub.Generate(req, timeout=60) if e.HasField("result")][-1].result.tensor,
                               "tensor")
            assert x.shape == (2, 1, 16, 16) and np.isfinite(x).all()


# --- what is refused: one line, non-zero exit, nothing written -------------------------------------------------

def _unet_config(folder, **config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case,match", [
    ("not-diffusers", "not a diffusers model"),
    ("text-unet", "UNet2DConditionModel"),
    ("scheduler", "scheduler EulerDiscreteScheduler is not supported"),
    ("no-weights", "weights are missing"),
    ("corrupt-weights", "weights could not be loaded"),
    ("no-scheduler", "no scheduler_config.json"),
    ("null-class", "--null-class 2: the UNet has 4 class embeddings"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, case, match):
    src = tmp_path / "src"
    if case == "not-diffusers":
        src.mkdir()
        (src / "weights.bin").write_bytes(b"\0" * 16)
    elif case == "text-unet":
        _unet_config(src, _class_name="UNet2DConditionModel", cross_attention_dim=768)
        diffusers.DDPMScheduler().save_pretrained(src)
    elif case == "scheduler":
        _unet_config(src, _class_name="UNet2DModel")
        diffusers.EulerDiscreteScheduler().save_pretrained(src)
    elif case == "no-weights":
        _unet_config(src, _class_name="UNet2DModel", sample_size=8, in_channels=1, out_channels=1)
        diffusers.DDPMScheduler().save_pretrained(src)
    elif case == "corrupt-weights":
        _unet_config(src, _class_name="UNet2DModel", sample_size=8, in_channels=1, out_channels=1)
        (src / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
        diffusers.DDPMScheduler().save_pretrained(src)
    elif case == "no-scheduler":
        _unet_config(src, _class_name="UNet2DModel")
    else:
        _unet_config(src, _class_name="UNet2DModel", num_class_embeds=4)
        diffusers.DDPMScheduler().save_pretrained(src)
    repo = tmp_path / "repo"
    args = ["--null-class", "2"] if case == "null-class" else []
    proc = gen("export", "--from-diffusers", str(src), "--name", "m", "--repo", str(repo), *args)
    assert_one_line_error(proc, match)
    assert not repo.exists() or not any(repo.rglob("*"))
