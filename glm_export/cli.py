"""The export side's `glmx` commands (convert, pretrain, evaluate, export, check-trt, optimize, quantize,
build-engine, bench): they join the runtime's command group (glm_runtime.cli) and import torch-side modules only
inside the commands, so `glmx fill` stays torch-free.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from glm_runtime.cli import main
from glm_runtime.command_group import CommandError, one_line
from glm_runtime.errors import EXPORT_EXTRA_HINT


def require_export_extra(torch: bool = True) -> None:
    """The export extra must be installed; torch=False: only its ONNX side (optimize, quantize never load torch,
    which takes seconds to import)."""
    import importlib.util

    missing = [m for m in (("torch", "onnx") if torch else ("onnx",)) if importlib.util.find_spec(m) is None]
    if missing:
        raise CommandError(f"this command needs the export extra ({', '.join(missing)} missing): {EXPORT_EXTRA_HINT}")


def _source_options(command):
    """--preset / --config / --tokenizer / --tokenizer-kind / --gelu / --rotary-inv-freq / --lora: how a checkpoint
    folder is read, shared by convert and export (glm_export.checkpoint.open_checkpoint)."""
    options = [
        click.option(
            "--preset",
            default=None,
            help="a released model's config (glmx config lists them), for a checkpoint without config.json",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="config file (a Hugging Face config.json or glmx GLMConfig JSON) instead of the folder's; for "
            "GLM-130B's SAT folder (no config of its own), the model arguments it runs with: "
            "configs/model_glm_130b.sh (its MODEL_ARGS) or a JSON of the same names",
        ),
        click.option(
            "--tokenizer",
            "tokenizer_file",
            type=click.Path(exists=True),
            default=None,
            help="tokenizer file or folder to ship [default: the checkpoint's own; a folder without one, such as "
            "GLM-130B's SAT shards, needs it: ice_text.model]",
        ),
        click.option(
            "--tokenizer-kind",
            type=click.Choice(["gpt2", "roberta", "bert", "chinese-sp", "chinese-sp-fix", "json", "chatglm", "icetk"]),
            default=None,
            help="the tokenizer's kind when the folder cannot tell (a SentencePiece model of unknown size: "
            "chinese-sp-fix = GLM-Large-Chinese ids, chinese-sp = GLM-10B-Chinese) [default: "
            "tokenizer_config.json, then the files, then the preset whose sizes match]",
        ),
        click.option(
            "--gelu",
            type=click.Choice(["tanh", "erf"]),
            default=None,
            help="GeLU the model was trained with [default: the config's; else erf for a Hugging Face folder "
            "(its remote code), tanh for a Megatron one (the original training code); ChatGLM-6B: tanh]",
        ),
        click.option(
            "--rotary-inv-freq",
            type=click.Choice(["fp16", "fp32"]),
            default=None,
            help="ChatGLM-6B's rotary frequencies: fp16 = rounded to fp16 as the HF remote code does even in fp32 "
            "(what the weights were published with); fp32 = exact, as chatglm.cpp and TensorRT-LLM compute "
            "(logits 1e-3..1e-2 apart at a few hundred positions) [default: fp16]",
        ),
        click.option(
            "--lora",
            type=click.Path(exists=True, file_okay=False),
            metavar="DIR",
            default=None,
            help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors or .bin) to merge "
            "into the weights as they are read: W + lora_alpha/r x B @ A (alpha/sqrt(r) with use_rslora) in "
            "float32, in the published row order; recorded in the manifest",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_options(preset, config_file, tokenizer_file, tokenizer_kind, gelu, rotary_inv_freq=None) -> dict:
    from pathlib import Path

    if preset is not None and config_file is not None:
        raise CommandError("give --preset or --config, not both")
    return {
        "config": Path(config_file) if config_file else preset,
        "tokenizer": tokenizer_file,
        "tokenizer_kind": tokenizer_kind,
        "gelu": gelu,
        "rotary_inv_freq": rotary_inv_freq,
    }


@main.command("convert")
@click.argument("src", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="glmx checkpoint folder to write")
@_source_options
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default=None,
    help="weights dtype to write (default: the source's)",
)
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option(
    "--tensor-parallel",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="write GLM-130B's SAT layout instead (latest + <iter>/mp_rank_XX_model_states.pt, N ranks, as the "
    "release ships 8), for a GLM-130B model; read it back with --config MODEL_ARGS.sh",
)
def convert_cmd(
    src: str,
    out_dir: str,
    preset,
    config_file,
    tokenizer_file,
    tokenizer_kind,
    gelu,
    rotary_inv_freq,
    lora,
    dtype: str | None,
    overwrite: bool,
    tensor_parallel: int | None,
) -> None:
    """Convert a GLM checkpoint (glmx, Hugging Face, Megatron/DeepSpeed or GLM-130B SAT layout) into a glmx
    folder (with --tensor-parallel N: GLM-130B's SAT layout).

    Everything decided about the model (config, GeLU, tokenizer kind) is printed and written into the manifest.
    """
    require_export_extra()
    from glm_export.checkpoint import CheckpointError, convert_checkpoint
    from glm_runtime.config import ConfigError
    from glm_runtime.manifest import ManifestError

    options = _load_options(preset, config_file, tokenizer_file, tokenizer_kind, gelu, rotary_inv_freq)
    try:
        loaded, out = convert_checkpoint(
            src, out_dir, dtype=dtype, lora=lora, overwrite=overwrite, tensor_parallel=tensor_parallel, **options
        )
    except (CheckpointError, ConfigError, ManifestError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None
    cfg = loaded.config
    click.echo(f"layout: {loaded.layout} ({len(loaded.files)} weight file(s), {loaded.source_dtype})")
    click.echo(
        f"config: {cfg.name} L={cfg.num_layers} h={cfg.hidden_size} n={cfg.num_attention_heads} "
        f"P={cfg.max_sequence_length} V={cfg.vocab_size} gelu={cfg.gelu} tokenizer={cfg.tokenizer}"
    )
    click.echo(f"parameters: {loaded.num_parameters():,}")
    for note in loaded.notes:
        click.echo(f"note: {note}")
    if tensor_parallel is not None:
        from glm_export.sat import model_args

        click.echo(f"model arguments: {model_args(cfg, tensor_parallel)}")
    click.echo(f"wrote {out}")


@main.command("pretrain")
@click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("work_dir", type=click.Path(file_okay=False))
@click.option(
    "--checkpoint-dir",
    "--export-dir",
    "checkpoint_dir",
    type=click.Path(file_okay=False),
    help="glmx checkpoint folder written at the last step (a checkpoint, not ONNX: `glmx export` makes that; "
    "--export-dir is its old name)",
)
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seq-length", type=int, default=256, show_default=True, help="tokens per sample before corruption")
@click.option("--lr", type=float, default=6e-4, show_default=True)
@click.option("--warmup-steps", type=int, default=100, show_default=True)
@click.option("--min-lr-ratio", type=float, default=0.1, show_default=True)
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--beta1", type=float, default=0.9, show_default=True)
@click.option("--beta2", type=float, default=0.98, show_default=True)
@click.option("--adam-eps", type=float, default=1e-6, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--dropout", type=float, default=0.1, show_default=True)
@click.option("--vocab-size", type=int, default=8000, show_default=True, help="BPE size before padding to 128")
@click.option("--num-layers", type=int, default=4, show_default=True)
@click.option("--hidden-size", type=int, default=256, show_default=True)
@click.option("--num-attention-heads", type=int, default=4, show_default=True)
@click.option("--max-sequence-length", type=int, default=512, show_default=True)
@click.option("--bert-prob", type=float, default=1.0, show_default=True)
@click.option("--gap-sentence-prob", type=float, default=0.0, show_default=True)
@click.option(
    "--gpt-infill-prob",
    type=float,
    default=1.0,
    show_default=True,
    help="in document ([gMASK]) mode, the share of prefix + [gMASK] + suffix samples; the rest get one "
    "[gMASK] span inside the text (GLM used 0.5; 1.0 is the bundled model's recipe)",
)
@click.option(
    "--position-init",
    type=click.Choice(["local", "sinusoidal", "normal"]),
    default="local",
    show_default=True,
    help="how training starts: 'local' = sine/cosine position table plus two layer-0 heads that look at the "
    "previous / next token (lets a small model use a [MASK]'s neighbours within a CPU budget); "
    "'sinusoidal' = the table only; 'normal' = GLM's N(0, 0.02) init",
)
@click.option("--heldout-fraction", type=float, default=0.02, show_default=True)
@click.option("--eval-batches", type=int, default=4, show_default=True)
@click.option("--eval-every", type=int, default=100, show_default=True)
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option(
    "--stop-after",
    type=int,
    default=None,
    help="stop (with a checkpoint) after this many steps of this call; run again to resume",
)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default="glmx-pretrained", show_default=True, help="model name written into the config")
@click.option("--overwrite", is_flag=True, help="replace an existing --checkpoint-dir")
def pretrain_cmd(**kwargs) -> None:
    """Pretrain a GLM from scratch (blank infilling) on CORPUS_DIR's .txt files; resumes from WORK_DIR."""
    require_export_extra()
    from glm_export.pretrain import PretrainError, pretrain

    try:
        result = pretrain(**kwargs)
    except (PretrainError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None
    click.echo(
        json.dumps({"step": result["step"], "evals": result["evals"][-1:], "checkpoint_dir": result["checkpoint_dir"]})
    )


@main.command("evaluate")
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="write the metrics JSON here")
@click.option("--fill-examples", type=int, default=500, show_default=True, help="single-word [MASK] fills scored")
@click.option("--ppl-batches", type=int, default=8, show_default=True, help="held-out batches for Part B perplexity")
@click.option("--threads", type=int, default=2, show_default=True)
def evaluate_cmd(**kwargs) -> None:
    """Held-out Part B perplexity and single-word [MASK] exact match, each beside a unigram baseline."""
    require_export_extra()
    from glm_export.evaluate import EvaluateError, evaluate

    try:
        metrics = evaluate(**kwargs)
    except EvaluateError as exc:
        raise CommandError(str(exc)) from None
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "examples"}, indent=2))


