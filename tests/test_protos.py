"""The protocol files: generated code is fresh, the KServe v2 / Triton protocol is wire-compatible with
tritonclient's own copy, and the generated services import with the expected methods.

Note: protos.grpc_service_pb2 and tritonclient.grpc define the same symbols (inference.*) under different
file names, so protobuf refuses to load both into one process ("duplicate symbol"). Everything that needs
tritonclient's descriptors, or our Triton descriptors, therefore runs in a fresh interpreter.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from protos import generate

ROOT = Path(__file__).resolve().parent.parent
FDP = descriptor_pb2.FieldDescriptorProto

TRITON_METHODS = [
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
    "RepositoryModelUnload", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
]
GENERATOR_METHODS = ["ListModels", "Sample", "Translate", "Encode", "Decode", "Generate"]


# ----------------------------------------------------------------------------------------- freshness

def test_generated_code_is_fresh(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "no .proto files found"
    stale = []
    for fresh in written:
        committed = ROOT / "protos" / fresh.name
        if not committed.is_file() or committed.read_bytes() != fresh.read_bytes():
            stale.append(fresh.name)
    # generated files whose .proto is gone
    expected = set(generate.generated_names())
    orphans = sorted(p.name for p in (ROOT / "protos").iterdir()
                     if p.name.endswith(generate.SUFFIXES) and p.name not in expected)
    assert not stale and not orphans, (
        f"generated code is out of date (differs: {stale}, no .proto: {orphans}); "
        "run python protos/generate.py")


# ---------------------------------------------------------------------- tritonclient compatibility

_DUMP = """
import base64, importlib, json, sys
from google.protobuf import descriptor_pb2
out = {}
for name in sys.argv[1:]:
    fdp = descriptor_pb2.FileDescriptorProto()
    importlib.import_module(name).DESCRIPTOR.CopyToProto(fdp)
    out[name] = base64.b64encode(fdp.SerializeToString()).decode()
