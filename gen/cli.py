"""The `gen` command line. Heavy imports (torch, onnxruntime, grpc) happen inside each command."""
from __future__ import annotations

import dataclasses
import json
import sys

import click

from serve.families import DENOISE, FAMILIES
from serve.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS

SAMPLER_NAMES = tuple(SAMPLERS)


class UserError(click.ClickException):
    """One line on stderr, exit status 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.exit_code = code

    def show(self, file=None) -> None:
        click.echo(f"gen: error: {self.format_message()}", err=True)


def _user_errors():
    """The exception types that are the user's to fix (bad options, bad data, diverged training)."""
    from trainer.data import DataError
    from trainer.loop import TrainingError
    from trainer.models import ConfigError

    return (ConfigError, DataError, TrainingError)


def _parse_set(values: tuple[str, ...]) -> dict:
    options = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item}: use KEY=VALUE, e.g. --set arch=mlp")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw  # a bare word: a string option such as arch=mlp
    return options


class TrainCommand(click.Command):
    """Appends the presets and every family's options to `gen train --help`."""

    def format_epilog(self, ctx, formatter):
        import dataclasses

        from trainer.models import FAMILY_NAMES, get_family
        from trainer.presets import PRESETS

        with formatter.section("Presets (NAME)"):
            formatter.write_dl([(name, _describe_preset(p)) for name, p in PRESETS.items()])
        for name in FAMILY_NAMES:
            cls = get_family(name)
            rows = []
            for f in dataclasses.fields(cls.Config):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((f"{f.name}={json.dumps(default)}", str(f.type)))
            with formatter.section(f"--set options of {name} (trains on {cls.spec().data_kind} data)"):
                formatter.write_dl(rows)
        with formatter.section("Data layouts (--data)"):
            formatter.write_text(
                "Embedded: mnist, digits (images); shapes (paired); stripes (unpaired). "
                "Folders: DIR/<class>/*.png or DIR/*.png (vae, gan, diffusion); DIR/train/*.png with A|B "
                "side by side, optional DIR/test/ (pix2pix); DIR/trainA, DIR/trainB, optional "
                "DIR/testA, DIR/testB (cyclegan).")


def _describe_preset(p: dict) -> str:
    extra = " ".join(f"{k}={v}" for k, v in p.get("family_options", {}).items())
    return f"{p['family']} on {p['data']}, {p['steps']} steps, batch {p['batch_size']}, lr {p['lr']} {extra}".strip()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="gen")
def cli():
    """Train generative image models, export them to ONNX, serve them over gRPC."""


@cli.command(cls=TrainCommand)
@click.argument("name")
@click.option("--data", help="Embedded dataset name or a folder (see Data layouts). Default: the preset's.")
@click.option("--image-size", type=int, help="Images are resized to SIZE x SIZE. [default: 32]")
@click.option("--channels", type=click.Choice(["1", "3"]), help="1 greyscale, 3 RGB. [default: from the data]")
@click.option("--direction", type=click.Choice(["AtoB", "BtoA"]), help="Paired/unpaired data: input side.")
@click.option("--steps", type=int, help="Optimisation steps. [default: the preset's]")
@click.option("--epochs", type=int, help="Train for whole passes over the data instead of --steps.")
@click.option("--batch-size", type=int, help="Examples per step (per process under torchrun).")
@click.option("--lr", type=float, help="Learning rate.")
@click.option("--seed", type=int, help="Seed for weights, data order and noise. [default: 0]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[default: auto]")
@click.option("--run-dir", help="Where config, metrics, samples and checkpoints go. [default: runs/NAME]")
@click.option("--sample-every", type=int, help="Steps between sample grids. [default: 500]")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints. [default: 500]")
@click.option("--log-every", type=int, help="Steps between metrics lines. [default: 10]")
@click.option("--no-flip", is_flag=True, help="Translators: no random horizontal flips.")
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE",
              help="A family option (see below), e.g. --set arch=mlp --set loss=hinge. Repeatable.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its checkpoint.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: on a terminal]")
def train(name, set_, resume, progress, no_flip, **options):
    """Train NAME, a preset or a family (both listed below).

    With no --data it trains on the embedded default data. Writes config.json, metrics.jsonl,
    samples/*.png and checkpoint.pt into --run-dir. Under torchrun it trains data-parallel
    (DistributedDataParallel; nccl on CUDA, gloo on CPU).
    """
    from trainer.models import FAMILY_NAMES
    from trainer.presets import PRESETS

    if name not in PRESETS and name not in FAMILY_NAMES:
        raise UserError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) "
                        f"or a family ({', '.join(FAMILY_NAMES)})")
    try:
        from trainer.loop import fit
        from trainer.presets import preset_config

        given = {k: v for k, v in options.items() if v is not None}
        if "channels" in given:
            given["channels"] = int(given["channels"])
        config = preset_config(name, _parse_set(set_), **given)
        if no_flip:
            config.flip = False
        result = fit(config, resume=resume, progress=progress)
    except _user_errors() as e:
        raise UserError(str(e)) from None
    losses = " ".join(f"{k}={v:.4f}" for k, v in result.losses.items())
    click.echo(f"trained {result.steps} steps in {result.seconds} s: {losses}")
    click.echo(f"run: {result.run_dir} (checkpoint.pt, samples/, metrics.jsonl, config.json)")


