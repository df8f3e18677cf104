"""bidir_export: verified ONNX export and TensorRT engines (dynamic batch and sequence) for bidir models.

from bidir_export import export_onnx, verify_export, build_engine
"""

from bidir_export.onnx_export import export_onnx, verify_export
from bidir_export.tensorrt_build import build_engine

__version__ = "0.1.0"

__all__ = ["build_engine", "export_onnx", "verify_export"]
