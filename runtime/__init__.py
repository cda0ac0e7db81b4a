"""glm_runtime: GLM blank filling with numpy, tokenizers and ONNX Runtime or TensorRT. Never imports torch."""

__version__ = "0.1.0"