print(json.dumps(out))
"""


def _file_protos(*modules: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """FileDescriptorProtos of generated modules, loaded in a fresh interpreter (see the module note)."""
    proc = subprocess.run([sys.executable, "-c", _DUMP, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {}
    for name, b64 in json.loads(proc.stdout).items():
        fdp = descriptor_pb2.FileDescriptorProto()
        fdp.ParseFromString(base64.b64decode(b64))
        result[name] = fdp
    return result


def _messages(fdp: descriptor_pb2.FileDescriptorProto):
    """{full name: DescriptorProto} for every message, nested ones included."""
    found = {}

    def walk(msg, prefix):
        full = f"{prefix}.{msg.name}"
        found[full] = msg
        for nested in msg.nested_type:
            walk(nested, full)

    for msg in fdp.message_type:
        walk(msg, fdp.package)
    return found


def _enums(fdp: descriptor_pb2.FileDescriptorProto):
    """{full name: {value name: number}} for every enum, nested ones included."""
    found = {}

    def walk(enums, prefix):
        for e in enums:
            found[f"{prefix}.{e.name}"] = {v.name: v.number for v in e.value}

    walk(fdp.enum_type, fdp.package)
    for full, msg in _messages(fdp).items():
        walk(msg.enum_type, full)
    return found


def _field_sig(msg: descriptor_pb2.DescriptorProto) -> dict[int, tuple]:
    """Field number -> (name, wire type, label, referenced type, oneof name or None)."""
    sig = {}
    for f in msg.field:
        oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
        sig[f.number] = (f.name, FDP.Type.Name(f.type), FDP.Label.Name(f.label), f.type_name, oneof)
    return sig


@pytest.fixture(scope="module")
def triton_protos():
    """(ours, tritonclient's) FileDescriptorProtos: {'service': ..., 'config': ...} each."""
    try:
        import tritonclient.grpc  # noqa: F401  (only checks that it is installed; see the module note)
    except ImportError:  # pragma: no cover
        pytest.skip("tritonclient[grpc] is not installed")
    ours = _file_protos("protos.grpc_service_pb2", "protos.model_config_pb2")
    theirs = _file_protos("tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2")
    return ({"service": ours["protos.grpc_service_pb2"], "config": ours["protos.model_config_pb2"]},
            {"service": theirs["tritonclient.grpc.service_pb2"],
             "config": theirs["tritonclient.grpc.model_config_pb2"]})


def test_triton_files_layout(triton_protos):
    ours, _ = triton_protos
    assert ours["service"].name == "protos/grpc_service.proto"
    assert ours["config"].name == "protos/model_config.proto"
    assert list(ours["service"].dependency) == ["protos/model_config.proto"]
    assert ours["service"].package == ours["config"].package == "inference"
    assert ours["service"].syntax == ours["config"].syntax == "proto3"


@pytest.mark.parametrize("part", ["service", "config"])
def test_triton_messages_match_tritonclient(triton_protos, part):
    ours, theirs = triton_protos
    our_msgs, their_msgs = _messages(ours[part]), _messages(theirs[part])
    assert len(their_msgs) > 20, "tritonclient's descriptors look empty"
    assert sorted(set(their_msgs) - set(our_msgs)) == [], "messages tritonclient has and we lack"
    assert sorted(set(our_msgs) - set(their_msgs)) == [], "messages we have and tritonclient lacks"
    problems = []
    for full in sorted(their_msgs):
        mine, theirs_sig = _field_sig(our_msgs[full]), _field_sig(their_msgs[full])
        for number in sorted(set(mine) | set(theirs_sig)):
            if mine.get(number) != theirs_sig.get(number):
                problems.append(f"{full} field {number}: ours {mine.get(number)}, "
                                f"tritonclient {theirs_sig.get(number)}")
        if our_msgs[full].options.map_entry != their_msgs[full].options.map_entry:
            problems.append(f"{full}: map_entry differs")
    assert not problems, "\n".join(problems)
    assert _enums(ours[part]) == _enums(theirs[part])


def test_triton_service_matches_tritonclient(triton_protos):
    ours, theirs = triton_protos
    (mine,) = ours["service"].service
    (their,) = theirs["service"].service
    assert f"{ours['service'].package}.{mine.name}" == f"{theirs['service'].package}.{their.name}" \
        == "inference.GRPCInferenceService"

    def methods(svc):
        return {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in svc.method}

    assert methods(mine) == methods(their)
    assert [m.name for m in mine.method] == TRITON_METHODS
    assert methods(mine)["ModelStreamInfer"][2:] == (True, True)


# ------------------------------------------------------------------------------- generated services

def test_generator_modules_import():
    import protos.generator_pb2 as pb
    import protos.generator_pb2_grpc as pb_grpc

    svc = pb.DESCRIPTOR.services_by_name["Generator"]
    assert svc.full_name == "gen.v1.Generator"
    assert [m.name for m in svc.methods] == GENERATOR_METHODS
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert streaming == {name: (False, name == "Generate") for name in GENERATOR_METHODS}
    for name in GENERATOR_METHODS:
        assert hasattr(pb_grpc.GeneratorServicer, name)
    assert callable(pb_grpc.add_GeneratorServicer_to_server)
    assert pb_grpc.GeneratorStub

    # a few contract details other code relies on
    assert pb.ImageFormat.Value("PNG") == 0 and pb.ImageFormat.Value("RAW") == 1
    req = pb.SampleRequest(model="m")
    assert not req.HasField("seed")
    req.seed = 0
    assert req.HasField("seed")
    gen = pb.GenerateRequest()
    assert not gen.HasField("guidance") and not gen.HasField("eta") and not gen.HasField("seed")
    event = pb.GenerateEvent(progress=pb.Progress(step=1, total=4))
    assert event.WhichOneof("event") == "progress"
    event = pb.GenerateEvent(result=pb.ImagesResponse(model="m", version=1))
    assert event.WhichOneof("event") == "result"
    t = pb.Tensor(shape=[1, 2], dtype="float32", data=b"\0" * 8)
    assert pb.Tensor.FromString(t.SerializeToString()) == t


_IMPORT_TRITON = """
import json
import protos.grpc_service_pb2 as pb
import protos.grpc_service_pb2_grpc as pb_grpc
import protos.model_config_pb2 as mc
svc = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
assert pb.ModelConfigResponse.DESCRIPTOR.fields_by_name["config"].message_type is mc.ModelConfig.DESCRIPTOR
print(json.dumps({"full_name": svc.full_name, "methods": [m.name for m in svc.methods],
                  "servicer": [n for n in dir(pb_grpc.GRPCInferenceServiceServicer) if not n.startswith("_")],
                  "add": callable(pb_grpc.add_GRPCInferenceServiceServicer_to_server),
                  "stub": hasattr(pb_grpc, "GRPCInferenceServiceStub")}))
"""


def test_grpc_service_modules_import():
    # in a fresh interpreter: this process may already hold tritonclient's copy of inference.*
    proc = subprocess.run([sys.executable, "-c", _IMPORT_TRITON], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["full_name"] == "inference.GRPCInferenceService"
    assert info["methods"] == TRITON_METHODS
    assert sorted(info["servicer"]) == sorted(TRITON_METHODS)
    assert info["add"] and info["stub"]
