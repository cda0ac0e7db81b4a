"""The `glmx` command line: one thin command per pipeline stage, each mapping onto one function.

Imports of torch-side modules happen inside the commands, so `glmx fill` runs on a torch-free install.
"""
from __future__ import annotations

import json
import sys

import click


class GLMXError(click.ClickException):
    """A user-facing failure: printed as one line, exit status 1."""


def require_export_extra() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise GLMXError("this command needs the export extra: pip install 'glmx[export]'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="glmx", prog_name="glmx")
def main() -> None:
    """glmx: GLM blank infilling from a PyTorch checkpoint to ONNX Runtime and TensorRT.

    \b
    Stages:  pretrain -> export -> optimize / quantize -> build-engine -> fill / bench
    Every artifact folder carries a manifest.json that later stages check.
    """


@main.command("config")
@click.argument("preset", required=False)
def config_cmd(preset: str | None) -> None:
    """Print a preset's GLMConfig as JSON, or list the presets."""
    from glm_runtime.config import PRESETS, ConfigError, get_preset
    if preset is None:
        for name, cfg in PRESETS.items():
            click.echo(f"{name:20s} L={cfg.num_layers:<3d} h={cfg.hidden_size:<5d} n={cfg.num_attention_heads:<3d} "
                       f"P={cfg.max_sequence_length:<5d} V={cfg.vocab_size:<6d} tokenizer={cfg.tokenizer} "
                       f"params={cfg.num_parameters() / 1e6:.0f}M")
        return
    try:
        click.echo(get_preset(preset).to_json())
    except ConfigError as exc:
        raise GLMXError(str(exc)) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