@cli.command("distill")
@click.argument("teacher", type=click.Path(file_okay=False))
@click.option("--steps", type=int, help="Optimisation steps. [default: the diffusion-student preset's]")
@click.option("--batch-size", type=int, help="Examples per step (per process under torchrun).")
@click.option("--lr", type=float, help="Learning rate. [default: the preset's]")
@click.option("--seed", type=int, help="Seed for the trajectories, their order and the weights. [default: 0]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[default: auto]")
@click.option("--run-dir", help="Where config, metrics, samples and checkpoints go. [default: runs/<teacher>-student]")
@click.option("--sample-every", type=int, help="Steps between sample grids. [default: 500]")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints. [default: 500]")
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE",
              help="A diffusion option, e.g. --set student_steps=[1,2,4] --set trajectories=20000. Repeatable.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its checkpoint.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: on a terminal]")
def distill_cmd(teacher, set_, resume, progress, **options):
    """Distil a few-step student from TEACHER, an exported diffusion model (e.g. exported/mnist-diffusion/1).

    The same as `gen train diffusion-student --set distill_from=TEACHER`, with the teacher's architecture, data
    and guidance filled in from its manifest. The student starts from the teacher's weights, learns where the
    teacher's trajectories end, takes the guidance scale as an input, and is served with --set student_sampler
    (default ddim) at --set student_steps steps (default 1, 2, 4). Export it with `gen export` like any run: it
    serves next to its teacher.
    """
    from trainer.distill import TeacherError, load_teacher
    from trainer.models import get_family

    try:
        from trainer.loop import fit
        from trainer.presets import preset_config

        t = load_teacher(teacher)
        student = get_family(get_family(t.manifest["family"]).student_family)  # load_teacher checked it has one
        family_options = {k: t.config[k] for k in (*student.TEACHER_FIELDS, "guidance") if k in t.config}
        if "eps_below" in {f.name for f in dataclasses.fields(student.Config)}:
            # the preset keeps an eps teacher's own prediction below its 4-step grid's last timestep (250 of 1000);
            # a teacher that predicts v has none to keep
            family_options["eps_below"] = t.schedule.T // 4 if t.schedule.prediction == "eps" else 0
        family_options.update(distill_from=str(t.path), **_parse_set(set_))
        given = {k: v for k, v in options.items() if v is not None}
        given.setdefault("run_dir", f"runs/{t.manifest['name']}-student")
        config = preset_config("diffusion-student", family_options, data=t.manifest["provenance"]["dataset"],
                               image_size=t.manifest["image"]["height"], **given)
        result = fit(config, resume=resume, progress=progress)
    except (*_user_errors(), TeacherError) as e:
        raise UserError(str(e)) from None
    losses = " ".join(f"{k}={v:.4f}" for k, v in result.losses.items())
    click.echo(f"distilled {result.steps} steps in {result.seconds} s: {losses}")
    click.echo(f"run: {result.run_dir}; export it with `gen export {result.run_dir} --name NAME`")


@cli.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False), required=False)
@click.option("--from-diffusers", "diffusers_dir", type=click.Path(),
              help="Instead of RUN_DIR: a diffusers UNet2DModel folder or pipeline (save_pretrained's output, with "
              "its DDPMScheduler or DDIMScheduler config).")
@click.option("--null-class", type=int, help="--from-diffusers: the label the UNet was trained to read as no class "
              "(its last class embedding); enables classifier-free guidance.")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="--from-diffusers: a request's default guidance scale (needs --null-class unless 1).")
@click.option("--name", required=True, help="Model name in the repository ([a-z0-9][a-z0-9._-]*).")
@click.option("--version", "version", type=int, help="Version number. [default: the next free one]")
@click.option("--repo", default="exported", show_default=True, help="The model repository folder.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (17 to 21).")
@click.option("--fp16", is_flag=True, help="Also write a half-precision variant of each graph (for CUDA).")
@click.option("--max-batch-size", type=int, default=64, show_default=True, help="Serving default.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Also a calibrated static int8 variant of the graphs "
              "(for `gen serve --precision int8`), kept only if it is faster and scores as well (diffusion models).")
