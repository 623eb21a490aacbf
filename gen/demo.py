"""`make demo`: start `gen serve` on the shipped models in exported/ and call every task over gRPC.

It does what a client service would: lists the models, asks the conditional GAN and the VAE for
samples of every class, has the VAE reconstruct held-out digits, translates held-out images with
pix2pix and CycleGAN (sent as PNG bytes), runs diffusion, its student and the flow model while printing
their streamed progress, and edits held-out digits with the diffusion model (image-to-image and inpainting).
Every result is written as a PNG grid under demo-out/; the same seeds give the same grids, which are the ones README
shows.
"""
from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

COLUMNS = 10  # one column per digit class


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def _held_out(data: str, kind: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` held-out images (and labels or targets) as uint8 NHWC, what a client has on disk.

    Labelled splits are sorted by class, so those give the first images of each class in turn
    (image i of class i % classes): one column per class in a grid of that many columns.
    """
    from trainer.data import load_dataset

    ds = load_dataset(data, kind, 32)
    x, y = (v.numpy() for v in ds.test)
    if y.ndim == 1:
        classes = int(y.max()) + 1
        per_class = [np.flatnonzero(y == k) for k in range(classes)]
        order = [per_class[i % classes][i // classes] for i in range(count)]
    else:
        order = list(range(count))
    x, y = x[order].transpose(0, 2, 3, 1), y[order]
    return x, (y.transpose(0, 2, 3, 1) if y.ndim == 4 else y)


def _interleave(*rows: np.ndarray) -> np.ndarray:
    """Rows of images stacked so that a grid shows them one above the other, per block of COLUMNS."""
    blocks = []
    for i in range(0, len(rows[0]), COLUMNS):
        blocks.extend(r[i:i + COLUMNS] for r in rows)
    return np.concatenate(blocks)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from gen.defaults import DEFAULT_MODELS
    from serve.client import GenClient, Images, save_grid
    from serve.launch import start_server, stop_server

    parser = argparse.ArgumentParser(prog="python -m gen.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default="exported", type=Path, help="the model repository to serve")
    parser.add_argument("--out", default="demo-out", type=Path, help="where the PNG grids go")
    args = parser.parse_args(argv)
    repo, out = args.repo, args.out
    missing = [m.name for m in DEFAULT_MODELS if not (repo / m.name).is_dir()]
    if missing:
        print(f"gen: error: {repo}/ lacks the default models {', '.join(missing)}; "
              "`make models` trains and exports them", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:5.1f}s] {msg}", flush=True)

    say(f"starting `gen serve --repo {repo}` on 127.0.0.1 (port chosen by the OS)")
    server = start_server(repo)
    grids = []

    def save(name: str, pixels: np.ndarray, what: str) -> None:
        path = out / f"{name}.png"
        save_grid(pixels, str(path), COLUMNS)
        grids.append((path, what))
        say(f"wrote {path}: {what}")

    try:
        say(f"server ready on {server.target}")
        with GenClient(server.target, timeout=600) as client:
            for info in client.list_models():
                say(f"model {info.name} v{info.version}: {info.family}, task {info.task}")

            labels = [i % COLUMNS for i in range(80)]
            save("cgan-samples", client.sample("mnist-cgan", n=80, seed=0, labels=labels).pixels,
                 "conditional DCGAN, 8 samples of each digit (one column per class)")
            save("vae-samples", client.sample("mnist-vae", n=80, seed=0).pixels,
                 "VAE, 80 samples from the prior")

            digits, _ = _held_out("mnist", "images", 40)
            mean, _ = client.encode("mnist-vae", [_png(d) for d in digits])
            recon = client.decode("mnist-vae", mean).pixels
            save("vae-reconstructions", _interleave(digits, recon),
                 "VAE, held-out digits (odd rows, one column per class) and their reconstructions (even rows)")

            sources, targets = _held_out("shapes", "paired", 20)
            translated = client.translate("shapes-pix2pix", [_png(s) for s in sources]).pixels
            save("pix2pix-shapes", _interleave(sources, translated, targets),
                 "pix2pix, held-out label maps, translations, and the real targets (rows of 3)")

            plain, striped = _held_out("stripes", "unpaired", 20)
            ab = client.translate("stripes-cyclegan", [_png(s) for s in plain], direction="AtoB").pixels
            ba = client.translate("stripes-cyclegan", [_png(s) for s in striped], direction="BtoA").pixels
            save("cyclegan-stripes", _interleave(plain, ab, striped, ba),
                 "CycleGAN, plain -> striped and striped -> plain on held-out shapes (rows of 2)")

            # no guidance given: the model's default, the setting `gen eval` scores
            say("mnist-diffusion: 40 images, 4 of each digit, 50 DDIM steps, the model's guidance (streamed):")
            result: Images | None = None
            halfway = None
            for event in client.generate("mnist-diffusion", n=40, seed=0, labels=labels[:40], sampler="ddim",
                                         steps=50, preview_every=25):
                if isinstance(event, Images):
                    result = event
                    continue
                bar = "#" * (30 * event.step // event.total)
                print(f"\r  step {event.step:3d}/{event.total} [{bar:<30}]", end="", flush=True)
                if event.preview is not None and event.step == event.total // 2:
                    halfway = out / "diffusion-halfway.png"
                    save_grid(event.preview, str(halfway), COLUMNS)
            print(flush=True)
            grids.append((halfway, "the predicted clean images streamed at step 25 of 50"))
            save("diffusion-samples", result.pixels, "class-conditional diffusion, 4 of each digit")

            say("mnist-diffusion-student: the same 40 labels in 4 steps, one U-Net row per image-step (streamed):")
            for event in client.generate("mnist-diffusion-student", n=40, seed=0, labels=labels[:40]):
                if isinstance(event, Images):
                    result = event
                else:
                    print(f"\r  step {event.step}/{event.total}", end="", flush=True)
            print(flush=True)
            save("diffusion-student-samples", result.pixels,
                 "its distilled student at 4 steps, the same labels (compare with diffusion-samples)")

            say("mnist-flow: the same 40 labels, rectified flow, 20 Euler steps, the model's guidance (streamed):")
            for event in client.generate("mnist-flow", n=40, seed=0, labels=labels[:40], sampler="euler", steps=20):
                if isinstance(event, Images):
                    result = event
                else:
                    print(f"\r  step {event.step:2d}/{event.total}", end="", flush=True)
            print(flush=True)
            save("flow-samples", result.pixels, "class-conditional rectified flow, 4 of each digit, 20 Euler steps")

            # image-to-image: each held-out digit noised at strength 0.7 and denoised towards the next digit
            digits, classes = _held_out("mnist", "images", 20)
            targets = [(int(c) + 1) % COLUMNS for c in classes]
            say("mnist-diffusion image-to-image: 20 held-out digits at strength 0.7 towards the next digit, 20 DDIM "
                "steps:")
            *_, last = client.generate("mnist-diffusion", n=20, seed=0, labels=targets, sampler="ddim", steps=20,
                                       init=[_png(d) for d in digits], strength=0.7)
            save("diffusion-image-to-image", _interleave(digits, last.pixels),
                 "image-to-image at strength 0.7: held-out digits (odd rows) towards the next digit (even rows)")

            # inpainting: the lower half regenerated with the digit's own label, the upper half kept
            mask = np.zeros((32, 32, 1), np.uint8)
            mask[16:] = 255
            say("mnist-diffusion inpainting: the lower half of the same 20 digits regenerated, 20 DDIM steps:")
            *_, last = client.generate("mnist-diffusion", n=20, seed=0, labels=[int(c) for c in classes],
                                       sampler="ddim", steps=20, init=[_png(d) for d in digits], mask=[_png(mask)])
            masked = digits.copy()
            masked[:, 16:] = 0
            save("diffusion-inpainting", _interleave(masked, last.pixels),
                 "inpainting: held-out digits with the lower half removed (odd rows) and completed (even rows)")
    finally:
        code = stop_server(server)
        say(f"server stopped (exit status {code})")
    print(f"\ndone in {time.time() - t0:.0f} s. Grids:")
    for path, what in grids:
        print(f"  {path}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
