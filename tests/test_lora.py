"""LoRA adapters (glm_export/lora.py) in PEFT's format, written here with numpy, torch.save and safetensors: merged
at convert and at export, judged against the independent oracles (tests/oracle_chatglm.py, tests/oracle_glm.py)
run on the hub folder's weights merged by hand in the published row order (W + alpha/r * B @ A); the QKV rows a
delta lands on, fan_in_fan_out, the manifest record, and the adapters refused in one line with nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from click.testing import CliRunner

from glm_export.cli import main
from glm_export.published import blocks_to_per_head
from tests import oracle_chatglm as oc
from tests import oracle_glm
from tests.chatglm_folders import make_chatglm_folder

GMASK, MASK, SOP = 600, 601, 602  # special ids of the tiny ChatGLM (these tests feed ids), inside its 640 rows
PROMPT = [5, 17, 33, 9, 44, 71, 12, GMASK, SOP]
FP32 = (1e-4, 3e-5)  # glmx's fp32 parity budget: atol + rtol * max|ref| (glm_export.compare.TOLERANCES)
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
H, HEADS, D = 64, 4, 16  # the tiny ChatGLM's width, heads and head width (tests/chatglm_folders.py defaults)
QUIET = {"log": lambda msg: None}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return make_chatglm_folder(tmp_path_factory.mktemp("chatglm") / "chatglm-6b", seed=5)


@pytest.fixture(scope="module")
def oracle(hub):
    return oc.load_hf_folder(str(hub))  # published names and rows, float32


# ---------------------------------------------------------------- adapters as PEFT saves them, and merged by hand


def random_pairs(sd: dict, modules, r: int = 4, seed: int = 0) -> dict:
    """module -> (lora_A [r, in], lora_B [out, r]) for each `module.weight` of the published state dict; B is
    non-zero, as after training."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for module in modules:
        out, inp = sd[f"{module}.weight"].shape
        pairs[module] = (
            rng.normal(0, 0.1, (r, inp)).astype(np.float32),
            rng.normal(0, 0.1, (out, r)).astype(np.float32),
        )
    return pairs


def layer_modules(layers: int = 2, linears=LINEARS, prefix: str = "transformer.layers") -> list[str]:
    return [f"{prefix}.{i}.{name}" for i in range(layers) for name in linears]


def write_adapter(
    folder: Path,
    pairs: dict,
    *,
    r: int = 4,
    alpha: float = 8,
    fmt: str = "safetensors",
    adapter_name: str | None = None,
    key_prefix: str = "base_model.model.",
    **settings,
) -> Path:
    """adapter_config.json + adapter_model.safetensors | .bin as PEFT's save_pretrained writes them: keys
    `base_model.model.<module>.lora_A[.<adapter name>].weight`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "THUDM/chatglm-6b",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.1,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in pairs}),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        **settings,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    name = f".{adapter_name}" if adapter_name else ""
    tensors = {}
    for module, (a, b) in pairs.items():
        if a is not None:
            tensors[f"{key_prefix}{module}.lora_A{name}.weight"] = np.ascontiguousarray(a)
        if b is not None:
            tensors[f"{key_prefix}{module}.lora_B{name}.weight"] = np.ascontiguousarray(b)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "adapter_model.bin")
    return folder


def merged_by_hand(sd: dict, pairs: dict, scale: float) -> dict:
    """The published state dict with W + scale * B @ A on each adapted weight, in float64, in the published rows."""
    out = dict(sd)
    for module, (a, b) in pairs.items():
        out[f"{module}.weight"] = np.asarray(sd[f"{module}.weight"], np.float64) + scale * (
            b.astype(np.float64) @ a.astype(np.float64)
        )
    return out


def graph_logits(folder: Path, ids, pos, visible) -> np.ndarray:
    """Logits of an exported folder on ONNX Runtime: ids [B,T], pos [B,2,T], visible [B,1,T,T], no past."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.asarray(ids), "position_ids": np.asarray(pos), "attention_mask": np.asarray(visible)}
    for e in session.get_inputs():
        if e.name.startswith("past_key_values."):
            feeds[e.name] = np.zeros((len(ids), e.shape[1], 0, e.shape[3]), np.float32)
    return session.run(["logits"], feeds)[0]


