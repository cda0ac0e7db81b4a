"""GLMXError: the one base of every failure a user can cause or fix (bad input, a refused artifact, a missed budget).

The CLI prints any GLMXError as one line and exits with status 1; anything else reaching it is a bug in glmx.
Each stage's error class (ConfigError, ManifestError, QuantizeError, ...) derives from it and from the builtin
exception its callers have always caught (ValueError, RuntimeError).
"""

from __future__ import annotations


class GLMXError(Exception):
    """A user-facing failure whose message says what is wrong and how to fix it."""