@main.command("build-engine")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="engine folder to write")
@click.option("--max-batch", default=1, show_default=True, type=int, help="most rows per call (prompts x beams)")
@click.option("--max-context", default=None, type=int, help="longest prompt in tokens [default: P - max-new-tokens]")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="most generated tokens per prompt")
@click.option("--workspace-gb", default=None, type=float, help="builder workspace limit in GiB [default: TensorRT's]")
@click.option(
    "--timing-cache",
    default=None,
    type=click.Path(dir_okay=False),
    help="timing cache reused across builds [default: ~/.cache/glmx/trt_timing.cache]",
)
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def build_engine_cmd(
    model_dir: str,
    out_dir: str,
    max_batch: int,
    max_context: int | None,
    max_new_tokens: int,
    workspace_gb: float | None,
    timing_cache: str | None,
    overwrite: bool,
) -> None:
    """Build a TensorRT engine folder from a glmx ONNX folder (needs an NVIDIA GPU and TensorRT >= 10)."""
    from glm_export.trt_build import EngineBuildError, build_engine
    from glm_runtime.manifest import ManifestError, load_manifest
    from glm_runtime.trt_session import TensorRTError

    try:
        out = build_engine(
            model_dir,
            out_dir,
            max_batch=max_batch,
            max_context=max_context,
            max_new_tokens=max_new_tokens,
            workspace_gb=workspace_gb,
            timing_cache=timing_cache,
            overwrite=overwrite,
        )
    except (EngineBuildError, TensorRTError, ManifestError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None
    m = load_manifest(out, kind="engine")
    gpu, parity = m.extra["gpu"], m.parity
    click.echo(
        f"TensorRT {m.extra['tensorrt']['version']} on {gpu['name']} (sm {gpu['compute_capability']}), "
        f"{m.precision}, built in {m.extra['build']['seconds']} s"
    )
    for p in m.extra["profiles"]:
        click.echo(f"profile {p['name']:8s} " + " ".join(f"{k}={lo}..{hi}" for k, (lo, _, hi) in p["dims"].items()))
    click.echo(
        f"parity vs ONNX Runtime: max |logit diff| {parity['max_abs_diff']['logits']:.3g} "
        f"(max|ref| {parity['max_abs_ref']['logits']:.3g}, budget {parity['tolerance']['atol']:g} + "
        f"{parity['tolerance']['rtol']:g}*max|ref|), top-1 agreement {parity['top1_agreement']:.3f}"
    )
    click.echo(f"wrote {out}")


@main.command("export")
@click.argument("checkpoint", required=False, type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="ONNX folder to write")
@_source_options
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int4-weight", "int8-weight"]),
    default=None,
    help="fp32 or fp16; a published int4 / int8 folder (chatglm-6b-int4 / -int8) exports its own integers as "
    "int4-weight / int8-weight [default: fp32; such a folder: its own bits]",
)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="weights in model.onnx.data beside model.onnx, streamed as the graph is built [default: past 256 MiB]",
)
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option(
    "--no-validate",
    "validate",
    is_flag=True,
    flag_value=False,
    default=True,
    help="skip the parity check against the torch reference (recorded as skipped)",
)
@click.option(
    "--check",
    type=click.Choice(["auto", "whole", "piecewise"]),
    default="auto",
    show_default=True,
    help="how the parity check runs: whole = one session of the graph and of the torch model (holds "
    "both in memory); piecewise = one layer at a time, same cases and budgets; auto = whole up to "
    "256 MiB of fp32 weights",
)
@click.option(
    "--no-tokenizer",
    is_flag=True,
    help="export the graph without a tokenizer (it then cannot fill text or be quantized)",
)
@click.option(
    "--ptuning",
    type=click.Path(exists=True, file_okay=False),
    metavar="DIR",
    default=None,
    help="a ChatGLM-6B P-tuning v2 checkpoint (ptuning/main.py's checkpoint-N/: config.json with pre_seq_len and "
    "prefix_projection, pytorch_model.bin or model.safetensors holding only transformer.prefix_encoder.*): its "
    "prefix keys/values are computed once (float32) into prefix.safetensors, hashed in the manifest, and put in "
    "front of every sequence by fill, score and serve (no positions, visible to every token); the parity check "
    "runs with it. quantize, optimize and build-engine carry it over",
)
def export_cmd(
    checkpoint: str | None,
    out_dir: str,
    preset,
    config_file,
    tokenizer_file,
    tokenizer_kind,
    gelu,
    rotary_inv_freq,
    **kwargs,
) -> None:
    """Export CHECKPOINT (default: the bundled glmx-small) to a validated ONNX folder.

    CHECKPOINT is a glmx folder, a Hugging Face folder as the hub publishes it, or a Megatron/DeepSpeed folder.
    What was decided about it (config, GeLU, tokenizer kind) is printed and recorded in the manifest.
    The weights are read one tensor at a time and written as the graph is built: memory stays near the largest
    tensor whatever the model's size (GLM-10B on a 24 GiB machine; benchmarks/results/scale.md).
    """
    require_export_extra()
    from glm_export.checkpoint import CheckpointError
    from glm_export.compare import ParityError
    from glm_export.export import ExportError, export_onnx
    from glm_runtime.config import ConfigError
    from glm_runtime.manifest import ManifestError

    options = _load_options(preset, config_file, tokenizer_file, tokenizer_kind, gelu, rotary_inv_freq)
    options["tokenizer_file"] = options.pop("tokenizer")
    try:
        out = export_onnx(checkpoint, out_dir, log=lambda msg: click.echo(msg, err=True), **options, **kwargs)
    except (ExportError, ParityError, CheckpointError, ConfigError, ManifestError) as exc:
        raise CommandError(str(exc)) from None
    click.echo(str(out))


