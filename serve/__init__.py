"""The serving side: onnxruntime only, never torch or trainer.

Reads nothing from training but the model repository (`exported/`, see serve.manifest).
"""
