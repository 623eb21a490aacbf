"""Named starting points for `gen train NAME`: a family plus the options that suit its default data.

Each preset trains on the embedded data with no --data. Any option given on the command line
overrides the preset; --set KEY=VALUE overrides family fields.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # family-named presets: what `gen train vae|gan|pix2pix|cyclegan|diffusion` runs
    "vae": {"family": "vae", "data": "mnist", "steps": 3000, "batch_size": 64, "lr": 1e-3},
    "gan": {"family": "gan", "data": "mnist", "steps": 3000, "batch_size": 64, "lr": 2e-4,
            "family_options": {"arch": "dcgan"}},  # conditional (CGAN) because MNIST has labels
    "gan-mlp": {"family": "gan", "data": "mnist", "steps": 5000, "batch_size": 64, "lr": 2e-4,
                "family_options": {"arch": "mlp", "conditional": False}},
    # width 16 (reference 64): a quarter of the width-32 weights, so the shipped models fit in 30 MB.
    # pix2pix: the shapes' renders are lit from the top left, so a mirrored pair is lit from the top right and
    # the same label map has two answers: random flips made the net hedge between them (held-out PSNR 23.1 dB
    # against 26.1 on training pairs it had memorised). Without flips and without dropout (the render is a
    # function of the label map: dropout only adds noise to the L1 target), and with the learning rate
    # decayed over the second half, held-out PSNR went from 22.0 dB to the README's figure
    "pix2pix": {"family": "pix2pix", "data": "shapes", "steps": 6000, "batch_size": 16, "lr": 2e-4, "flip": False,
                "family_options": {"width": 16, "dropout": 0.0}},
    # cyclegan: the stripes run one way (/), so a mirrored striped image is not one of domain B: with random
    # flips the generators drew both ways, and gen eval's plain-vs-striped classifier took a mirrored held-out
    # B image for B 14% of the time. No normalisation in the generators: instance norm divides away a flat
    # shape's colour, and batch norm over 4 images serves with running statistics the net never trained on
    # (README, "Default models and quality", has the variants measured). Without normalisation the generators
    # start as the identity, and the cycle and identity losses at full weight kept two runs in three there:
    # they rise over the first 1,000 steps. Colour error was still falling at 8,000 steps
    "cyclegan": {"family": "cyclegan", "data": "stripes", "steps": 8000, "batch_size": 4, "lr": 2e-4, "flip": False,
                 "family_options": {"width": 16, "norm": "none", "cycle_warmup": 1000}},
    # gen eval (50 DDIM steps, n=1000): 1,500 steps gave Frechet distance 116x the real-vs-real baseline at
    # guidance 3, 4,000 steps 15x, 8,000 steps 12x; guidance trades class accuracy for Frechet distance, and at
    # 1.25 the 8,000-step model has 98.8% class accuracy and 1.6x the baseline (README, "Default models")
    "diffusion": {"family": "diffusion", "data": "mnist", "steps": 8000, "batch_size": 64, "lr": 1e-3,
                  "family_options": {"guidance": 1.25}},
    # rectified flow on the same U-Net as diffusion (trainer/models/flow.py). gen eval (20 Euler steps, n=1000):
    # guidance 1.0 gave 97.3% class accuracy and 0.82x the real-vs-real Frechet baseline, 1.25 99.1% and 1.40x,
    # 1.5 99.6% and 2.73x; 1.25 is the shipped default (guidance changes the grids, not the training)
    "flow": {"family": "flow", "data": "mnist", "steps": 6000, "batch_size": 64, "lr": 1e-3,
             "family_options": {"guidance": 1.25}},
    # a few-step student of the shipped mnist-diffusion (trainer/distill.py; `gen distill` fills these in for any
    # teacher): docs/samplers.md, "Few-step students", has how the numbers were chosen
    "diffusion-student": {"family": "diffusion", "data": "mnist", "steps": 4000, "batch_size": 64, "lr": 2e-4,
                          "family_options": {"distill_from": "exported/mnist-diffusion/1", "guidance": 1.25,
                                             "prediction": "v", "eps_below": 250,
                                             "trajectories": 10000,
                                             "student_sampler": {"1": "consistency", "2": "ddim", "4": "ddim"}}},
}


def preset_config(name: str, family_options: dict | None = None, **options):
    """A TrainConfig for a preset (or a bare family name), with options and family options overriding it."""
    from trainer.loop import TrainConfig

    preset = dict(PRESETS.get(name, {"family": name}))
    merged = {**preset.pop("family_options", {}), **(family_options or {})}
    if options.get("epochs") is not None:
        preset.pop("steps", None)
    return TrainConfig(**{**preset, "run_dir": f"runs/{name}", **options, "family_options": merged})
