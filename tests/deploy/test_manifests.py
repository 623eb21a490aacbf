"""Every manifest under deploy/ validates offline, and the pieces agree with each other and with `gen serve`.

Kubernetes objects: kubernetes-validate, which ships the Kubernetes JSON schemas (strict: unknown fields are
errors, as `kubectl apply` rejects them). KServe objects: the CRD schemas vendored in deploy/schemas/kserve/
(from KServe v0.20.0, see their $comment) with jsonschema, made strict the same way. Nothing is downloaded.
Dockerfiles cannot be built here (no Docker daemon in CI): their COPY sources, pip extras and `gen serve`
arguments are checked instead.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serve.launch import ROOT

DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"  # grpc probes are GA since 1.27; autoscaling/v2 since 1.23
KSERVE_SCHEMAS = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-v1alpha1.json",
                  ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-v1beta1.json"}


def documents(folder: str) -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted((DEPLOY / folder).glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def by_kind(folder: str) -> dict[str, dict]:
    return {d["kind"]: d for _, d in documents(folder)}


def strict(schema):
    """Unknown fields become errors: `additionalProperties: false` wherever an object lists its properties and
    does not keep unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


def kserve_validator(api_version: str, kind: str) -> jsonschema.Validator:
    schema = json.loads((DEPLOY / "schemas" / "kserve" / KSERVE_SCHEMAS[(api_version, kind)]).read_text())
    return jsonschema.Draft7Validator(strict(schema))


def test_every_file_under_deploy_is_covered():
    manifests = {p for p in DEPLOY.rglob("*.yaml")}
    assert manifests == {p for p, _ in documents("kubernetes")} | {p for p, _ in documents("kserve")}
    assert {d["kind"] for _, d in documents("kubernetes")} == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    assert {d["kind"] for _, d in documents("kserve")} == {"ServingRuntime", "InferenceService"}


@pytest.mark.parametrize("path,doc", documents("kubernetes"), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_kubernetes_manifests_validate(path, doc):
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{path.name}: {'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("path,doc", documents("kserve"), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_kserve_manifests_validate(path, doc):
    errors = sorted(kserve_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{path.name}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_the_validators_catch_mistakes():
    deployment = by_kind("kubernetes")["Deployment"]
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    isvc = json.loads(json.dumps(by_kind("kserve")["InferenceService"]))
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop("storageUri")
    assert list(kserve_validator(isvc["apiVersion"], isvc["kind"]).iter_errors(isvc))
    runtime = json.loads(json.dumps(by_kind("kserve")["ServingRuntime"]))
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8081"
    assert list(kserve_validator(runtime["apiVersion"], runtime["kind"]).iter_errors(runtime))


def serve_options(args: list[str]) -> dict:
    """The options `gen serve` would run with: click parses `args` exactly as the command line would."""
    from gen.cli import serve_cmd

    return serve_cmd.make_context("serve", list(args)).params


def test_deployment_service_and_autoscaler_agree():
    k = by_kind("kubernetes")
    pod = k["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    options = serve_options(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": options["port"], "metrics": options["metrics_port"]}
    assert options["host"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == options["port"], f"{probe} on grpc.health.v1"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    drain = options["drain_delay"] + options["grace"]
    assert drain < grace <= math.ceil(drain) + 10, "Kubernetes waits for --drain-delay and --grace, then a bit"
    assert options["drain_delay"] >= 5, "not ready first, long enough for the endpoints to drop the pod"
    assert options["threads"] == int(container["resources"]["requests"]["cpu"])
    service = k["Service"]
    assert service["spec"]["clusterIP"] == "None", "headless: clients balance per call over every pod"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    target = k["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k["Deployment"]["metadata"]["name"])


def test_kserve_runtime_and_service_agree():
    k = by_kind("kserve")
    runtime, isvc = k["ServingRuntime"], k["InferenceService"]
    (container,) = runtime["spec"]["containers"]
    options = serve_options(container["args"])
    assert options["repo"] == "/mnt/models", "where KServe's storage initializer puts storageUri"
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "h2c"] == [options["port"]]
    assert container["readinessProbe"]["grpc"]["port"] == options["port"]
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "grpc-v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert container["image"] == by_kind("kubernetes")["Deployment"]["spec"]["template"]["spec"]["containers"][0][
        "image"], "one image for Kubernetes and KServe"


def dockerfile(name: str) -> tuple[str, list[list[str]]]:
    """The text with continuation lines joined, and its instructions as [KEYWORD, ...arguments]."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "docker" / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return text, [[line.split(None, 1)[0], *line.split(None, 1)[1:]] for line in lines]


@pytest.mark.parametrize("name,extra", [("Dockerfile", "serve"), ("Dockerfile.cuda", "gpu")])
def test_dockerfiles_build_what_they_say(name, extra):
    _, instructions = dockerfile(name)
    args = {}
    for keyword, *rest in instructions:
        if keyword == "ARG":
            key, _, value = rest[0].partition("=")
            args[key] = value
        if keyword == "COPY":
            *sources, _ = shlex.split(rest[0])
            for source in sources:
                source = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], source)
                assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"
    runs = " ".join(rest[0] for keyword, *rest in instructions if keyword == "RUN")
    assert f'pip install ".[{extra}]"' in runs
    assert extra in importlib.metadata.metadata("gen").get_all("Provides-Extra")
    entrypoint = json.loads(next(rest[0] for keyword, *rest in instructions if keyword == "ENTRYPOINT"))
    cmd = json.loads(next(rest[0] for keyword, *rest in instructions if keyword == "CMD"))
    assert entrypoint == ["gen", "serve"]
    options = serve_options(cmd)
    exposed = {int(p) for keyword, *rest in instructions if keyword == "EXPOSE" for p in rest[0].split()}
    assert exposed == {options["port"], options["http_port"], options["metrics_port"]}  # gRPC, REST, metrics
    assert options["repo"] == "/models" and options["host"] == "0.0.0.0"
    assert options["device"] == ("cuda" if extra == "gpu" else "auto")
    deployment_args = by_kind("kubernetes")["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert serve_options(deployment_args)["grace"] == options["grace"]
