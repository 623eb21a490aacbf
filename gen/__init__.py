"""gen: train generative image models, export them to ONNX, serve them over gRPC."""
__version__ = "0.1.0"
