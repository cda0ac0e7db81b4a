"""GLMXError: the one base of every failure a user can cause or fix (bad input, a refused artifact, a missed budget).

The CLI prints any GLMXError as one line and exits with status 1; anything else reaching it is a bug in glmx.
Each stage's error class (ConfigError, ManifestError, QuantizeError, ...) derives from it and from the builtin
exception its callers have always caught (ValueError, RuntimeError).
"""

from __future__ import annotations


class GLMXError(Exception):
    """A user-facing failure whose message says what is wrong and how to fix it."""


# What to install for a command of the export side (torch, onnx, ...), said by every "needs the export extra"
# hint. torch comes first from PyTorch's CPU index: on PyPI the Linux torch wheel is the CUDA build, which pulls
# several GB of nvidia-* packages (README, Install); the extra then finds torch installed.
EXPORT_EXTRA_HINT = (
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu, then "
    "pip install 'glmx[export]' (in a clone: pip install -e '.[export]')"
)
