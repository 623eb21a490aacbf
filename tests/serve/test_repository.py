"""The served repository: READY / UNAVAILABLE states with reasons, versions, load/unload, name checks."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from serve.errors import InvalidArgument, NotFound, Unavailable
from serve.manifest import file_sha256
from serve.repository import READY, UNAVAILABLE, Repository


def clone(src: Path, repo: Path, name: str, version: int = 1) -> Path:
    """Copy a version folder to repo/name/version, with the manifest's name and version updated."""
    dst = repo / name / str(version)
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(name=name, version=version)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def z_feeds(n: int = 2) -> dict[str, np.ndarray]:
    return {"z": np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32),
            "label": np.arange(n, dtype=np.int64)}


@pytest.fixture
def repo(tiny_repo, tmp_path) -> Path:
    """tiny-gan and tiny-vae, plus broken models of every kind."""
    root = tmp_path / "exported"
    src = tiny_repo / "exported"
    clone(src / "tiny-gan" / "1", root, "tiny-gan", 1)
    clone(src / "tiny-vae" / "1", root, "tiny-vae", 1)
    # a graph file changed after export: its hash no longer matches
    bad_hash = clone(src / "tiny-gan" / "1", root, "bad-hash", 1)
    with open(bad_hash / "generator.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    # a manifest that is not JSON
    bad_json = clone(src / "tiny-gan" / "1", root, "bad-json", 1)
    (bad_json / "manifest.json").write_text("{ not json")
    # a file that hashes as the manifest says but that onnxruntime refuses
    bad_onnx = clone(src / "tiny-gan" / "1", root, "bad-onnx", 1)
    (bad_onnx / "generator.onnx").write_bytes(b"this is not an onnx model" * 10)
    manifest = json.loads((bad_onnx / "manifest.json").read_text())
    manifest["graphs"]["generator"]["sha256"] = file_sha256(bad_onnx / "generator.onnx")
    (bad_onnx / "manifest.json").write_text(json.dumps(manifest))
    # a version folder that is not a number
    shutil.copytree(src / "tiny-gan" / "1", root / "tiny-gan" / "latest")
    return root


def states(r: Repository) -> dict[tuple[str, str], tuple[str, str]]:
    return {(e.name, e.version): (e.state, e.reason) for e in r.index()}


def test_states_and_reasons(repo):
    r = Repository(repo)
    s = states(r)
    assert s[("tiny-gan", "1")] == (READY, "") and s[("tiny-vae", "1")] == (READY, "")
    assert s[("bad-hash", "1")][0] == UNAVAILABLE and "generator.onnx: sha256 mismatch" in s[("bad-hash", "1")][1]
    assert s[("bad-json", "1")][0] == UNAVAILABLE and "not valid JSON" in s[("bad-json", "1")][1]
    assert s[("bad-onnx", "1")][0] == UNAVAILABLE and "generator.onnx: cannot be served" in s[("bad-onnx", "1")][1]
    assert s[("tiny-gan", "latest")][0] == UNAVAILABLE and "positive integer" in s[("tiny-gan", "latest")][1]
    assert [e.name for e in r.index(ready_only=True)] == ["tiny-gan", "tiny-vae"]
    # healthy models serve
    mv = r.resolve("tiny-gan")
    assert mv.version == 1 and mv.runners["generator"].run(z_feeds())["image"].shape == (2, 1, 32, 32)
    with pytest.raises(Unavailable, match="sha256 mismatch"):
        r.resolve("bad-hash")
    with pytest.raises(Unavailable, match="cannot be served"):
        r.resolve("bad-onnx", 1)


def test_not_found_names_what_exists(repo):
    r = Repository(repo)
    with pytest.raises(NotFound, match=r"'nope' is not in the repository \(models: bad-hash, .*tiny-gan, tiny-vae"):
        r.resolve("nope")
    with pytest.raises(NotFound, match=r"no version 7 \(versions: 1\)"):
        r.resolve("tiny-gan", 7)
    with pytest.raises(InvalidArgument, match="version"):
        r.resolve("tiny-gan", 0)


@pytest.mark.parametrize("name", ["../x", "..", "tiny-gan/../tiny-vae", "/etc", "a/b", "", ".hidden", "Tiny",
                                  "x" * 65, "tiny-gan\x00", "~root"])
def test_names_that_could_escape_are_refused(repo, name, monkeypatch):
    r = Repository(repo)

    def no_fs(*args, **kwargs):
        raise AssertionError("the filesystem was touched for an invalid name")

    monkeypatch.setattr(Path, "is_dir", no_fs)
    monkeypatch.setattr(Path, "iterdir", no_fs)
    for call in (r.resolve, r.load, r.unload):
        with pytest.raises(InvalidArgument, match="model: .* is not a model name"):
            call(name)


def test_a_new_version_is_served_after_load_and_the_old_keeps_serving(repo, tiny_repo):
    r = Repository(repo)
    v1 = r.resolve("tiny-gan")
    clone(tiny_repo / "exported" / "tiny-gan" / "1", repo, "tiny-gan", 2)
    assert r.resolve("tiny-gan") is v1, "nothing changes until load"
    seen, errors, stop = set(), [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                seen.add(r.resolve("tiny-gan").version)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    t = threading.Thread(target=hammer)
    t.start()
    retired = r.load("tiny-gan")
    stop.set()
    t.join()
    assert not errors and seen <= {1, 2}, "readers always see a complete table"
    assert r.resolve("tiny-gan").version == 2
    assert r.resolve("tiny-gan", 1) is v1 and retired == [], "an unchanged version keeps its sessions"
    assert v1.runners["generator"].run(z_feeds())["image"].shape == (2, 1, 32, 32)
    # a broken newer version does not displace the highest READY one
    v3 = clone(tiny_repo / "exported" / "tiny-gan" / "1", repo, "tiny-gan", 3)
    (v3 / "generator.onnx").write_bytes(b"garbage")
    r.load("tiny-gan")
    assert r.resolve("tiny-gan").version == 2
    assert states(r)[("tiny-gan", "3")][0] == UNAVAILABLE
    # a version removed from disk is retired
    shutil.rmtree(repo / "tiny-gan" / "2")
    retired = r.load("tiny-gan")
    assert [mv.version for mv in retired] == [2] and r.resolve("tiny-gan").version == 1


def test_a_changed_version_is_reopened(repo):
    r = Repository(repo)
    old = r.resolve("tiny-gan")
    path = repo / "tiny-gan" / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["serving"]["max_batch_size"] = 7
    path.write_text(json.dumps(manifest))
    retired = r.load("tiny-gan")
    new = r.resolve("tiny-gan")
    assert retired == [old] and new is not old and new.manifest.serving["max_batch_size"] == 7


def test_unload_and_load_again(repo):
    r = Repository(repo)
    retired = r.unload("tiny-vae")
    assert [mv.version for mv in retired] == [1]
    assert states(r)[("tiny-vae", "1")] == (UNAVAILABLE, "unloaded")
    with pytest.raises(Unavailable, match="unloaded"):
        r.resolve("tiny-vae")
    r.load("tiny-vae")
    assert r.resolve("tiny-vae").ready
    with pytest.raises(NotFound):
        r.unload("nope")


def test_a_model_removed_from_disk_leaves_the_index(repo):
    r = Repository(repo)
    shutil.rmtree(repo / "tiny-vae")
    with pytest.raises(NotFound, match="tiny-vae"):
        r.load("tiny-vae")
    assert "tiny-vae" not in r.names()
    with pytest.raises(NotFound):
        r.load("never-existed")


def test_an_empty_or_missing_root(tmp_path):
    assert Repository(tmp_path / "missing").index() == []
    with pytest.raises(NotFound, match=r"models: none"):
        Repository(tmp_path).resolve("tiny-gan")