@click.option("--int8-min-speedup", type=click.FloatRange(0), help="--quantize: the int8 graph's speed over fp32 at "
              "batch 64 below which it is not kept. [default: 1.8]")
@click.option("--int8-eval-n", type=click.IntRange(10), default=1000, show_default=True,
              help="--quantize: samples gen eval scores fp32 and int8 on.")
def export_cmd(run_dir, diffusers_dir, null_class, guidance, name, version, repo, opset, fp16, max_batch_size,
               quantize, int8_min_speedup, int8_eval_n):
    """Export a trained run (or, with --from-diffusers, a diffusers UNet) to REPO/NAME/VERSION/ as verified ONNX
    graphs plus manifest.json.

    Refuses to write a version whose graphs fail onnx.checker or differ from PyTorch by more than
    1e-4 (fp16: 1e-2); diffusion models also pass a 50-step DDIM loop (a student: its own sampler at its most steps)
    through the served loop within 1e-3.
    """
    if (run_dir is None) == (diffusers_dir is None):
        raise UserError("give RUN_DIR or --from-diffusers DIR (one of them): gen export RUN_DIR --name NAME")
    if diffusers_dir is None and (null_class is not None or guidance != 1.0):
        raise UserError("--null-class and --guidance go with --from-diffusers (a run's manifest has its own)")
    try:
        from trainer.export import ExportError, export_model
        from trainer.quantize import QuantizeError

        if diffusers_dir is not None:
            if fp16 or quantize:
                raise UserError(f"{'--fp16' if fp16 else '--quantize'} is not supported with --from-diffusers yet")
            from trainer.from_diffusers import export_from_diffusers

            path = export_from_diffusers(diffusers_dir, name, repo=repo, version=version, opset=opset,
                                         null_class=null_class, guidance=guidance, max_batch_size=max_batch_size,
                                         log=click.echo)
        else:
            path = export_model(run_dir, name, repo=repo, version=version, opset=opset, fp16=fp16,
                                max_batch_size=max_batch_size, quantize=quantize, int8_min_speedup=int8_min_speedup,
                                int8_eval_n=int8_eval_n, log=click.echo)
    except (*_user_errors(), ExportError, QuantizeError) as e:
        raise UserError(str(e)) from None
    click.echo(f"exported {path}")


@cli.command("import")
@click.argument("graph", type=click.Path())  # checked by the importer: a missing file is one line, not click's usage
@click.option("--name", required=True, help="Model name in the repository ([a-z0-9][a-z0-9._-]*); served over OIP "
              "as NAME.model.")
@click.option("--version", "version", type=int, help="Version number. [default: the next free one]")
@click.option("--repo", default="exported", show_default=True, help="The model repository folder.")
@click.option("--batch/--no-batch", "batch", default=None,
              help="Serve the first dimension as a batch axis (merging requests) or the graph as it is. "
              "[default: batched when every input and output has a dynamic first dimension]")
@click.option("--max-batch-size", type=int, help="Serving default of a batched graph. [default: 64]")
def import_cmd(graph, name, version, repo, batch, max_batch_size):
    """Import a plain ONNX graph as REPO/NAME/VERSION/ (model.onnx plus manifest.json), served over OIP v2.

    Inputs and outputs come from the graph (float32, float16 and int64 tensors). Refuses a file that onnx.checker
    (full check) refuses or that fails one onnxruntime run on random inputs; nothing is written then.
    """
    from serve.manifest import ManifestError
    from trainer.onnx_import import GraphImportError, import_graph

    try:
        path = import_graph(graph, name, repo=repo, version=version, batch=batch, max_batch_size=max_batch_size,
                            log=click.echo)
    except (GraphImportError, ManifestError, OSError) as e:
        raise UserError(str(e)) from None
    click.echo(f"imported {path}: serve it with `gen serve --repo {repo}`, infer {name}.model over OIP")


@cli.command("models")
@click.option("--repo", default="exported", show_default=True, help="The model repository folder.")
@click.option("--verify", is_flag=True, help="Re-hash every graph file and report broken models.")
@click.option("--triton", "triton_out", type=click.Path(file_okay=False),
              help="Instead, write the latest healthy version of every model to this new folder as a Triton "
              "model repository: <model>.<graph>/<version>/model.onnx and config.pbtxt.")
