"""The family contract, declared once: what each model family trains on, exports and how it is served.

Standard library only: the trainer (export, data loading, evaluation) and the server (manifest checks, task
dispatch) both read this table, and neither imports the other. Code dispatches on these fields, never on a
family's name. Adding a family is its trainer file (trainer/models/<name>.py, a Family subclass with this name)
plus one line in FAMILIES.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SAMPLE, TRANSLATE, DENOISE = "sample", "translate", "denoise"  # the tasks (gen.v1: Sample, Translate, Generate)
GRAPH = "graph"  # the task of a plain graph: tensors in, tensors out, served over OIP only (no gen.v1 task)
GAUSSIAN = "gaussian"  # a latent kind (FamilySpec.latent)


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    name: str
    task: str  # SAMPLE: z [, label] -> image; TRANSLATE: image -> image; DENOISE: a diffusion denoiser; GRAPH
    data_kind: str  # trainer.data's kind: "images", "paired" or "unpaired"; "" for an imported family
    graphs: frozenset[str]  # the graphs every export ships
    legacy_graphs: frozenset[str] = frozenset()  # accepted in older exports, not needed any more
    generator: str | None = None  # SAMPLE: the graph that draws images from latents (and labels)
    latent: str = ""  # SAMPLE: how the generator's `z` is drawn per image: GAUSSIAN, N(0, I) of z's shape
    encoder: str | None = None  # SAMPLE: image [, label] -> mean, logvar (Encode), if the family has one
    directions: dict[str, str] = field(default_factory=dict)  # TRANSLATE: "AtoB"/"BtoA" -> graph
    # DENOISE: x_t, t [, label] -> the network's output; the manifest's `diffusion` section says what t and the
    # output are (schedule, prediction: serve/samplers/schedule.py), so samplers and the loop need nothing else
    denoiser: str | None = None
    # written by `gen import` (trainer/onnx_import.py) from a plain ONNX graph, not trained: no trainer file, no
    # image section, tensors and batching as the graph declares them (serving.max_batch_size 0: unbatched)
    imported: bool = False

    @property
    def images(self) -> bool:
        """Its models take or make images: the manifest has an `image` section, gen.v1 has a task for them."""
        return self.task != GRAPH


FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (
    FamilySpec(name="vae", task=SAMPLE, data_kind="images", graphs=frozenset({"encoder", "decoder"}),
               generator="decoder", latent=GAUSSIAN, encoder="encoder"),
    FamilySpec(name="gan", task=SAMPLE, data_kind="images", graphs=frozenset({"generator"}), generator="generator",
               latent=GAUSSIAN),
    FamilySpec(name="pix2pix", task=TRANSLATE, data_kind="paired", graphs=frozenset({"generator"}),
               directions={"AtoB": "generator"}),
    FamilySpec(name="cyclegan", task=TRANSLATE, data_kind="unpaired",
               graphs=frozenset({"generator_ab", "generator_ba"}),
               directions={"AtoB": "generator_ab", "BtoA": "generator_ba"}),
    FamilySpec(name="diffusion", task=DENOISE, data_kind="images", graphs=frozenset({"denoiser"}),
               legacy_graphs=frozenset({"step"}), denoiser="denoiser"),  # "step": the pre-registry sampler graph
    FamilySpec(name="flow", task=DENOISE, data_kind="images", graphs=frozenset({"denoiser"}), denoiser="denoiser"),
    FamilySpec(name="onnx", task=GRAPH, data_kind="", graphs=frozenset({"model"}), imported=True),
)}
IMPORTED = next(f for f in FAMILIES.values() if f.imported)  # the family `gen import` writes


def family_spec(name: str) -> FamilySpec:
    """The family's spec; ValueError naming the known ones."""
    spec = FAMILIES.get(name)
    if spec is None:
        raise ValueError(f"unknown family {name!r}: use one of {', '.join(FAMILIES)}")
    return spec
