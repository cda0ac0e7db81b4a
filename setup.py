"""glmx: GLM (2021, blank infilling) from a PyTorch checkpoint to ONNX, ONNX Runtime and TensorRT."""
from setuptools import setup

setup(
    name="glmx",
    version="0.1.0",
    description="Export, quantize and run GLM (General Language Model) blank infilling on ONNX Runtime and TensorRT",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the benchmarks install under a name of their own (the folder keeps the fixed layout's name)
    packages=["glm_export", "glm_runtime", "glmx_benchmarks"],
    package_dir={"glm_runtime": "runtime", "glmx_benchmarks": "benchmarks"},
    # the bundled model: its exported ONNX folder ships with the runtime, its checkpoint with glm_export
    package_data={"glm_runtime": ["bundled/*/*"], "glm_export": ["data/*", "bundled/*", "bundled/*/*"]},
    include_package_data=True,
    # The base install is the torch-free runtime.
    install_requires=["numpy>=1.24", "tokenizers>=0.15", "onnxruntime>=1.17", "click>=8.1", "tqdm>=4.60"],
    extras_require={
        # torch is pinned in .ci/run to the local CPU build; an open range here would let pip pull a CUDA build
        # only where no torch is installed yet, so the ranges are kept tight around tested versions.
        "export": ["torch>=2.1,<2.15", "onnx>=1.16", "onnx-ir>=0.1", "safetensors>=0.4", "sentencepiece>=0.1.99"],
        # replaces onnxruntime with onnxruntime-gpu (uninstall onnxruntime first: both provide the module)
        "gpu": ["onnxruntime-gpu>=1.17", "tensorrt>=10.0", "cuda-python>=12.0"],
        # glmx serve: the ASGI app, its server, its metrics (runtime only: no torch)
        "serve": ["starlette>=0.37", "uvicorn>=0.29", "prometheus-client>=0.20"],
        # glmx serve on a Ray cluster: replicas of the same app under Ray Serve's autoscaling
        "serve-ray": ["ray[serve]>=2.9", "starlette>=0.37", "uvicorn>=0.29", "prometheus-client>=0.20"],
        "dev": ["pytest>=7", "matplotlib>=3.7", "psutil>=5.9", "httpx>=0.24", "gguf>=0.10"],
    },
    entry_points={"console_scripts": ["glmx=glm_runtime.cli:run"]},
)