def models_cmd(repo, verify, triton_out):
    """List the model repository: name, versions, family, task, graphs, size."""
    from pathlib import Path

    from serve.manifest import scan_repository

    root = Path(repo)
    if not root.is_dir():
        raise UserError(f"--repo {repo}: no such folder; export a model with `gen export RUN_DIR --name NAME`")
    if triton_out:
        from serve.triton_repository import TritonExportError, write_triton_repository

        try:
            written = write_triton_repository(root, Path(triton_out))
        except (TritonExportError, OSError) as e:
            raise UserError(f"--triton {e}") from None
        for w in written:
            click.echo(f"{w.path}/config.pbtxt and {w.version}/model.onnx")
        click.echo(f"wrote {len(written)} Triton models to {triton_out}: "
                   f"tritonserver --model-repository {Path(triton_out).resolve()}")
        return
    entries = scan_repository(root, verify=verify)
    if not entries:
        click.echo(f"{repo}: no models; export one with `gen export RUN_DIR --name NAME`")
        return
    click.echo(f"{'NAME':<24} {'VERSION':>7}  {'FAMILY':<10} {'TASK':<10} {'SIZE':>9}  GRAPHS / STATUS")
    broken = 0
    for e in entries:
        size = sum(f.stat().st_size for f in e.path.iterdir() if f.is_file())
        if e.manifest is not None:
            family, task, graphs = e.manifest.family, e.manifest.task, ", ".join(sorted(e.manifest.graphs))
        else:
            family, task, graphs = "?", "?", ""
        status = graphs if e.healthy else f"BROKEN: {'; '.join(e.problems)}"
        broken += not e.healthy
        click.echo(f"{e.name:<24} {e.version:>7}  {family:<10} {task:<10} {size / 1e6:>7.2f}MB  {status}")
    if verify:
        click.echo(f"{len(entries) - broken} healthy, {broken} broken")
        if broken:
            raise SystemExit(1)


@cli.command("eval")
@click.argument("models", nargs=-1)
@click.option("--repo", default="exported", show_default=True, help="The model repository folder.")
@click.option("-n", "n", type=int, default=1000, show_default=True, help="Samples per generator.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples.")
# gen eval scores diffusion at the setting README's quality table and docs/quality.json were measured at
@click.option("--sampler", type=click.Choice(list(SAMPLER_NAMES)),
              help="Diffusion sampler. [default: ddim; a distilled student: its own]")
@click.option("--steps", type=int, help="Diffusion steps. [default: 50; a distilled student: each of its counts]")
@click.option("--guidance", type=float, help="Diffusion guidance scale. [default: the model's]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the reports as JSON; a report replaces the file's row of the same model, setting and "
              "seed, and its other rows stay.")
@click.option("--check", is_flag=True, help="Exit 1 when a metric misses the project's quality bar.")
@click.option("--sweep", "sweep_steps", help="Diffusion: score every sampler at these step counts (e.g. 5,10,20,50) "
              "instead of one setting; with --json, settings already in the file are kept (a rerun resumes).")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="int8: score the graphs' int8 variants (gen export --quantize int8) as `gen serve --precision "
              "int8` runs them.")
@click.option("--seeds", "seeds_spec", help="Score at each of these seeds instead of one (e.g. 0-9 or 0,4,7) and "
              "print each metric's mean, standard deviation and range over them: at n = 1,000 one seed's Frechet "
              "distance moves by tens of percent, so compare models over several. With --check every seed must pass.")
def eval_cmd(models, repo, n, seed, sampler, steps, guidance, json_path, check, sweep_steps, precision, seeds_spec):
    """Score MODELS (default: every trained model in --repo; not imported graphs) through the serving runtime.

    Generators: Frechet distance in the feature space of a classifier trained on the training split,
    next to the real-vs-real baseline, and per-class accuracy of conditional samples; VAE also the
    class accuracy of held-out reconstructions. pix2pix: L1 and PSNR on held-out pairs (on the embedded
    shapes also the shapes' colour error against the target). CycleGAN: domain-classifier accuracy of
    translations both ways and cycle L1 (on the embedded stripes also colour error and shape IoU: does
    the translation keep the shape and its colour). Classifiers are trained once and cached in
    $GEN_CACHE (default ~/.cache/gen). Nothing is downloaded.
    """
    import json
    from pathlib import Path

    from serve.manifest import scan_repository
    from trainer.evaluate import EvalConfig, EvalError, across_seeds, evaluate_all, merge_reports, parse_seeds
    from trainer.loop import atomic_write

    seeds = [seed]
    if seeds_spec:
        if click.get_current_context().get_parameter_source("seed") is not click.core.ParameterSource.DEFAULT:
            raise UserError("--seed and --seeds: give one of them")
        if sweep_steps:
            raise UserError("--sweep scores one seed: run it once per --seed instead of --seeds")
        try:
            seeds = parse_seeds(seeds_spec)
        except EvalError as e:
            raise UserError(str(e)) from None
    # a file that cannot take the reports is refused before minutes of scoring
    rows = _report_rows(json_path) if json_path and not sweep_steps else []
    root = Path(repo)
    if not root.is_dir():
        raise UserError(f"--repo {repo}: no such folder; export a model with `gen export RUN_DIR --name NAME`")
    names = list(models) or sorted({e.name for e in scan_repository(root)  # imported graphs have nothing to score
                                    if e.healthy and not FAMILIES[e.manifest.family].imported})
    if not names:
        raise UserError(f"--repo {repo}: no healthy models to evaluate")
    config = EvalConfig(n=n, seed=seed, sampler=sampler, steps=steps, guidance=guidance, precision=precision)
    if sweep_steps:
        return _sweep(root, names, config, sweep_steps, json_path)
    reports = []
    for name, at_seed in ((name, s) for name in names for s in seeds):
        try:
            found = evaluate_all(root, name, config=dataclasses.replace(config, seed=at_seed),
                                 log=lambda msg: click.echo(f"  {msg}", err=True))
        except EvalError as e:
            raise UserError(str(e)) from None
        for report in found:
            reports.append(report)
            sampling = report.details.get("sampling")
            at = f", {sampling['sampler']} {sampling['steps']} steps" if sampling else ""
            click.echo(f"{report.model} v{report.version} ({report.family}, {report.dataset}{at}, "
                       f"{report.seconds} s)")
            for metric in report.metrics:
                click.echo(f"  {metric.line()}")
            for key, value in report.details.items():
                click.echo(f"  {key}: {value}")
    if seeds_spec:
        for line in across_seeds(reports):
            click.echo(line)
    if json_path:
        text = json.dumps(merge_reports(rows, reports), indent=2) + "\n"
        atomic_write(Path(json_path), lambda f: f.write(text.encode()))
    if check and not all(r.passed for r in reports):
        failed = list(dict.fromkeys(r.model for r in reports if not r.passed))  # once, whatever the seeds
        raise UserError(f"below the quality bar: {', '.join(failed)}", code=1)


