"""GLMConfig lives in the torch-free runtime (glm_runtime.config) so both sides share one definition."""
from glm_runtime.config import (  # noqa: F401
    GELU_KINDS, LAYERNORM_EPS, PRESETS, TOKENIZER_KINDS, ConfigError, GLMConfig, get_preset,
)
