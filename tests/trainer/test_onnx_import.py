"""`gen import GRAPH.onnx --name NAME` from the command line: what is detected, and every mistake is one line on
stderr with nothing written to the repository (no version, no model folder, no hidden temporary folder).
Serving the imported graphs is tests/serve/test_imported.py's."""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from gen.cli import cli
from tests.serve.test_imported import mlp
from tests.test_cli import ROOT


def gen(*args: str):
    """The CLI in this process: a user error exits 2 with one line on stderr; anything else raises here."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result, match: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gen: error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.output


def _save(model: onnx.ModelProto, path):
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _unary(op: str, dtype=TensorProto.FLOAT, x_shape=("b", 4), y_shape=("b", 4), **attrs) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "g",
                              [helper.make_tensor_value_info("x", dtype, list(x_shape))],
                              [helper.make_tensor_value_info("y", dtype, list(y_shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def repo(tmp_path):
    """A repository that already holds mlp/1."""
    result = gen("import", str(_save(mlp(), tmp_path / "mlp.onnx")), "--name", "mlp", "--repo",
                 str(tmp_path / "exported"))
    assert result.exit_code == 0, result.output
    return tmp_path / "exported"


def test_import_detects_the_batch_axis_and_writes_a_version(repo):
    assert _tree(repo) == ["mlp", "mlp/1", "mlp/1/manifest.json", "mlp/1/model.onnx"]
    manifest = json.loads((repo / "mlp" / "1" / "manifest.json").read_text())
    assert (manifest["family"], manifest["task"], manifest["serving"]["max_batch_size"]) == ("onnx", "graph", 64)
    assert "image" not in manifest and manifest["classes"] == []
    assert manifest["graphs"]["model"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]


def test_batching_can_be_given(repo, tmp_path):
    # dynamic first dimensions that are no batch axis: [b, 8] -> [2b, 4], twice the rows it was given
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])], [shape])
    pooled = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "pooled.onnx")
    assert_one_line_error(gen("import", str(pooled), "--name", "pooled", "--repo", str(repo)), "--no-batch")
    result = gen("import", str(pooled), "--name", "pooled", "--repo", str(repo), "--no-batch")
    assert result.exit_code == 0, result.output
    serving = json.loads((repo / "pooled" / "1" / "manifest.json").read_text())["serving"]
    assert serving["max_batch_size"] == 0
    result = gen("import", str(tmp_path / "mlp.onnx"), "--name", "mlp", "--repo", str(repo), "--max-batch-size", "8")
    assert result.exit_code == 0, result.output
    assert json.loads((repo / "mlp" / "2" / "manifest.json").read_text())["serving"]["max_batch_size"] == 8
    fixed = _save(mlp(batch=1), tmp_path / "fixed.onnx")
    assert_one_line_error(gen("import", str(fixed), "--name", "fixed", "--repo", str(repo), "--batch"),
                          "has no batch axis")


def test_mistakes_get_one_line_and_write_nothing(repo, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(bytes(range(256)) * 3)
    refused = _save(_unary("NoSuchOp"), tmp_path / "refused.onnx")
    double = _save(_unary("Relu", TensorProto.DOUBLE), tmp_path / "double.onnx")
    good = str(tmp_path / "mlp.onnx")
    before = _tree(repo)
    for args, match in [
        ([str(junk), "--name", "junk"], "not an ONNX model"),
        ([str(tmp_path / "missing.onnx"), "--name", "missing"], "no such file"),
        ([str(refused), "--name", "refused"], "onnx.checker refused the graph"),
        ([str(double), "--name", "double"], "input 'x' of double.onnx: double is not served"),
        ([good, "--name", "Not A Name"], "--name 'Not A Name'"),
        ([good, "--name", "mlp", "--version", "1"], "--version 1: "),
        ([good, "--name", "other", "--no-batch", "--max-batch-size", "4"], "--max-batch-size"),
    ]:
        assert_one_line_error(gen("import", *args, "--repo", str(repo)), match)
        assert _tree(repo) == before, f"{args}: wrote {sorted(set(_tree(repo)) - set(before))}"
    missing_repo = tmp_path / "nowhere" / "exported"
    assert_one_line_error(gen("import", str(junk), "--name", "junk", "--repo", str(missing_repo)), "not an ONNX")
    assert not missing_repo.exists(), "no repository folder made for nothing"


def test_the_command_runs_without_torch(tmp_path):
    """The importer needs only the serve extra: torch made unimportable, the real command still imports."""
    source = _save(mlp(), tmp_path / "mlp.onnx")
    code = ("import sys; sys.modules['torch'] = None; from gen.cli import main; "
            f"sys.argv = ['gen', 'import', {str(source)!r}, '--name', 'mlp', '--repo', {str(tmp_path / 'repo')!r}]; "
            "main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "repo" / "mlp" / "1" / "manifest.json").is_file()


def test_gen_eval_leaves_imported_graphs_alone(repo):
    assert_one_line_error(gen("eval", "mlp", "--repo", str(repo)), "mlp: an imported graph (onnx)")
    assert_one_line_error(gen("eval", "--repo", str(repo)), "no healthy models to evaluate")