def _report_rows(json_path: str) -> list[dict]:
    """The reports a `gen eval --json` file holds already; none when it does not exist."""
    from pathlib import Path

    path = Path(json_path)
    try:
        rows = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--json {json_path}: cannot read it as gen eval's reports ({e}); give another path") from None
    if not (isinstance(rows, list) and all(isinstance(r, dict) and "model" in r and "metrics" in r for r in rows)):
        raise UserError(f"--json {json_path}: not a file of gen eval's reports; give another path")
    return rows


def _sweep(root, names: list[str], config, sweep_steps: str, json_path: str | None) -> None:
    """gen eval --sweep: every sampler at every step count, one row each; resumable through --json."""
    import dataclasses
    import json
    from pathlib import Path

    from serve.manifest import scan_repository
    from trainer.evaluate import EvalError, evaluate
    from trainer.loop import atomic_write

    try:
        counts = [int(v) for v in sweep_steps.split(",")]
    except ValueError:
        raise UserError(f"--sweep {sweep_steps}: expected step counts separated by commas, e.g. 5,10,20,50") from None
    path = Path(json_path) if json_path else None
    rows = json.loads(path.read_text()) if path and path.is_file() else []
    students = {e.name for e in scan_repository(root) if e.healthy and e.manifest.student}
    for name in names:
        if name in students:  # it samples only as trained: `gen eval` without --sweep scores each of its counts
            click.echo(f"{name}: a distilled student, skipped by --sweep (plain `gen eval {name}` scores it)", err=True)
            continue
        for sampler in SAMPLER_NAMES:
            for steps in counts:
                key = dict(model=name, sampler=sampler, steps=steps, n=config.n, seed=config.seed)
                if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
                    continue
                cfg = dataclasses.replace(config, sampler=sampler, steps=steps)
                try:
                    report = evaluate(root, name, config=cfg, log=lambda msg: click.echo(f"  {msg}", err=True))
                except EvalError as e:
                    raise UserError(str(e)) from None
                if FAMILIES[report.family].task != DENOISE:
                    raise UserError(f"--sweep: {name} is a {report.family} model; the sweep is for denoising "
                                    "models (diffusion, flow)")
                metrics = {m.name: m.value for m in report.metrics}
                rows.append({**key, "class_accuracy": metrics.get("class accuracy"),
                             "frechet_ratio": metrics["frechet / baseline"],
                             "seconds_per_image": report.details["seconds_per_sample"]})
                click.echo("{model} {sampler:8} {steps:3} steps: accuracy {class_accuracy}, Frechet/baseline "
                           "{frechet_ratio:.3f}, {seconds_per_image:.4f} s/image".format(**rows[-1]))
                if path:
                    text = json.dumps(rows, indent=2) + "\n"
                    atomic_write(path, lambda f, text=text: f.write(text.encode()))


