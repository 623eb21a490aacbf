"""Regenerate the Python code for every protos/*.proto: *_pb2.py, *_pb2_grpc.py and *_pb2.pyi.

Usage (from anywhere):
    python protos/generate.py [--out DIR]

DIR defaults to the repository root, so the files land next to their .proto sources in protos/.
protoc runs in-process (grpc_tools.protoc) with the repository root as the include path, plus
grpc_tools' bundled well-known types (google/protobuf/*.proto). Because every .proto is named
relative to the repository root (protos/x.proto, importing "protos/y.proto"), the generated modules
import each other as `protos.x_pb2` without any rewriting.

The output depends on the grpcio-tools version (it stamps the protobuf and grpc versions it
targets), so regenerate with the version pinned in pyproject.toml; tests/test_protos.py checks that
the committed files are what this script produces.
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root
PROTO_DIR = ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files() -> list[Path]:
    """Every .proto in protos/, sorted, as absolute paths."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generated_names() -> list[str]:
    """File names (in protos/) of everything generate() writes."""
    return sorted(p.stem + s for p in proto_files() for s in SUFFIXES)


def generate(out: Path | str = ROOT) -> list[Path]:
    """Run protoc on every protos/*.proto, writing under `out`/protos/; returns the files written."""
    from grpc_tools import protoc

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    protos = proto_files()
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            *(str(p) for p in protos)]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit status {code}")
    return [out / "protos" / name for name in generated_names()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT,
                        help="output root; files land in OUT/protos/ (default: the repository root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
