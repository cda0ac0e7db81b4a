"""glm_export: the torch side of glmx (reference model, checkpoints, pretraining, export, quantization).

Importing this package does not import torch; the modules that need it do.
"""

from glm_runtime import __version__  # noqa: F401  one version for the whole toolchain
