"""TLS, mutual TLS and bearer-token auth against real `gen serve` processes, with certificates made here
by the openssl command line (a throwaway CA signing a server and a client certificate)."""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.client import GenClient
from tests.serve.conftest import ROOT, start_server, stop_server

TOKEN = "s3cret-token-for-tests"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=gen test CA", "-days", "2",
             cwd=d)
    exts = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost", "client": "extendedKeyUsage=clientAuth"}
    for who, ext in exts.items():
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}", cwd=d)
        (d / f"{who}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    (d / "token").write_text(TOKEN + "\n")
    return d


@pytest.fixture(scope="module")
def gan_repo(tiny_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("secure") / "exported"
    shutil.copytree(tiny_repo / "exported" / "tiny-gan", repo / "tiny-gan")
    return repo


@pytest.fixture(scope="module")
def tls_server(gan_repo, pki):
    """TLS plus a token from a file; repository control left off."""
    srv = start_server(gan_repo, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                       "--auth-token-file", str(pki / "token"), "--metrics-port", "0")
    yield srv
    stop_server(srv)


def _tls_channel(srv, pki, cert: bool = False):
    key_pair = dict(private_key=(pki / "client.key").read_bytes(),
                    certificate_chain=(pki / "client.pem").read_bytes()) if cert else {}
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), **key_pair)
    return grpc.secure_channel(srv.target, creds)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_tls_and_tokens(tls_server, pki):
    request = pb.SampleRequest(model="tiny-gan", n=1, seed=0)
    plain = grpc.insecure_channel(tls_server.target)
    assert _code(lambda: pb_grpc.GeneratorStub(plain).Sample(request, timeout=10)) == grpc.StatusCode.UNAVAILABLE
    plain.close()
    channel = _tls_channel(tls_server, pki)
    stub = pb_grpc.GeneratorStub(channel)
    assert _code(lambda: stub.Sample(request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    for wrong in ("Bearer nope", f"Bearer {TOKEN}x", TOKEN, f"Basic {TOKEN}"):
        assert _code(lambda w=wrong: stub.Sample(request, timeout=10, metadata=[("authorization", w)])) == \
            grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: list(stub.Generate(pb.GenerateRequest(model="tiny-gan"), timeout=10))) == \
        grpc.StatusCode.UNAUTHENTICATED, "streaming methods are guarded too"
    assert len(stub.Sample(request, timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")]).png) == 1
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, "health needs no token"
    channel.close()
    with GenClient(tls_server.target, timeout=30, token=TOKEN, root_certificates=(pki / "ca.pem").read_bytes()) as c:
        assert c.sample("tiny-gan", n=2, seed=1).pixels.shape == (2, 32, 32, 1)


def test_tritonclient_with_the_token_header(tls_server, pki):
    client = triton.InferenceServerClient(tls_server.target, ssl=True, root_certificates=str(pki / "ca.pem"))
    headers = {"authorization": f"Bearer {TOKEN}"}
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.is_server_live()
    assert client.is_server_live(headers=headers)
    inputs = [triton.InferInput("z", [1, 8], "FP32"), triton.InferInput("label", [1], "INT64")]
    inputs[0].set_data_from_numpy(np.zeros((1, 8), np.float32))
    inputs[1].set_data_from_numpy(np.array([3], np.int64))
    assert client.infer("tiny-gan.generator", inputs, headers=headers).as_numpy("image").shape == (1, 1, 32, 32)
    with pytest.raises(InferenceServerException, match="repository control is off"):
        client.load_model("tiny-gan", headers=headers)
    client.close()


def _https(srv, pki, path: str, token: str | None = None, cert: bool = False, body: bytes | None = None):
    """(status, JSON body) of one HTTPS request to the REST port."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"https://127.0.0.1:{srv.http_port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rest_takes_the_same_tls_and_token(tls_server, pki):
    with pytest.raises(OSError):  # plain HTTP to the TLS port gets no answer (a reset or a closed connection)
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.http_port}/v2", timeout=10)
    assert _https(tls_server, pki, "/v2/health/ready") == (200, {"ready": True}), "health needs no token"
    for token in (None, "nope", TOKEN + "x"):
        status, doc = _https(tls_server, pki, "/v2", token)
        assert status == 401 and "bearer token" in doc["error"]
    assert _https(tls_server, pki, "/v2/models/tiny-gan.generator", TOKEN)[0] == 200
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    for port in (tls_server.http_port, tls_server.metrics_port):  # /metrics on both: TLS and the token too
        url = f"https://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=30, context=context)
        assert info.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            assert b"nv_inference_request_success_total" in resp.read()
    status, doc = _https(tls_server, pki, "/v2/repository/models/tiny-gan/load", TOKEN, body=b"")
    assert status == 400 and "repository control is off" in doc["error"]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{tls_server.http_port}", ssl=True,
                                              ssl_options={"ca_certs": str(pki / "ca.pem")})
    headers = {"authorization": f"Bearer {TOKEN}"}
    with pytest.raises(InferenceServerException, match="bearer token"):
        client.get_server_metadata()
    inputs = [httpclient.InferInput("z", [1, 8], "FP32"), httpclient.InferInput("label", [1], "INT64")]
    inputs[0].set_data_from_numpy(np.zeros((1, 8), np.float32))
    inputs[1].set_data_from_numpy(np.array([3], np.int64))
    assert client.infer("tiny-gan.generator", inputs, headers=headers).as_numpy("image").shape == (1, 1, 32, 32)
    client.close()


def test_cli_client_token_and_tls_options(tls_server, pki, tmp_path):
    def gen(*args):
        return subprocess.run([sys.executable, "-m", "gen", "sample", "--model", "tiny-gan", "-n", "2", "-o",
                               str(tmp_path / "s.png"), "--server", tls_server.target, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    ok = gen("--tls-ca", str(pki / "ca.pem"), "--token-file", str(pki / "token"))
    assert ok.returncode == 0, ok.stderr
    denied = gen("--tls-ca", str(pki / "ca.pem"))
    assert denied.returncode != 0 and denied.stderr.startswith("gen: error: UNAUTHENTICATED")
    assert "Traceback" not in denied.stderr


def test_mutual_tls_and_the_token_from_the_environment(gan_repo, pki):
    srv = start_server(gan_repo, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                       "--tls-client-ca", str(pki / "ca.pem"), env={"GEN_AUTH_TOKEN": TOKEN})
    try:
        request, auth = pb.SampleRequest(model="tiny-gan", n=1), [("authorization", f"Bearer {TOKEN}")]
        no_cert = _tls_channel(srv, pki)
        assert _code(lambda: pb_grpc.GeneratorStub(no_cert).Sample(request, timeout=10, metadata=auth)) == \
            grpc.StatusCode.UNAVAILABLE
        no_cert.close()
        channel = _tls_channel(srv, pki, cert=True)
        stub = pb_grpc.GeneratorStub(channel)
        assert _code(lambda: stub.Sample(request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert len(stub.Sample(request, timeout=30, metadata=auth).png) == 1
        channel.close()
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):  # REST too needs the cert
            _https(srv, pki, "/v2", TOKEN)
        assert _https(srv, pki, "/v2", None, cert=True)[0] == 401
        assert _https(srv, pki, "/v2", TOKEN, cert=True)[1]["name"] == "gen"
    finally:
        stop_server(srv)


@pytest.mark.parametrize("args,message", [
    (["--tls-cert", "server.pem"], "give both"),
    (["--tls-client-ca", "ca.pem"], "needs --tls-cert"),
    (["--tls-cert", "token", "--tls-key", "server.key"], "not a PEM file"),
    (["--auth-token-file", "empty"], "holds no token"),
])
def test_serve_flag_mistakes_are_one_line(gan_repo, pki, args, message):
    (pki / "empty").write_text("\n")
    proc = subprocess.run([sys.executable, "-m", "gen", "serve", "--repo", str(gan_repo), "--port", "0",
                           *[str(pki / a) if not a.startswith("--") else a for a in args]], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("gen: error:") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
