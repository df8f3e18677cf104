"""bidir_export: ONNX export and TensorRT engine building for bidir models.

Not implemented yet; see the package README.
"""

__version__ = "0.1.0"
