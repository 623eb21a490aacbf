"""PyTriton serving ONNX graphs through onnxruntime, behind Triton's dynamic batcher (case 2's rival).

Runs in its own environment (bench/.venv-pytriton: nvidia-pytriton needs numpy < 2):

    bench/.venv-pytriton/bin/python bench/pytriton_server.py --onnx G.onnx --name gan [--onnx H.onnx --name vae]
        --grpc-port P --http-port Q --metrics-port R

Each --onnx is bound as the model named by the --name in the same position, all in one Triton.

The onnxruntime session gets the server's own options (serve.session.session_options), and Triton's
batcher the same policy as ours (max batch size, max queue delay), so the two differ only in the
serving machinery. Prints "ready" once Triton answers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pytriton.decorators import batch  # noqa: E402
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig  # noqa: E402

from serve.session import session_options  # noqa: E402 - after the repository root is importable

DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True, action="append", help="an ONNX file; repeat for more models")
    ap.add_argument("--name", required=True, action="append", help="the model name of the --onnx at this position")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    args = ap.parse_args()

    if len(args.onnx) != len(args.name):
        raise SystemExit(f"give one --name per --onnx (got {len(args.onnx)} --onnx, {len(args.name)} --name)")

    def spec(t) -> Tensor:
        return Tensor(name=t.name, dtype=DTYPES[t.type], shape=tuple(-1 if not isinstance(d, int) else d
                                                                      for d in t.shape[1:]) or (1,))

    def model(path: str):
        """(infer function, input specs, output specs) of one graph in its own session."""
        session = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        # Triton wants at least one dim besides the batch: [B] inputs (labels) travel as [B, 1]
        flat = {t.name for t in session.get_inputs() if len(t.shape) == 1}

        @batch
        def infer(**inputs):
            feeds = {k: v.reshape(-1) if k in flat else v for k, v in inputs.items()}
            return dict(zip(outputs, session.run(outputs, feeds)))

        return infer, [spec(t) for t in session.get_inputs()], [spec(t) for t in session.get_outputs()]

    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port, http_address="127.0.0.1",
                          http_port=args.http_port, metrics_port=args.metrics_port, log_verbose=0)
    # no token on Triton's statistics and model-repository endpoints (PyTriton protects them by default): perf_analyzer
    # reads the statistics, and so does case 2 for the requests served; it listens on 127.0.0.1 only
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        for path, name in zip(args.onnx, args.name):
            infer, inputs, outputs = model(path)
            triton.bind(model_name=name, infer_func=infer, inputs=inputs, outputs=outputs,
                        config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher(
                            max_queue_delay_microseconds=int(args.max_queue_delay_ms * 1000))))
        print("ready", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
