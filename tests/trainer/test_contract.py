"""One contract suite over every family: real training steps on embedded data, tiny nets."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from trainer.loop import CHECKPOINT, TrainingError, fit, load_run
from trainer.models import Family


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fit_writes_run_directory(family_name, tmp_path):
    run = tmp_path / "run"
    result = fit(tiny_config(family_name, run), progress=False)

    assert result.losses and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    assert (run / CHECKPOINT).exists()
    record = json.loads((run / "config.json").read_text())
    assert record["train"]["family"] == family_name and record["family"]["width"] == 8
    lines = _metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    grids = sorted((run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_000002.png", "step_000004.png"]
    assert Image.open(grids[-1]).size[0] > 32


def test_sample_shape_and_range(family_name, tmp_path):
    run = tmp_path / "run"
    fit(tiny_config(family_name, run, steps=2), progress=False)
    family, dataset, _ = load_run(run)
    info = dataset.info
    if info.kind == "images":
        batch = (torch.zeros(6, info.channels, 32, 32), torch.arange(6) % max(info.num_classes, 1))
        expected = 6
    else:
        batch = (torch.zeros(3, info.channels, 32, 32), torch.zeros(3, info.channels, 32, 32))
        expected = 9  # input | output | target (or reconstruction) triples
    out = family.sample(batch, seed=1)
    assert out.shape == (expected, info.channels, 32, 32)
    assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()
    assert torch.equal(out, family.sample(batch, seed=1)), "sample() must be a function of its seed"


def test_resume_is_exact(family_name, tmp_path):
    """2N steps in one go == N steps + resume + N steps (losses to 1e-6, CPU)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    config = lambda run: tiny_config(family_name, run, steps=6, checkpoint_every=100, sample_every=100)  # noqa: E731
    fit(config(straight), progress=False)
    fit(config(split), progress=False, stop_at=3)  # pre-empted after step 3
    fit(config(split), resume=True, progress=False)

    a, b = _metrics(straight), _metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for ma, mb in zip(a, b):
        for key in ma:
            if key not in ("step", "time"):
                assert abs(ma[key] - mb[key]) <= 1e-6, (key, ma["step"], ma[key], mb[key])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    # a real divergence: an absurd learning rate blows the VAE up within a few steps
    config = tiny_config("vae", run, steps=200, checkpoint_every=1, sample_every=1000, lr=1e12)
    with pytest.raises(TrainingError, match=r"step (\d+): loss \w+ is (nan|inf)") as info:
        fit(config, progress=False)
    failed_step = int(info.value.args[0].split(":")[0].split()[1])
    assert failed_step > 1 and "last good checkpoint" in str(info.value)
    ckpt = torch.load(run / CHECKPOINT, weights_only=False)
    assert ckpt["step"] == failed_step - 1
    for state in ckpt["family"]["nets"].values():
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_refuses_to_overwrite_a_run(tmp_path):
    from trainer.models import ConfigError

    run = tmp_path / "run"
    fit(tiny_config("vae", run, steps=1), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        fit(tiny_config("vae", run, steps=1), progress=False)


def test_epochs_sets_steps(tmp_path):
    run = tmp_path / "run"
    # digits train split has 1,437 images: one epoch at batch 512 is 3 steps
    result = fit(tiny_config("vae", run, epochs=1, batch_size=512), progress=False)
    assert result.steps == 3


def test_family_learning_rate_default_is_kept(tmp_path):
    """Without --lr each family keeps its own tuned default; with it, --lr wins."""
    from trainer.models.vae import VAEConfig

    result = fit(tiny_config("vae", tmp_path / "a", steps=1), progress=False)
    assert result.family.config.lr == VAEConfig().lr
    result = fit(tiny_config("vae", tmp_path / "b", steps=1, lr=3e-4), progress=False)
    assert result.family.config.lr == 3e-4


# --- the family contract holds: code reaches a family through its declaration, never its name ------------------

CONTRACT_PACKAGES = ("serve", "trainer", "gen")
# where a family's name may appear as a value: its own declaration, and the presets and shipped-model lists that
# name families on purpose
NAMING_ALLOWED = {"serve/families.py", "trainer/presets.py", "gen/defaults.py"}


def _family_name_uses(path, names: set[str]) -> list[str]:
    """`x == "gan"`, `x in ("vae", "gan")`, `{"gan": ...}[x]` and the like, as 'file:line: source'."""
    import ast

    tree = ast.parse(path.read_text())
    found = []

    def names_in(node) -> bool:  # a name itself, or a tuple, list or set of constants holding one
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(n, ast.Constant) and n.value in names for n in items)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and (names_in(node.left) or any(names_in(c) for c in node.comparators)):
            found.append(node)
        elif isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in names for k in node.keys):
            found.append(node)
        elif isinstance(node, ast.MatchValue) and names_in(node.value):
            found.append(node)
    return [f"{path}:{n.lineno}: {ast.get_source_segment(path.read_text(), n)}" for n in found]


def test_no_code_outside_the_registry_asks_for_a_family_by_name():
    from pathlib import Path

    from serve.families import FAMILIES

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for package in CONTRACT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel not in NAMING_ALLOWED:
                offenders += [f"{rel}{line.split(str(path))[1]}" for line in _family_name_uses(path, set(FAMILIES))]
    assert not offenders, "dispatch on the family's declaration (serve/families.py, trainer/models/base.py), " \
                          "not its name:\n" + "\n".join(offenders)


def test_the_name_check_catches_a_comparison(tmp_path):
    """The check above is not vacuous: it finds each form it looks for."""
    probe = tmp_path / "probe.py"
    probe.write_text('def f(m, k):\n    if m.family == "diffusion":\n        pass\n    x = {"gan": 0.9}\n'
                     '    match k:\n        case "vae":\n            pass\n    return m.family in ("cyclegan",)\n')
    found = _family_name_uses(probe, {"diffusion", "gan", "vae", "cyclegan"})
    assert len(found) == 4, found


def test_every_registered_family_has_a_trainer():
    from serve.families import FAMILIES
    from trainer.models import get_family

    for name, spec in FAMILIES.items():
        if spec.imported:  # written by `gen import` from a plain ONNX graph: nothing to train
            continue
        family = get_family(name)
        assert family.name == name and family.spec() is spec
        assert family.export_graphs is not Family.export_graphs, f"{name}: no export_graphs()"
        assert family.train_step is not Family.train_step, f"{name}: no train_step()"


def test_a_family_missing_its_trainer_is_refused(monkeypatch):
    import trainer.models as models
    from serve.families import DENOISE, FAMILIES, FamilySpec

    ghost = FamilySpec(name="ghost", task=DENOISE, data_kind="images", graphs=frozenset({"denoiser"}),
                       denoiser="denoiser")
    monkeypatch.setitem(FAMILIES, "ghost", ghost)
    with pytest.raises(RuntimeError, match="ghost"):
        models._registry()


def test_the_contract_suite_covers_every_family():
    from serve.families import FAMILIES
    from tests.conftest import TINY

    trained = {name for name, spec in FAMILIES.items() if not spec.imported}
    assert set(TINY) == trained, "add a tiny config for the new family to tests/conftest.py's TINY"