def chatglm_logits(folder: Path) -> np.ndarray:
    pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
    return graph_logits(folder, [PROMPT], pos[None], ~mask[None])


def oracle_logits(sd: dict, cfg: dict) -> np.ndarray:
    pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
    return oc.forward(sd, cfg, [PROMPT], pos[None], mask[None])[0]


def within(got, want, budget=FP32) -> float:
    atol, rtol = budget
    diff = float(np.abs(np.asarray(got, np.float64) - want).max())
    bound = atol + rtol * float(np.abs(want).max())
    assert diff <= bound, f"max |diff| {diff:.3g} > budget {bound:.3g}"
    return diff


def apart(got, want, budget=FP32) -> None:
    """Far outside the budget: what a test that must tell two weightings apart needs."""
    atol, rtol = budget
    assert float(np.abs(np.asarray(got, np.float64) - want).max()) > 100 * (atol + rtol * float(np.abs(want).max()))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- merged as the oracle merges


@pytest.mark.parametrize(
    "fmt,adapter_name,rslora",
    [("safetensors", None, False), ("bin", "default", False), ("safetensors", "default", True)],
    ids=["safetensors", "bin-with-adapter-name", "rslora"],
)
def test_export_merges_an_adapter_as_the_oracle_does(hub, oracle, tmp_path, fmt, adapter_name, rslora):
    """All four linears of both layers adapted; the graph's logits equal the oracle's on W + scale * B @ A merged
    in the published rows (scale alpha/r, or alpha/sqrt(r) with use_rslora), and are far from the base's."""
    from glm_export.export import export_onnx
    from glm_runtime.manifest import load_manifest

    sd, cfg = oracle
    pairs = random_pairs(sd, layer_modules(), r=4)
    adapter = write_adapter(
        tmp_path / "adapter", pairs, r=4, alpha=8, fmt=fmt, adapter_name=adapter_name, use_rslora=rslora
    )
    out = export_onnx(hub, tmp_path / "onnx", lora=adapter, no_tokenizer=True, **QUIET)
    got = chatglm_logits(out)
    scale = 8 / 2 if rslora else 8 / 4
    within(got, oracle_logits(merged_by_hand(sd, pairs, scale), cfg))
    apart(got, oracle_logits(sd, cfg))
    record = load_manifest(out, kind="onnx").extra["lora"]
    assert record["merged"] == 8 and record["scale"] == scale and record["use_rslora"] is rslora


def test_convert_merges_and_records_the_adapter(hub, oracle, tmp_path):
    """convert --lora writes the merged weights (fp32 here: no rounding), which export as the oracle's; the
    manifest records the adapter: path, the sha256 of both files, r, alpha, scale, targets, tensors merged."""
    from glm_export.checkpoint import convert_checkpoint
    from glm_export.export import export_onnx
    from glm_runtime.manifest import load_manifest

    sd, cfg = oracle
    modules = layer_modules(linears=("attention.query_key_value", "mlp.dense_4h_to_h"))
    pairs = random_pairs(sd, modules, r=2, seed=1)
    adapter = write_adapter(tmp_path / "adapter", pairs, r=2, alpha=5)
    convert_checkpoint(hub, tmp_path / "glmx", dtype="fp32", lora=adapter)
    out = export_onnx(tmp_path / "glmx", tmp_path / "onnx", no_tokenizer=True, **QUIET)
    within(chatglm_logits(out), oracle_logits(merged_by_hand(sd, pairs, 2.5), cfg))
    extra = load_manifest(tmp_path / "glmx", kind="checkpoint").extra
    assert extra["lora"] == {
        "path": str(adapter.resolve()),
        "files": {
            "adapter_config.json": sha256(adapter / "adapter_config.json"),
            "adapter_model.safetensors": sha256(adapter / "adapter_model.safetensors"),
        },
        "r": 2,
        "lora_alpha": 5.0,
        "use_rslora": False,
        "scale": 2.5,
        "target_modules": ["dense_4h_to_h", "query_key_value"],
        "merged": 4,
        "base_model_name_or_path": "THUDM/chatglm-6b",
    }
    assert any(n.startswith("lora: ") and "merged into 4 weights" in n for n in extra["notes"])


