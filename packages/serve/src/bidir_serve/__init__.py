"""bidir_serve: batch embedding with bidir models (torch, onnxruntime, TensorRT backends).

Not implemented yet; see the package README.
"""

__version__ = "0.1.0"
