"""What protos/generator.proto's comments promise, one test per documented behaviour, against the real server:
the proto is what a client reads, so it and the server cannot drift apart."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from serve.wire import tensor_from_pb


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.GeneratorStub(channel)
    channel.close()


def _default_labels(stub, model: str, n: int) -> list[int]:
    """i mod K for a conditional model, none for an unconditional one."""
    (info,) = stub.ListModels(pb.ListModelsRequest(model=model)).models
    return [i % len(info.classes) for i in range(n)] if info.classes else []


def raw(response) -> np.ndarray:
    return tensor_from_pb(response.tensor, "tensor")


def generate(stub, **fields) -> tuple[list, pb.ImagesResponse]:
    events = list(stub.Generate(pb.GenerateRequest(format=pb.RAW, **fields), timeout=120))
    return [e.progress for e in events[:-1]], events[-1].result


# --- n, labels and seed -------------------------------------------------------------------------------------

def test_sample_n_zero_means_len_labels_or_one(stub):
    three = stub.Sample(pb.SampleRequest(model="tiny-gan", n=0, labels=[4, 1, 7], seed=2, format=pb.RAW))
    assert raw(three).shape[0] == 3 and list(three.labels) == [4, 1, 7]
    one = stub.Sample(pb.SampleRequest(model="tiny-gan", n=0, labels=[5], seed=2, format=pb.RAW))
    assert raw(one).shape[0] == 1 and list(one.labels) == [5]
    assert raw(stub.Sample(pb.SampleRequest(model="tiny-gan", n=0, seed=2, format=pb.RAW))).shape[0] == 1


def test_generate_n_zero_means_len_labels_or_one(stub):
    _, two = generate(stub, model="tiny-diffusion", n=0, labels=[3, 8], seed=1, steps=2)
    assert raw(two).shape[0] == 2 and list(two.labels) == [3, 8]
    _, one = generate(stub, model="tiny-flow", n=0, seed=1, steps=2)
    assert raw(one).shape[0] == 1


def test_empty_labels_mean_class_i_mod_k(stub):
    sample = stub.Sample(pb.SampleRequest(model="tiny-gan", n=12, seed=0, format=pb.RAW))
    assert list(sample.labels) == [i % 10 for i in range(12)]
    given = stub.Sample(pb.SampleRequest(model="tiny-gan", n=12, seed=0, labels=[i % 10 for i in range(12)],
                                         format=pb.RAW))
    assert np.array_equal(raw(sample), raw(given))
    _, gen = generate(stub, model="tiny-diffusion", n=11, seed=0, steps=2)
    assert list(gen.labels) == [i % 10 for i in range(11)]
    z = np.random.default_rng(0).standard_normal((3, 4)).astype("<f4")
    decoded = stub.Decode(pb.DecodeRequest(model="tiny-vae", z=pb.Tensor(shape=[3, 4], dtype="float32",
                                                                          data=z.tobytes()), format=pb.RAW))
    assert list(decoded.labels) == _default_labels(stub, "tiny-vae", 3)


@pytest.mark.parametrize("model", ["tiny-diffusion", "tiny-flow"])
def test_minus_one_asks_for_the_null_class(stub, model):
    """An unconditional row: the guided output of the null class is the null class's output whatever the scale,
    so it equals any label at guidance 0."""
    _, null = generate(stub, model=model, n=2, labels=[-1], seed=3, steps=3, guidance=3.0)
    _, uncond = generate(stub, model=model, n=2, labels=[6], seed=3, steps=3, guidance=0.0)
    assert list(null.labels) == [-1, -1]
    assert np.abs(raw(null) - raw(uncond)).max() <= 1e-5
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, model=model, n=1, labels=[-2], steps=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "labels[0]" in e.value.details()


@pytest.mark.parametrize("method", ["Sample", "Generate"])
def test_the_seed_decides_image_i_alone_and_an_absent_seed_is_returned(stub, method):
    if method == "Sample":
        def call(**fields):
            return stub.Sample(pb.SampleRequest(model="tiny-gan", format=pb.RAW, **fields))
    else:
        def call(**fields):
            return generate(stub, model="tiny-diffusion", steps=2, sampler="ddpm", **fields)[1]
    eight, four = raw(call(n=8, seed=9)), raw(call(n=4, seed=9))
    assert np.abs(eight[:4] - four).max() <= 1e-5
    picked = call(n=2)
    assert picked.seed != 0 and np.array_equal(raw(picked), raw(call(n=2, seed=picked.seed)))


def test_decode_seed_is_not_used(stub):
    z = np.random.default_rng(1).standard_normal((2, 4)).astype("<f4")
    tensor = pb.Tensor(shape=[2, 4], dtype="float32", data=z.tobytes())
    a = stub.Decode(pb.DecodeRequest(model="tiny-vae", z=tensor, seed=1, format=pb.RAW))
    b = stub.Decode(pb.DecodeRequest(model="tiny-vae", z=tensor, seed=2, format=pb.RAW))
    assert np.array_equal(raw(a), raw(b))


# --- defaults -----------------------------------------------------------------------------------------------

def test_generate_defaults(stub, server):
    """Empty sampler and steps: the server's default (UniPC, 10 steps); absent eta: 0; a student: its own."""
    progress, default = generate(stub, model="tiny-diffusion", n=1, seed=4)
    assert [p.total for p in progress] == [DEFAULT_STEPS] * DEFAULT_STEPS
    _, named = generate(stub, model="tiny-diffusion", n=1, seed=4, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS,
                        eta=0.0)
    assert np.array_equal(raw(default), raw(named))
    progress, _ = generate(stub, model="tiny-diffusion-student", n=1, seed=4)
    assert progress[-1].total == 4  # its most steps


def test_list_models_says_families_tasks_graphs_and_samplers(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert (models["tiny-flow"].family, models["tiny-flow"].task) == ("flow", "denoise")
    assert list(models["tiny-flow"].graphs) == ["denoiser"] and models["tiny-flow"].num_train_timesteps >= 1
    assert set(models["tiny-diffusion"].samplers) == set(SAMPLERS)
    assert list(models["tiny-diffusion-student"].samplers) == sorted({"consistency", "ddim"})
    assert models["tiny-gan"].samplers == [] and models["tiny-gan"].num_train_timesteps == 0


def test_translate_direction_defaults_to_a_to_b(stub):
    image = np.zeros((1, 3, 32, 32), "<f4")
    tensor = pb.Tensor(shape=[1, 3, 32, 32], dtype="float32", data=image.tobytes())
    for model in ("tiny-pix2pix", "tiny-cyclegan"):
        empty = stub.Translate(pb.TranslateRequest(model=model, tensor=tensor, format=pb.RAW))
        a_to_b = stub.Translate(pb.TranslateRequest(model=model, tensor=tensor, direction="AtoB", format=pb.RAW))
        assert np.array_equal(raw(empty), raw(a_to_b))
    with pytest.raises(grpc.RpcError) as e:
        stub.Translate(pb.TranslateRequest(model="tiny-pix2pix", tensor=tensor, direction="BtoA"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "direction" in e.value.details()


def test_encode_labels_default_to_i_mod_k_and_are_returned(stub):
    images = np.zeros((3, 1, 32, 32), "<f4")
    tensor = pb.Tensor(shape=[3, 1, 32, 32], dtype="float32", data=images.tobytes())
    out = stub.Encode(pb.EncodeRequest(model="tiny-vae", tensor=tensor))
    assert list(out.labels) == _default_labels(stub, "tiny-vae", 3)