def test_an_adapter_merges_into_a_glmx_folder_of_chatglm(hub, oracle, tmp_path):
    """A glmx folder holds ChatGLM's QKV as [Q;K;V] blocks already: the adapter's per-head delta is reordered
    as the base's rows were, and the export still equals the oracle's merge in the published rows."""
    from glm_export.checkpoint import convert_checkpoint
    from glm_export.export import export_onnx

    sd, cfg = oracle
    pairs = random_pairs(sd, layer_modules(), seed=2)
    adapter = write_adapter(tmp_path / "adapter", pairs)
    convert_checkpoint(hub, tmp_path / "glmx", dtype="fp32")
    out = export_onnx(tmp_path / "glmx", tmp_path / "onnx", lora=adapter, no_tokenizer=True, **QUIET)
    within(chatglm_logits(out), oracle_logits(merged_by_hand(sd, pairs, 2.0), cfg))


@pytest.mark.parametrize("layout", ["hub", "glmx"])
def test_the_qkv_delta_lands_on_the_rows_of_the_head_it_was_trained_for(hub, oracle, tmp_path, layout):
    """B non-zero only on head 1's key rows in the published per-head order (rows 1*3d + d .. 1*3d + 2d): in
    glmx's [Q;K;V] blocks exactly head 1's key rows change (h + d .. h + 2d), from a hub folder and from a glmx
    one; and the logits tell this merge from a delta added in the wrong row order."""
    from glm_export.checkpoint import convert_checkpoint, open_checkpoint
    from glm_export.export import export_onnx

    sd, cfg = oracle
    qkv = "transformer.layers.0.attention.query_key_value"
    a, b = random_pairs(sd, [qkv], seed=3)[qkv]
    b[:] = 0
    b[3 * D + D : 3 * D + 2 * D] = np.random.default_rng(4).normal(0, 0.5, (D, b.shape[1]))
    adapter = write_adapter(tmp_path / "adapter", {qkv: (a, b)})
    base = hub
    if layout == "glmx":
        base = convert_checkpoint(hub, tmp_path / "glmx", dtype="fp32")[1]
    merged = open_checkpoint(base, lora=adapter).weights[f"{qkv}.weight"]
    plain = open_checkpoint(base).weights[f"{qkv}.weight"].astype(np.float32)
    changed = np.flatnonzero(np.abs(merged - plain).max(axis=1) > 0)
    assert changed.tolist() == list(range(H + D, H + 2 * D))
    out = export_onnx(base, tmp_path / "onnx", lora=adapter, no_tokenizer=True, validate=False, **QUIET)
    got = chatglm_logits(out)
    within(got, oracle_logits(merged_by_hand(sd, {qkv: (a, b)}, 2.0), cfg))
    wrong = dict(sd)  # the delta added to glmx's blocks as if it were in blocks already
    wrong[f"{qkv}.weight"] = sd[f"{qkv}.weight"] + blocks_to_per_head(2.0 * (b @ a), HEADS)
    apart(got, oracle_logits(wrong, cfg))