@cli.command("serve")
@click.option("--repo", default="exported", show_default=True, help="The model repository folder.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--port", type=int, default=50051, show_default=True, help="gRPC port; 0 picks a free one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (GPU N).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="OIP v2 over HTTP/REST (and /metrics) on this port; 0 picks a free one.")
@click.option("--no-http", is_flag=True, help="Serve no REST port (gRPC only).")
@click.option("--metrics-port", type=int, help="Also serve /metrics on this port of its own.")
@click.option("--max-batch-size", type=int, help="Per graph. [default: each manifest's]")
@click.option("--max-queue-delay-ms", type=float, help="How long a batch waits to fill. [default: manifest]")
@click.option("--max-queue-size", type=int, default=1024, show_default=True,
              help="Queued requests per graph before RESOURCE_EXHAUSTED.")
@click.option("--allow-repository-control", is_flag=True, help="Allow RepositoryModelLoad/Unload.")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="Seconds in-flight requests get to finish on SIGTERM.")
@click.option("--drain-delay", type=click.FloatRange(0), default=0.0, show_default=True,
              help="On SIGTERM, first report not ready (health, /v2/health/ready) and go on serving this many "
              "seconds, so that balancers following readiness move away before the port closes.")
@click.option("--max-images", type=click.IntRange(1), default=256, show_default=True,
              help="Images (n, or tensor rows) per request.")
@click.option("--max-steps", type=click.IntRange(1), default=1000, show_default=True,
              help="Diffusion steps per Generate request.")
@click.option("--max-message-mb", type=click.FloatRange(0.001), default=64.0, show_default=True,
              help="Largest gRPC message in or out; larger requests get RESOURCE_EXHAUSTED.")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads per session. "
              "[default: the cores this process may use]")
@click.option("--spin/--no-spin", default=True, show_default=True,
              help="Idle onnxruntime threads spin; --no-spin gives the cores back (for hosts shared with other work).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate chain: serve TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False),
              help="PEM CA: require client certificates signed by it (mutual TLS).")
@click.option("--auth-token-file", type=click.Path(exists=True, dir_okay=False),
              help="Require 'authorization: Bearer TOKEN' (a token per line; $GEN_AUTH_TOKEN adds one).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Server processes sharing the ports (SO_REUSEPORT), each with its own copy of the models.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="int8: run each graph's int8 variant on the CPU where its model has one (gen export --quantize "
              "int8); other graphs stay fp32.")
def serve_cmd(repo, host, port, device, http_port, no_http, metrics_port, max_batch_size, max_queue_delay_ms,
              max_queue_size, allow_repository_control, grace, drain_delay, max_images, max_steps, max_message_mb,
              threads, spin, tls_cert, tls_key, tls_client_ca, auth_token_file, workers, precision):
    """Serve the model repository until SIGTERM: gRPC (KServe OIP v2 and gen.v1.Generator) on --port, OIP v2
    over REST and Prometheus /metrics on --http-port.

    TLS and the bearer token apply to every port. Health checks (grpc.health.v1, /v2/health/*) need no token.
    """
    import asyncio
    import logging
    from pathlib import Path

    from serve.manifest import scan_repository
    from serve.session import parse_device

    try:
        parse_device(device)
    except ValueError:
        raise UserError(f"--device {device}: use auto, cpu, cuda or cuda:N (N = the GPU's index)") from None
    if workers > 1 and allow_repository_control:
        raise UserError("--allow-repository-control with --workers: a load or unload would reach one worker only; "
                        "serve with one worker, or restart the workers to change the models")
    healthy = [e for e in scan_repository(Path(repo)) if e.healthy]
    if not healthy:
        raise UserError(f"--repo {repo}: no models to serve; train and export one first, e.g. "
                        f"`gen train gan && gen export runs/gan --name mnist-cgan --repo {repo}`")
    from serve.auth import load_tokens
    from serve.errors import ServeError
    from serve.server import ServerConfig, serve_forever, tls_credentials

    try:
        tokens = load_tokens(auth_token_file)
    except ValueError as e:
        raise UserError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(repo=repo, host=host, port=port, http_port=None if no_http else http_port, device=device,
                          metrics_port=metrics_port,
                          max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                          max_queue_size=max_queue_size, allow_repository_control=allow_repository_control,
                          grace_s=grace, drain_delay_s=drain_delay, max_images=max_images, max_steps=max_steps,
                          threads=threads, spin=spin, precision=precision,
                          max_message_bytes=int(max_message_mb * 1024 * 1024), tls_cert=tls_cert, tls_key=tls_key,
                          tls_client_ca=tls_client_ca, auth_tokens=tokens, freeze_heap=True)
    try:
        tls_credentials(config)  # bad PEM files or a missing half: one line now, not a traceback later
    except ValueError as e:
        raise UserError(str(e)) from None

    def ready_line(info: dict) -> None:
        names = sorted({e.name for e in healthy})
        scheme = "https" if tls_cert else "http"
        extra = f", REST on {scheme}://{host}:{info['http']}" if info["http"] is not None else ""
        extra += f", metrics on {scheme}://{host}:{info['metrics']}/metrics" if info["metrics"] else ""
        extra += f", {workers} workers" if workers > 1 else ""
        security = ("TLS" + (" with client certificates" if tls_client_ca else "")) if tls_cert else "plaintext"
        security += ", bearer token required" if tokens else ""
        click.echo(f"serving {len(names)} models ({', '.join(names)}) on {host}:{info['grpc']} "
                   f"[{info['device']}; {security}]{extra}", err=False)
        sys.stdout.flush()

    try:
        if workers > 1:
            from serve.workers import run_workers

            sys.exit(run_workers(config, workers, ready_line))
        asyncio.run(serve_forever(config, lambda server, bound: ready_line(
            {"grpc": bound, "http": server.http_port, "metrics": server.metrics_port,
             "device": server.runtime.device})))
    except (ServeError, OSError, ValueError) as e:
        raise UserError(str(e)) from None