@main.command("check-trt")
@click.argument("model", type=click.Path(exists=True))
def check_trt_cmd(model: str) -> None:
    """List the nodes of MODEL (.onnx or ONNX folder) that TensorRT's ONNX parser does not support."""
    try:
        from glm_export.trt_check import check_trt, support_list
    except ImportError as exc:
        raise CommandError(
            f"check-trt reads the graph with the onnx package, which is not installed ({exc}): {EXPORT_EXTRA_HINT}"
        ) from None
    try:
        findings = check_trt(model)
    except Exception as exc:
        if isinstance(exc, (OSError, click.ClickException)):
            raise
        raise CommandError(
            f"{model} is not a readable ONNX graph ({type(exc).__name__}: {one_line(exc)}); re-export it (glmx export)"
        ) from None
    src = support_list()["source"]
    for f in findings:
        click.echo(str(f))
    if findings:
        raise CommandError(f"{len(findings)} finding(s) against TensorRT {src['tensorrt_version']}'s ONNX parser")
    click.echo(f"ok: every node is supported by TensorRT {src['tensorrt_version']}'s ONNX parser ({src['document']})")


@main.command("optimize")
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="folder to write")
@click.option(
    "--level",
    type=click.Choice(["fuse", "basic", "extended"]),
    default="fuse",
    show_default=True,
    help="fuse: glmx's rewrite (each GeLU subgraph -> one standard Gelu op, opset 20); basic / "
    "extended: ONNX Runtime's offline optimizer (kept only if TensorRT can still parse it; holds "
    "the whole model, so up to 2 GB)",
)
@click.option(
    "--check",
    type=click.Choice(["auto", "whole", "piecewise"]),
    default="auto",
    show_default=True,
    help="how child and parent are compared (as glmx quantize --check)",
)
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def optimize_cmd(src_dir: str, out_dir: str, **kwargs) -> None:
    """Optimize an exported ONNX folder offline, re-checked against its parent."""
    require_export_extra(torch=False)
    from glm_export.compare import BudgetError
    from glm_export.derive import DeriveError
    from glm_export.optimize import OptimizeError, optimize_onnx
    from glm_runtime.manifest import ManifestError

    try:
        click.echo(str(optimize_onnx(src_dir, out_dir, log=lambda msg: click.echo(msg, err=True), **kwargs)))
    except (OptimizeError, BudgetError, DeriveError, ManifestError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None


@main.command("quantize")
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="folder to write")
@click.option(
    "--scheme",
    required=True,
    type=click.Choice(["int4-weight", "int8-weight", "int8-dynamic", "qdq-int8", "fp16"]),
    help="int4-weight / int8-weight: MatMulNBits weights, activations fp32, written one tensor at a time "
    "(any size, from an fp32 or fp16 export); int8-dynamic (MatMulInteger) and qdq-int8 (TensorRT) "
    "run ONNX Runtime's quantizers on the whole model (up to 2 GB); fp16: the exporter's fp16 graph",
)
@click.option(
    "--check",
    type=click.Choice(["auto", "whole", "piecewise"]),
    default="auto",
    show_default=True,
    help="how child and parent are compared: whole sessions (with greedy fills), or one layer at a time "
    "(teacher-forced text only); auto = whole up to 256 MiB of fp32 weights",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="qdq-int8: real text to calibrate on [default: glm_export/data/calibration.txt]",
)
@click.option(
    "--block-size",
    type=int,
    default=None,
    help="int4/int8-weight: weights per scale in the attention matmuls, and in the MLP's too when "
    "--mlp-block-size is not given [default: 32, the MLP's 128]",
)
@click.option(
    "--accuracy-level",
    type=int,
    default=None,
    help="int4/int8-weight: MatMulNBits compute level (4 = int8 products) [default: 4]",
)
@click.option(
    "--head-bits",
    type=click.Choice(["4", "8"]),
    default=None,
    help="int4/int8-weight: bits of the quantized output head [default: 8]",
)
@click.option(
    "--head-block-size",
    type=int,
    default=None,
    help="int4/int8-weight: weights per scale in the head [default: int4-weight 128, int8-weight 32]",
)
@click.option(
    "--mlp-block-size",
    type=int,
    default=None,
    help="int4/int8-weight: weights per scale in each layer's two MLP matmuls, 2/3 of its weights "
    "[default: 128, or --block-size when that is given]",
)
@click.option(
    "--keep-fp32",
    multiple=True,
    default=None,
    help="roles (embedding, head, first-layer, last-layer) or node names left in fp32; repeat the option "
    "[default: embedding; int8-dynamic and qdq-int8 also head and first-layer; fp16 keeps none and refuses it]",
)
@click.option("--accept-loss", is_flag=True, help="write the artifact even if it misses its accuracy budget")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def quantize_cmd(src_dir: str, out_dir: str, **kwargs) -> None:
    """Quantize an exported ONNX folder; refuses (writes nothing) when it misses its accuracy budget."""
    require_export_extra(torch=False)
    from glm_export.compare import BudgetError, ppl_change_text
    from glm_export.derive import DeriveError
    from glm_export.quantize import QuantizeError, quantize_onnx
    from glm_runtime.manifest import ManifestError, load_manifest

    try:
        head_bits = None if kwargs["head_bits"] is None else int(kwargs["head_bits"])
        out = quantize_onnx(
            src_dir,
            out_dir,
            log=lambda msg: click.echo(msg, err=True),
            **dict(kwargs, keep_fp32=kwargs["keep_fp32"] or None, head_bits=head_bits),
        )
    except (QuantizeError, BudgetError, DeriveError, ManifestError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None
    acc = load_manifest(out).parity["text"]
    fills = "not run (piecewise check)" if acc["fill_agreement"] is None else f"{acc['fill_agreement']:.3f}"
    click.echo(
        f"against its parent on {acc['positions']} positions of {acc['language']} held-out text "
        f"({acc['heldout']['source']}): top-1 agreement {acc['top1_agreement']:.4f}, fill agreement "
        f"{fills}, Part B ppl change {ppl_change_text(acc['ppl_change'])}, max logit diff "
        f"{acc['max_logit_diff']:.3g}"
        + ("" if acc["within_budget"] else f" (OVER BUDGET, accepted: {'; '.join(acc['misses'])})")
    )
    click.echo(str(out))


@main.command("bench")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="model(s) to measure: bundled, glm-large-shape, tiny, or the folder of your own fp32 export "
    "(glmx export CHECKPOINT -o FOLDER); repeat [default: bundled and glm-large-shape; --quick: tiny]",
)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    help="backend/precision variant(s), e.g. torch-fp32, ort-fp32, ort-int8, ort-int4; repeat [default: all]",
)
@click.option("--quick", is_flag=True, help="tiny model, torch + ORT fp32, small grid: seconds (CI)")
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="results folder [default: a new glmx-bench-DATE-TIME folder here; --quick: a temporary folder, removed at "
    "the end after its results.md is printed]; the committed results are regenerated with -o benchmarks/results",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default="/tmp/glmx-bench-cache",
    show_default=True,
    help="where exported and quantized benchmark models are kept between runs",
)
@click.option("--context", "contexts", multiple=True, type=int, help="context lengths; repeat")
@click.option("--past", "pasts", multiple=True, type=int, help="past lengths for decode latency; repeat")
@click.option("--batch", "batches", multiple=True, type=int, help="batch sizes for throughput; repeat")
@click.option("--threads", type=int, default=None, help="threads per backend [default: 2; --quick: 1]")
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=None,
    help="how often the target figures (context 128, decode at past 128, batch 8) are measured, variants "
    "in rotated order; the report gives each target's median and range over the rounds "
    "[default: 3; --quick: 2]",
)
@click.option("--no-plots", "plots", is_flag=True, flag_value=False, default=True, help="skip the PNG plots")
@click.option(
    "--llamacpp",
    "llamacpp",
    type=click.Path(file_okay=False),
    envvar="GLMX_LLAMACPP",
    default=None,
    help="a llama.cpp build (bin/llama-bench, bin/llama-quantize; benchmarks/build_llamacpp.sh makes one):"
    " adds llama.cpp's decode at fp32 / Q8_0 / Q4_0 beside glmx's fp32 / int8-weight / int4-weight on"
    " the GLM-Large shape, interleaved (llamacpp.json / .md)",
)
@click.option(
    "--chatglmcpp",
    "chatglmcpp",
    type=click.Path(file_okay=False),
    envvar="GLMX_CHATGLMCPP",
    default=None,
    help="a chatglm.cpp build (bin/main, chatglm_cpp/convert.py; benchmarks/build_chatglmcpp.sh makes one): adds "
    "chatglm.cpp's Q4_0 / Q8_0 beside glmx's int4-weight / int8-weight on a random ChatGLM-6B-shaped model built "
    "into --cache-dir: decode at batch 1, a 512-token prompt, 8 chats, interleaved (chatglmcpp.json / .md)",
)
@click.option(
    "--chatglmcpp-layers",
    type=click.IntRange(1, 28),
    default=28,
    show_default=True,
    help="how many of ChatGLM-6B's 28 layers that model has (its full width and vocabulary either way): 28 takes "
    "about 30 minutes to build the first time on 2 cores and 20 GB of disk; 2 a few minutes",
)
@click.option(
    "--readme-table",
    "readme_json",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="only print the README's performance table from this results.json",
)
def bench_cmd(
    readme_json: str | None, llamacpp: str | None, chatglmcpp: str | None, chatglmcpp_layers: int, **kwargs
) -> None:
    """Benchmark every backend/precision against torch eager fp32 and the hardware floor."""
    import shlex

    if readme_json:
        from glmx_benchmarks.report import print_readme_table

        print_readme_table(readme_json)
        return
    require_export_extra()
    check_peers(llamacpp, chatglmcpp)
    from glmx_benchmarks.bench import BenchmarkError, run_benchmarks

    for key in ("models", "variants", "contexts", "pasts", "batches"):
        kwargs[key] = tuple(kwargs[key]) or None
    if kwargs["models"] is None:
        kwargs["models"] = ("tiny",) if kwargs["quick"] else ("bundled", "glm-large-shape")
    if kwargs["out_dir"] is None and not kwargs["quick"]:  # a new folder: a run never writes over earlier results
        import time

        kwargs["out_dir"] = time.strftime("glmx-bench-%Y%m%d-%H%M%S")
    if kwargs["threads"] is None:
        kwargs["threads"] = 1 if kwargs["quick"] else 2
    command = ["glmx", "bench"] + (["--quick"] if kwargs["quick"] else [])  # the options this run resolved to
    for key, flag in (
        ("models", "--model"),
        ("variants", "--variant"),
        ("contexts", "--context"),
        ("pasts", "--past"),
        ("batches", "--batch"),
    ):
        for value in kwargs[key] or ():
            command += [flag, str(value)]
    command += ["--threads", str(kwargs["threads"]), "--cache-dir", kwargs["cache_dir"]]
    command += ["--rounds", str(kwargs["rounds"])] if kwargs["rounds"] is not None else []
    command += (["-o", kwargs["out_dir"]] if kwargs["out_dir"] else []) + ([] if kwargs["plots"] else ["--no-plots"])
    scratch = kwargs["out_dir"] is None  # --quick without -o: a temporary folder, gone at the end
    if scratch:
        import tempfile

        kwargs["out_dir"] = tempfile.mkdtemp(prefix="glmx-bench-")  # after `command`: no -o was asked for
    try:
        try:
            results = run_benchmarks(command=shlex.join(command), **kwargs)
        except (BenchmarkError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        peer_columns(
            llamacpp, chatglmcpp, chatglmcpp_layers, kwargs["cache_dir"], results["out_dir"], kwargs["threads"]
        )
        if scratch:  # what the folder held that a reader wants: the tables
            click.echo((Path(results["out_dir"]) / "results.md").read_text(encoding="utf-8"), nl=False)
        else:
            click.echo(results["out_dir"])
    finally:
        if scratch:
            import shutil

            shutil.rmtree(kwargs["out_dir"], ignore_errors=True)


def check_peers(llamacpp: str | None, chatglmcpp: str | None) -> None:
    """Each peer build asked for exists, before any work: a wrong folder is one line, not a failure at the end."""
    from glmx_benchmarks.chatglmcpp import find_chatglmcpp
    from glmx_benchmarks.llamacpp import PeerError, find_llamacpp

    try:
        if llamacpp is not None:
            find_llamacpp(llamacpp)
        if chatglmcpp is not None:
            find_chatglmcpp(chatglmcpp)
    except PeerError as exc:
        raise CommandError(str(exc)) from None


def peer_columns(
    llamacpp: str | None, chatglmcpp: str | None, layers: int, cache_dir: str, out_dir: str, threads: int
) -> None:
    """The optional peer comparisons of glmx bench, written beside its results."""

    def log(message: str) -> None:
        click.echo(message, err=True)

    if llamacpp is not None:
        from glmx_benchmarks.llamacpp import llamacpp_column

        llamacpp_column(llamacpp, cache_dir, out_dir, threads=threads, log=log)
    if chatglmcpp is not None:
        from glmx_benchmarks.chatglmcpp import chatglmcpp_column

        chatglmcpp_column(chatglmcpp, cache_dir, out_dir, threads=threads, layers=layers, log=log)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