def test_fan_in_fan_out_is_ignored_for_linear_layers_as_peft_does(hub, oracle, tmp_path):
    """PEFT sets fan_in_fan_out false for torch.nn.Linear targets (ChatGLM's are), so the delta is B @ A
    [out, in] even where the adapter's config says true; a square attention.dense would take B @ A transposed
    without a shape error, so the values are compared. Said in a note."""
    from glm_export.checkpoint import open_checkpoint

    sd, _ = oracle
    dense = "transformer.layers.1.attention.dense"
    pairs = random_pairs(sd, [dense], seed=6)
    adapter = write_adapter(tmp_path / "adapter", pairs, fan_in_fan_out=True)
    opened = open_checkpoint(hub, lora=adapter)
    a, b = pairs[dense]
    want = sd[f"{dense}.weight"].astype(np.float64) + 2.0 * (b.astype(np.float64) @ a)
    assert np.abs(opened.weights[f"{dense}.weight"] - want).max() < 1e-6
    assert any("fan_in_fan_out" in n and "not transposed" in n for n in opened.notes)


def test_a_glm_2021_folder_takes_an_adapter_under_its_glm_prefix(tmp_path):
    """GLM's HF folder keeps the base under `glm.` and its QKV as [Q;K;V] blocks: PEFT's keys are
    base_model.model.glm.transformer.layers.N.*; the export equals oracle_glm on the merged hub weights."""
    from glm_export.export import export_onnx
    from glm_runtime.config import GLMConfig
    from tests.random_models import random_weights_model

    hub = tmp_path / "glm-hub"
    hub.mkdir()
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=2, max_sequence_length=64)
    model = random_weights_model(
        GLMConfig(vocab_size=256, gelu="erf", hidden_dropout=0.0, attention_dropout=0.0, **shape)
    )
    torch.save({f"glm.{k}": v for k, v in model.state_dict().items()}, hub / "pytorch_model.bin")
    config = {"model_type": "glm", "architectures": ["GLMModel"], "vocab_size": 256, "attention_scale": 1.0, **shape}
    (hub / "config.json").write_text(json.dumps(config))
    sd, cfg = oracle_glm.load_hf_folder(str(hub))
    pairs = random_pairs(sd, layer_modules(linears=("attention.query_key_value", "mlp.dense_h_to_4h")), seed=7)
    adapter = write_adapter(
        tmp_path / "adapter", pairs, key_prefix="base_model.model.glm.", base_model_name_or_path="THUDM/glm-large"
    )
    out = export_onnx(hub, tmp_path / "onnx", lora=adapter, no_tokenizer=True, **QUIET)
    C = 7
    ids = [3, 50, 61, 7, 99, 12, 4]
    got = graph_logits(out, [ids], [[list(range(C)), [0] * C]], np.ones((1, 1, C, C), bool))[0]
    within(got, oracle_glm.forward(merged_by_hand(sd, pairs, 2.0), cfg, ids, list(range(C)), [0] * C, C, "erf"))
    apart(got, oracle_glm.forward(sd, cfg, ids, list(range(C)), [0] * C, C, "erf"))


# ---------------------------------------------------------------- the command line


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.output, result.output
    return lines[-1]


def qkv0(sd: dict) -> dict:
    return random_pairs(sd, ["transformer.layers.0.attention.query_key_value"])


BAD = {  # name -> (how the adapter folder is made, what the one Error line says)
    "not-lora": (lambda f, sd: write_adapter(f, qkv0(sd), peft_type="PREFIX_TUNING"), "not a LoRA adapter"),
    "bias-trained": (lambda f, sd: write_adapter(f, qkv0(sd), bias="all"), "bias 'all'"),
    "modules-to-save": (
        lambda f, sd: write_adapter(f, qkv0(sd), modules_to_save=["lm_head"]),
        "modules_to_save ['lm_head']",
    ),
    "llama-targets": (
        lambda f, sd: write_adapter(
            f,
            {"model.layers.0.self_attn.q_proj": (np.zeros((4, H), np.float32), np.zeros((H, 4), np.float32))},
            target_modules=["q_proj", "v_proj"],
        ),
        "target module 'q_proj' matches no weight of this ChatGLM-6B (v1) checkpoint",
    ),
    "chatglm-6b-sized": (
        lambda f, sd: write_adapter(
            f,
            {
                "transformer.layers.0.attention.query_key_value": (
                    np.zeros((4, 4096), np.float32),
                    np.zeros((12288, 4), np.float32),
                )
            },
        ),
        "query_key_value.lora_B.weight [12288, 4] @ base_model.model.transformer.layers.0.attention."
        "query_key_value.lora_A.weight [4, 4096] does not fit the checkpoint's "
        "transformer.layers.0.attention.query_key_value.weight [192, 64]: the adapter was made for another model",
    ),
    "more-layers": (
        lambda f, sd: write_adapter(
            f,
            random_pairs(
                {"transformer.layers.5.mlp.dense_4h_to_h.weight": np.zeros((H, 4 * H))},
                ["transformer.layers.5.mlp.dense_4h_to_h"],
            ),
        ),
        "adapts transformer.layers.5.mlp.dense_4h_to_h, which matches no weight",
    ),
    "a-without-b": (
        lambda f, sd: write_adapter(f, {m: (a, None) for m, (a, b) in qkv0(sd).items()}),
        "without its lora_B: the file is incomplete",
    ),
    "no-config": (
        lambda f, sd: (write_adapter(f, qkv0(sd)) / "adapter_config.json").unlink(),
        "is not a PEFT adapter folder: it has no adapter_config.json",
    ),
}