def _client_options(fn):
    fn = click.option("--token", envvar="GEN_AUTH_TOKEN", help="Bearer token. [default: $GEN_AUTH_TOKEN]")(fn)
    fn = click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
                      help="Read the bearer token from this file.")(fn)
    fn = click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
                      help="PEM CA (or the server's certificate): connect with TLS.")(fn)
    fn = click.option("--server", default="127.0.0.1:50051", show_default=True,
                      help="HOST:PORT of `gen serve`; replicas: IP:PORT,IP:PORT,... or dns:///NAME:PORT "
                      "(calls go round-robin).")(fn)
    fn = click.option("--model", required=True, help="Model name (see ListModels / `gen models`).")(fn)
    fn = click.option("--version", "version", type=int, default=0, help="Model version. [default: latest]")(fn)
    fn = click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")(fn)
    fn = click.option("-o", "--output", required=True, help="Where to write the result.")(fn)
    return fn


def _connect(server: str, timeout: float, security: dict):
    """A GenClient with the command's --token/--token-file and --tls-ca."""
    from serve.client import GenClient

    token, token_file, tls_ca = security["token"], security["token_file"], security["tls_ca"]
    if token_file:
        token = open(token_file).read().strip()
        if not token:
            raise UserError(f"--token-file {token_file}: holds no token")
    roots = open(tls_ca, "rb").read() if tls_ca else None
    try:
        return GenClient(server, timeout=timeout, token=token or None, root_certificates=roots)
    except ValueError as e:
        raise UserError(f"--server {e}") from None


