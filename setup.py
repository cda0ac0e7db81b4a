"""glmx's build configuration lives in pyproject.toml ([project], [tool.setuptools]); this file stays only as a shim
for tools that still run setup.py directly."""

from setuptools import setup

setup()