@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_adapter_is_one_line_and_writes_nothing(hub, oracle, tmp_path, case, command):
    make, expected = BAD[case]
    make(tmp_path / "adapter", oracle[0])
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    argv = [command, str(hub), "-o", str(out), "--lora", str(tmp_path / "adapter")]
    line = one_error_line(CliRunner().invoke(main, argv + (["--no-tokenizer"] if command == "export" else [])))
    assert expected in line, line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder either


def test_glmx_export_lora_from_the_command_line(hub, oracle, tmp_path):
    """glmx export --lora, once through the command line: an adapter whose base_model_name_or_path names another
    family is a printed note, not an error; the export equals the oracle's merge and records the adapter."""
    from glm_runtime.manifest import load_manifest

    sd, cfg = oracle
    pairs = random_pairs(sd, layer_modules(linears=("attention.query_key_value",)), seed=8)
    adapter = write_adapter(tmp_path / "adapter", pairs, fmt="bin", base_model_name_or_path="THUDM/chatglm2-6b")
    out = tmp_path / "onnx"
    result = CliRunner().invoke(main, ["export", str(hub), "-o", str(out), "--no-tokenizer", "--lora", str(adapter)])
    assert result.exit_code == 0, result.output
    assert (
        "export: lora: the adapter's base_model_name_or_path 'THUDM/chatglm2-6b' does not name a ChatGLM-6B (v1)"
        in result.output
    )
    within(chatglm_logits(out), oracle_logits(merged_by_hand(sd, pairs, 2.0), cfg))
    record = load_manifest(out, kind="onnx").extra["lora"]
    assert record["files"] == {
        "adapter_config.json": sha256(adapter / "adapter_config.json"),
        "adapter_model.bin": sha256(adapter / "adapter_model.bin"),
    }
    assert record["merged"] == 2 and record["target_modules"] == ["query_key_value"]


@pytest.mark.parametrize("bits", [4, 8])
def test_a_released_int_folder_refuses_an_adapter(oracle, tmp_path, bits):
    """chatglm-6b-int4 / -int8 hold integers (exported bit for bit as they are): a LoRA delta cannot be merged into
    them, which is said in one line, nothing written."""
    from tests.chatglm_folders import quantize_like_hf

    hub = make_chatglm_folder(
        tmp_path / f"chatglm-6b-int{bits}",
        seed=5,
        mutate=lambda sd: quantize_like_hf(sd, bits),
        config_extra={"quantization_bit": bits},
    )
    adapter = write_adapter(tmp_path / "adapter", qkv0(oracle[0]))
    argv = ["export", str(hub), "-o", str(tmp_path / "out"), "--no-tokenizer", "--lora", str(adapter)]
    line = one_error_line(CliRunner().invoke(main, argv))
    assert "query_key_value.weight is int8 in the checkpoint: a LoRA delta merges into float weights only" in line
    assert not (tmp_path / "out").exists()