def _labels(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--labels {text}: use comma-separated class indices, e.g. 0,1,2") from None


def _rpc_errors(server: str):
    """gRPC failures as one line: the status and the server's message."""
    import contextlib

    import grpc

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise UserError(f"cannot reach a gen server at {server} ({e.details()}); "
                                "start one with `gen serve`") from None
            raise UserError(f"{e.code().name}: {e.details()}") from None
    return guard()


@cli.command("sample")
@_client_options
@click.option("-n", "n", type=int, default=16, show_default=True, help="Number of images.")
@click.option("--seed", type=int, help="Seed; image i depends only on (seed, i).")
@click.option("--labels", help="Class indices, one for all or one per image, e.g. 0,1,2.")
def sample_cmd(server, model, version, timeout, output, n, seed, labels, **security):
    """Sample images from a VAE or GAN model and write them as a PNG grid."""
    from serve.client import save_grid

    with _rpc_errors(server), _connect(server, timeout, security) as client:
        images = client.sample(model, n=n, seed=seed, labels=_labels(labels), version=version)
    save_grid(images.pixels, output)
    click.echo(f"wrote {output}: {len(images.pixels)} images from {images.model} v{images.version}, "
               f"seed {images.seed}")


@cli.command("translate")
@_client_options
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--direction", default="", help="CycleGAN: AtoB or BtoA. [default: AtoB]")
def translate_cmd(server, model, version, timeout, output, images, direction, **security):
    """Translate IMAGES with a pix2pix or CycleGAN model; writes input | output pairs as a PNG grid."""
    import numpy as np

    from serve.client import load_pixels, save_grid

    blobs = [open(p, "rb").read() for p in images]
    with _rpc_errors(server), _connect(server, timeout, security) as client:
        result = client.translate(model, blobs, direction=direction, version=version)
    inputs = [load_pixels(b, *result.pixels.shape[1:]) for b in blobs]
    pairs = np.stack([x for pair in zip(inputs, result.pixels) for x in pair])
    save_grid(pairs, output, nrow=2)
    click.echo(f"wrote {output}: {len(result.pixels)} input | output pairs from {result.model} v{result.version}")


@cli.command("generate")
@_client_options
@click.option("-n", "n", type=int, default=8, show_default=True, help="Number of images.")
@click.option("--seed", type=int, help="Seed; image i depends only on (seed, i).")
@click.option("--labels", help="Class indices, one for all or one per image.")
@click.option("--guidance", type=float, help="Classifier-free guidance scale. [default: the model's]")
@click.option("--sampler", type=click.Choice(list(SAMPLER_NAMES)),
              help=f"Diffusion sampler. [default: the server's, {DEFAULT_SAMPLER}]")
@click.option("--steps", type=int, help=f"Diffusion steps. [default: the server's, {DEFAULT_STEPS}]")
@click.option("--eta", type=float, help="DDIM eta (0 deterministic, 1 DDPM-like).")
@click.option("--init", "init", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Image-to-image: start from this image (PNG/JPEG of the model's size); repeat for one per image.")
@click.option("--strength", type=float, help="With --init: how far to noise it, in (0, 1]. [default: 1]")
@click.option("--mask", "mask", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Inpainting, with --init: white = regenerate, black = keep the init image; repeat for one per "
              "image.")
def generate_cmd(server, model, version, timeout, output, n, seed, labels, guidance, sampler, steps, eta, init,
                 strength, mask, **security):
    """Run a diffusion model with streamed progress and write the images as a PNG grid; with --init, image-to-image
    (and with --mask, inpainting) from your images."""
    from pathlib import Path

    from serve.client import Images, save_grid

    if (strength is not None or mask) and not init:
        raise UserError("--strength and --mask need --init IMAGE (the image to start from)")
    result = None
    terminal = sys.stderr.isatty()  # a bar redrawn in place; elsewhere (logs, pipes) one line per step
    with _rpc_errors(server), _connect(server, timeout, security) as client:
        for event in client.generate(model, n=n, seed=seed, labels=_labels(labels), guidance=guidance,
                                     sampler=sampler, steps=steps, eta=eta, version=version,
                                     init=[Path(p).read_bytes() for p in init] or None, strength=strength,
                                     mask=[Path(p).read_bytes() for p in mask] or None):
            if isinstance(event, Images):
                result = event
            else:
                total = event.total
                if terminal:
                    click.echo(f"\rstep {event.step}/{event.total}", nl=False, err=True)
                else:
                    click.echo(f"step {event.step}/{event.total}", err=True)
    if terminal:
        click.echo("", err=True)
    save_grid(result.pixels, output)
    click.echo(f"wrote {output}: {len(result.pixels)} images from {result.model} v{result.version}, "
               f"{sampler or 'the default sampler'}, {total} steps, seed {result.seed}")


@cli.command("encode")
@_client_options
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--labels", help="Class indices for a conditional VAE.")
def encode_cmd(server, model, version, timeout, output, images, labels, **security):
    """Encode IMAGES with a VAE. -o X.npz writes mean and logvar; -o X.png writes input | reconstruction."""
    import numpy as np

    from serve.client import load_pixels, save_grid

    blobs = [open(p, "rb").read() for p in images]
    with _rpc_errors(server), _connect(server, timeout, security) as client:
        mean, logvar = client.encode(model, blobs, labels=_labels(labels), version=version)
        if output.endswith(".png"):
            recon = client.decode(model, mean, labels=_labels(labels), version=version)
    if output.endswith(".png"):
        inputs = [load_pixels(b, *recon.pixels.shape[1:]) for b in blobs]
        save_grid(np.stack([x for pair in zip(inputs, recon.pixels) for x in pair]), output, nrow=2)
    else:
        np.savez(output, mean=mean, logvar=logvar)
    click.echo(f"wrote {output}: {len(mean)} codes of size {mean.shape[1]}")


# the extra of pyproject.toml that installs each optional top-level module the commands import
EXTRA_OF = {**dict.fromkeys(("torch", "onnxscript", "onnxconverter_common", "mlxtend", "sklearn", "skimage", "tqdm"),
                            "train"),
            **dict.fromkeys(("onnxruntime", "onnx", "grpc", "grpc_health", "grpc_reflection", "google", "aiohttp",
                             "prometheus_client"), "serve"),
            "matplotlib": "bench", "diffusers": "diffusers", "safetensors": "diffusers", "tritonclient": "dev"}


def main() -> None:
    try:
        cli.main(prog_name="gen", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("gen: interrupted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as e:  # an optional dependency this install lacks: say which extra brings it
        module = (e.name or "").split(".")[0]
        if module not in EXTRA_OF:
            raise
        extra = EXTRA_OF[module]
        click.echo(f"gen: error: this command needs {module!r}, which this installation lacks; install the {extra} "
                   f"extra: pip install \"gen[{extra}]\" (from a checkout: pip install \".[{extra}]\")", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
