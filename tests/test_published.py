"""Published GLM checkpoints as users download them, through every stage, for every tokenizer kind.

Folders are laid out as the Hugging Face hub publishes THUDM/glm-* (config.json with the remote-code fields,
pytorch_model.bin with `glm.` keys, the vocabulary files and tokenizer_config.json naming the GLM tokenizer
class, the remote-code .py files) or as the original Megatron code writes them, with tiny sizes, random
weights and vocabularies made here at the real sizes and special ids (docs/glm.md 7). The golden reference is
tests/oracle_glm.py, a numpy GLM written from docs/glm.md alone.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner

from glm_export.cli import main
from glm_export.compare import HELDOUT, TOLERANCES, split_text
from glm_export.optimize import optimize_onnx
from glm_export.quantize import SCHEMES, quantize_onnx
from glm_runtime.config import GLMConfig
from glm_runtime.generate import fill_blanks
from glm_runtime.manifest import load_manifest
from glm_runtime.session import open_model
from glm_runtime.tokenizer import build_context_ids
from tests import oracle_glm
from tests.random_models import random_weights_model
from tests.test_tokenizer import ZH_CHARS, _write_bpe

# L=2, h=64, two heads of width 32 (not 64: nothing may assume GLM's usual head width), P=128
SHAPE = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=2,
    max_sequence_length=128,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
PROMPTS = {
    "en": ["The cat sat on the [MASK] and looked at the door.", "A [MASK] is a [MASK] that fills blanks."],
    "zh": ["我们喜欢[MASK]模型。", "中文[MASK]测试数据一二三[MASK]"],
}
HUB_CLASSES = {
    "bert": "GLMBertTokenizer",
    "gpt2": "GLMGPT2Tokenizer",
    "roberta": "GLMRobertaTokenizer",
    "chinese": "GLMChineseTokenizer",
}
EXPECT_KIND = {"bert": "bert", "gpt2": "gpt2", "roberta": "roberta", "chinese": "chinese-sp-fix"}
MAX_NEW = 6


# ---------------------------------------------------------------- vocabularies at the real sizes


def write_vocab(kind: str, folder: Path) -> int:
    """The kind's vocabulary files in `folder`; -> the model's V (the tokenizer's size padded to 128, docs/glm.md 6)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "gpt2":  # GPT-2: 50257 ids, <|endoftext|> last
        _write_bpe(folder, [], 50257, ["<|endoftext|>"])
        return 50304
    if kind == "roberta":
        _write_bpe(folder, ["<s>", "<pad>", "</s>", "<unk>"], 50265, ["<mask>"])
        return 50304
    if kind == "bert":  # bert-base-uncased's layout: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103
        letters = [chr(c) for c in range(97, 123)]
        lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        lines += ["the", "cat", ".", ",", "a"] + [c for c in letters if c != "a"] + [f"##{c}" for c in letters]
        lines += [f"filler{i}" for i in range(30522 - len(lines))]
        (folder / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return 30592
    spm = pytest.importorskip("sentencepiece")  # cog-pretrain's layout (<unk> 0, <s> 1, </s> 2, <n> 3), 120 pieces
    import io

    rng = random.Random(0)
    lines = ["".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(2, 8))) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=120,
        user_defined_symbols=["<n>"],
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "cog-pretrain.model").write_bytes(buf.getvalue())
    return 256  # 120 pieces + 11 command ids, padded to 128


def hub_config(V: int, **fields) -> dict:
    """config.json as the hub's THUDM/glm-* folders have it (the remote code's GLMConfig fields)."""
    return {
        "architectures": ["GLMModel"],
        "attention_dropout_prob": 0.1,
        "attention_scale": 1.0,
        "auto_map": {
            "AutoConfig": "configuration_glm.GLMConfig",
            "AutoModel": "modeling_glm.GLMModel",
            "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
        },
        "block_position_encoding": True,
        "checkpoint_activations": False,
        "checkpoint_num_layers": 1,
        "embedding_dropout_prob": 0.1,
        "hidden_size": SHAPE["hidden_size"],
        "initializer_range": 0.02,
        "max_sequence_length": SHAPE["max_sequence_length"],
        "model_type": "glm",
        "num_attention_heads": SHAPE["num_attention_heads"],
        "num_layers": SHAPE["num_layers"],
        "output_dropout_prob": 0.1,
        "output_predict": True,
        "parallel_output": True,
        "pool_token": "cls",
        "relative_encoding": False,
        "spell_func": "lstm",
        "spell_length": None,
        "torch_dtype": "float32",
        "transformers_version": "4.30.2",
        "vocab_size": V,
        **fields,
    }


def write_hub_folder(
    kind: str, folder: Path, seed: int = 0, tokenizer_class: str | None = "default", shape: dict | None = None
):
    """A folder as the hub publishes it. -> (folder, the reference model with its official weights)."""
    V = write_vocab(kind, folder)
    cls = HUB_CLASSES[kind] if tokenizer_class == "default" else tokenizer_class
    if cls is not None:
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": cls,
                    "auto_map": {"AutoTokenizer": [f"tokenization_glm.{cls}", None]},
                    "model_max_length": 1000000000000000019884624838656,
                }
            )
        )
    shape = {**SHAPE, **(shape or {})}
    (folder / "config.json").write_text(
        json.dumps(
            hub_config(
                V, **{k: shape[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "max_sequence_length")}
            )
        )
    )
    for name in ("configuration_glm.py", "modeling_glm.py", "tokenization_glm.py"):
        (folder / name).write_text("# remote code, never imported by glmx\n")
    model = random_weights_model(GLMConfig(vocab_size=V, gelu="erf", **shape), seed)
    torch.save({f"glm.{k}": v for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    return folder, model


def run_cli(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def one_line_error(result) -> str:
    """The CLI refused with exit status 1, ending in one Error line (progress notes may come before it), no
    traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.output, result.output
    return lines[-1]


def oracle_fill(folder: Path, tok, prompt: str, gelu: str = "erf") -> list[list[int]]:
    sd, cfg = oracle_glm.load_hf_folder(str(folder))
    ids = build_context_ids(tok, prompt)
    return oracle_glm.greedy_fill(
        sd, cfg, ids, set(tok.mask_ids), tok.special["sop"], tok.special["eop"], MAX_NEW, gelu, eos=tok.special["eos"]
    )


def short_text(lang: str) -> str:
    return split_text(HELDOUT[lang].read_text(encoding="utf-8"))[1][:700]  # ~10 windows: enough to judge


# ---------------------------------------------------------------- every kind, every stage


@pytest.fixture(scope="module", params=["bert", "gpt2", "roberta", "chinese"])
def published(request, tmp_path_factory):
    """A hub folder of one kind, converted (CLI) and exported (CLI) as a user would."""
    torch.set_num_threads(1)
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    hub, model = write_hub_folder(kind, root / "hub")
    converted = run_cli("convert", hub, "-o", root / "glmx")
    assert converted.exit_code == 0, converted.output
    exported = run_cli("export", root / "glmx", "-o", root / "onnx")
    assert exported.exit_code == 0, exported.output
    return {
        "kind": kind,
        "root": root,
        "hub": hub,
        "model": model,
        "onnx": root / "onnx",
        "convert_output": converted.output,
        "export_output": exported.output,
    }


def test_the_folder_decides_the_tokenizer_and_says_so(published):
    kind, out = EXPECT_KIND[published["kind"]], published["convert_output"]
    assert f"tokenizer={kind}" in out and "note: tokenizer: " + kind in out, out
    assert "note: gelu: erf" in out  # the hub folder's config does not say: HF remote code's erf, stated
    for folder in (published["root"] / "glmx", published["onnx"]):
        manifest = load_manifest(folder)
        assert manifest.config["tokenizer"] == kind and manifest.tokenizer["kind"] == kind
        assert manifest.config["gelu"] == "erf"
    notes = load_manifest(published["onnx"]).extra["source"]["notes"]
    assert any(n.startswith(f"tokenizer: {kind}") for n in notes) and any(n.startswith("gelu: erf") for n in notes)


def test_export_agrees_with_the_independent_oracle(published):
    """The exported graph's logits against oracle_glm's on the hub folder's own weights (fp32 budget), and
    greedy fills token for token: ONNX Runtime, the torch reference and the oracle."""
    session, tok = open_model(published["onnx"])
    lang = "zh" if published["kind"] == "chinese" else "en"
    sd, cfg = oracle_glm.load_hf_folder(str(published["hub"]))
    ids = build_context_ids(tok, PROMPTS[lang][0])
    C = len(ids)
    want = oracle_glm.forward(sd, cfg, ids, list(range(C)), [0] * C, C, "erf")
    n, d = session.config.num_attention_heads, session.config.head_dim
    feeds = {
        "input_ids": np.asarray([ids]),
        "position_ids": np.asarray([[list(range(C)), [0] * C]]),
        "attention_mask": np.ones((1, 1, C, C), bool),
        **{
            e["name"]: np.zeros((1, n, 0, d), np.float32)
            for e in session.inputs
            if e["name"].startswith("past_key_values.")
        },
    }
    got = session.run(feeds)["logits"][0]
    assert np.abs(got - want).max() <= TOLERANCES["fp32"].allowed(float(np.abs(want).max()))
    torch_session, torch_tok = open_model(published["hub"], "torch")
    assert torch_tok.special == tok.special
    onnx_fills = fill_blanks(session, tok, PROMPTS[lang], max_new_tokens=MAX_NEW)
    torch_fills = fill_blanks(torch_session, torch_tok, PROMPTS[lang], max_new_tokens=MAX_NEW)
    for prompt, a, b in zip(PROMPTS[lang], onnx_fills, torch_fills):
        spans = [s.token_ids for s in a.spans]
        assert spans == [s.token_ids for s in b.spans]
        assert spans == oracle_fill(published["hub"], tok, prompt), prompt
        assert any(spans)  # something was generated


# Which schemes each kind runs: every scheme on the Chinese folder (its text check is the cheapest), and the three
# English kinds (V = 30592 / 50304, a costly held-out check each) share the schemes among them; every kind runs
# optimize and at least one scheme in the default suite, and the slow tier runs the rest of the English share.
# The stages do not look at the tokenizer beyond the text check, which is what varies by kind; the fills
# afterwards run each kind's own tokenizer.
SCHEMES_BY_KIND = {
    "chinese": tuple(SCHEMES),
    "gpt2": ("int4-weight",),
    "roberta": ("int8-dynamic",),
    "bert": ("qdq-int8",),
}
SLOW_SCHEMES_BY_KIND = {"gpt2": ("fp16",), "roberta": ("int8-weight",)}


def test_every_scheme_runs_on_some_published_kind():
    assert set(SCHEMES_BY_KIND["chinese"]) == set(SCHEMES)
    english = {
        s
        for table in (SCHEMES_BY_KIND, SLOW_SCHEMES_BY_KIND)
        for kind in ("gpt2", "roberta", "bert")
        for s in table.get(kind, ())
    }
    assert english == set(SCHEMES), sorted(set(SCHEMES) - english)


def test_optimize_and_every_quantize_scheme_then_fill(published):
    """optimize, then the kind's schemes (SCHEMES_BY_KIND): each judged with the model's own tokenizer on text in
    its language."""
    derive_and_fill(published, ("optimized", *SCHEMES_BY_KIND[published["kind"]]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SLOW_SCHEMES_BY_KIND))
def test_the_rest_of_the_english_schemes_then_fill(kind, tmp_path):
    root = tmp_path / kind
    hub, _ = write_hub_folder(kind, root / "hub")
    assert run_cli("export", hub, "-o", root / "onnx").exit_code == 0
    derive_and_fill({"kind": kind, "root": root, "onnx": root / "onnx"}, SLOW_SCHEMES_BY_KIND[kind])


def derive_and_fill(published: dict, names) -> None:
    """Each of `names` ("optimized" or a scheme) derived from the kind's export, checked on text in its language
    with its own tokenizer, then filled."""
    lang = "zh" if published["kind"] == "chinese" else "en"
    text = short_text(lang)
    onnx_dir, root = published["onnx"], published["root"]
    parent_session, tok = open_model(onnx_dir)
    want = [
        [s.token_ids for s in r.spans] for r in fill_blanks(parent_session, tok, PROMPTS[lang], max_new_tokens=MAX_NEW)
    ]
    children = {}
    for name in names:  # random weights: the trained model's budgets, a miss accepted
        children[name] = (
            optimize_onnx(onnx_dir, root / name, eval_text=text)
            if name == "optimized"
            else quantize_onnx(onnx_dir, root / name, scheme=name, accept_loss=True, eval_text=text)
        )
    for name, folder in children.items():
        manifest = load_manifest(folder)
        assert manifest.tokenizer == load_manifest(onnx_dir).tokenizer
        parity = manifest.parity
        assert parity["text"]["tokenizer"] == tok.kind and parity["text"]["language"] == lang
        assert parity["stage"] == ("optimize" if name == "optimized" else "quantize")
        assert parity["text"]["positions"] >= 64 and parity["text"]["finite"]
        session, child_tok = open_model(folder)
        assert child_tok.special == tok.special
        got = [
            [s.token_ids for s in r.spans]
            for r in fill_blanks(session, child_tok, PROMPTS[lang], max_new_tokens=MAX_NEW)
        ]
        if name in ("optimized", "fp16"):  # the same arithmetic (fp16: decisive weights) fills the same
            assert got == want, name
        else:  # quantized random weights: the fill runs and stays in the vocabulary; agreement is recorded
            assert all(0 <= t < tok.vocab_size for spans in got for span in spans for t in span)
    if "optimized" in children:
        assert load_manifest(children["optimized"]).parity["passed"]


def test_cli_quantize_and_fill_from_a_hub_export(tmp_path):
    """The user's commands on a GLM-10B-layout folder (GPT-2 vocabulary), with the default held-out text."""
    hub, _ = write_hub_folder("gpt2", tmp_path / "hub")
    assert run_cli("export", hub, "-o", tmp_path / "onnx").exit_code == 0
    result = run_cli("quantize", tmp_path / "onnx", "-o", tmp_path / "int4", "--scheme", "int4-weight", "--accept-loss")
    assert result.exit_code == 0, result.output
    assert "of en held-out text" in result.output
    filled = run_cli("fill", "--model", tmp_path / "int4", "--max-new-tokens", "4", PROMPTS["en"][0])
    assert filled.exit_code == 0 and filled.output.strip(), filled.output
    # glmx bench measures the user's own export (a small grid: this checks the path, not the speed)
    bench = run_cli(
        "bench",
        "--quick",
        "--model",
        tmp_path / "onnx",
        "--variant",
        "ort-fp32",
        "--variant",
        "torch-fp32",
        "--context",
        "8",
        "--past",
        "8",
        "--batch",
        "2",
        "--rounds",
        "1",
        "--no-plots",
        "-o",
        tmp_path / "bench",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert bench.exit_code == 0, bench.output
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    (entry,) = results["models"].values()
    assert entry["config"]["vocab_size"] == 50304 and entry["config"]["tokenizer"] == "gpt2"
    for variant in ("ort-fp32", "torch-fp32"):
        assert entry["variants"][variant]["decode"]["8"]["median"] > 0


# ---------------------------------------------------------------- Megatron folders


def write_megatron(root: Path, shards: list[dict], tag: str = "release") -> Path:
    (root / tag).mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text(tag)
    for r, sd in enumerate(shards):
        torch.save(
            {"module": sd, "mp_world_size": len(shards), "iteration": 0},
            root / tag / f"mp_rank_{r:02d}_model_states.pt",
        )
    return root


@pytest.mark.parametrize("mp", [1, 2])
def test_megatron_folder_with_config_json_fills_like_the_oracle(tmp_path, mp):
    """MP-1 and MP-2 shards (fp16, as the original saves them) of a model whose heads are 32 wide: the
    config.json beside them is used, tanh GeLU (the original's) assumed and said, fills equal the oracle's."""
    from glm_export.checkpoint import split_model_parallel

    V = write_vocab("gpt2", tmp_path / "mega")
    model = random_weights_model(GLMConfig(vocab_size=V, gelu="tanh", **SHAPE), seed=1)
    sd16 = {k: v.half() for k, v in model.state_dict().items()}
    root = write_megatron(tmp_path / "mega", split_model_parallel(sd16, mp) if mp > 1 else [sd16])
    (root / "config.json").write_text(json.dumps(hub_config(V)))
    exported = run_cli("export", root, "-o", tmp_path / "onnx")
    assert exported.exit_code == 0, exported.output
    assert "gelu: tanh (the config does not say" in exported.output and "ASSUMED" in exported.output
    assert f"config: {root / 'config.json'}" in exported.output
    manifest = load_manifest(tmp_path / "onnx")
    assert manifest.config["num_attention_heads"] == 2 and manifest.config["gelu"] == "tanh"
    session, tok = open_model(tmp_path / "onnx")
    assert tok.kind == "gpt2"
    hub = tmp_path / "as_hub"  # the oracle reads an HF layout: the same fp16 weights, merged
    hub.mkdir()
    torch.save({k: v.float() for k, v in sd16.items()}, hub / "pytorch_model.bin")
    (hub / "config.json").write_text(json.dumps(hub_config(V)))
    for prompt in PROMPTS["en"]:
        got = [s.token_ids for s in fill_blanks(session, tok, [prompt], max_new_tokens=MAX_NEW)[0].spans]
        assert got == oracle_fill(hub, tok, prompt, gelu="tanh"), prompt


def test_megatron_without_config_needs_one_and_never_guesses_heads(tmp_path):
    V = write_vocab("gpt2", tmp_path / "mega")
    model = random_weights_model(GLMConfig(vocab_size=V, **SHAPE), seed=2)
    root = write_megatron(tmp_path / "mega", [{k: v.half() for k, v in model.state_dict().items()}])
    line = one_line_error(run_cli("export", root, "-o", tmp_path / "onnx"))
    assert "match no preset" in line and "--config FILE" in line and "--preset NAME" in line
    assert not (tmp_path / "onnx").exists()
    (tmp_path / "mine.json").write_text(json.dumps(hub_config(V)))
    given = run_cli("convert", root, "-o", tmp_path / "glmx", "--config", tmp_path / "mine.json", "--gelu", "erf")
    assert given.exit_code == 0, given.output
    assert "note: gelu: erf (given)" in given.output and "n=2" in given.output
    assert load_manifest(tmp_path / "glmx").extra["notes"] == [
        n[len("note: ") :] for n in given.output.splitlines() if n.startswith("note: ")
    ]


def test_megatron_with_preset_sizes_takes_the_preset_and_says_so(tmp_path):
    from glm_export.checkpoint import load_checkpoint

    cfg = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512, max_sequence_length=128)
    model = random_weights_model(cfg, seed=3)  # glm-tiny's sizes
    root = write_megatron(tmp_path / "mega", [dict(model.state_dict())])
    loaded = load_checkpoint(root)
    assert loaded.config.name == "glm-tiny" and loaded.config.num_attention_heads == 4
    assert any("preset glm-tiny" in n and "ASSUMED" in n for n in loaded.notes)


# ---------------------------------------------------------------- conflicts and bad input: one line, nothing written


def test_conflicts_are_one_line_errors_and_write_nothing(tmp_path):
    # GPT-2 files beside a BERT-sized model
    hub, _ = write_hub_folder("gpt2", tmp_path / "a", tokenizer_class=None)
    cfg = json.loads((hub / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps(dict(cfg, vocab_size=30592)))
    model = random_weights_model(GLMConfig(vocab_size=30592, **SHAPE), seed=0)
    torch.save({f"glm.{k}": v for k, v in model.state_dict().items()}, hub / "pytorch_model.bin")
    line = one_line_error(run_cli("export", hub, "-o", tmp_path / "out"))
    assert "gpt2 tokenizer" in line and "50266 ids" in line and "30592 embedding rows" in line
    # tokenizer_config.json names one tokenizer, the files are another
    hub, _ = write_hub_folder("gpt2", tmp_path / "b", tokenizer_class="GLMBertTokenizer")
    line = one_line_error(run_cli("convert", hub, "-o", tmp_path / "out"))
    assert "GLMBertTokenizer" in line and "vocab.json + merges.txt" in line
    # an unknown tokenizer class
    hub, _ = write_hub_folder("bert", tmp_path / "c", tokenizer_class="GLMKlingonTokenizer")
    line = one_line_error(run_cli("export", hub, "-o", tmp_path / "out"))
    assert "GLMKlingonTokenizer" in line and "--tokenizer-kind" in line
    # the kind asked for is not what the files are
    hub, _ = write_hub_folder("bert", tmp_path / "d")
    line = one_line_error(run_cli("export", hub, "-o", tmp_path / "out", "--tokenizer-kind", "gpt2"))
    assert "'gpt2' was asked for" in line and "vocab.txt" in line
    line = one_line_error(
        run_cli("export", hub, "-o", tmp_path / "out", "--preset", "glm-large", "--config", hub / "config.json")
    )
    assert "--preset or --config, not both" in line
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_chinese_sentencepiece_of_unknown_size_in_a_megatron_folder_needs_a_kind(tmp_path):
    V = write_vocab("chinese", tmp_path / "mega")
    model = random_weights_model(GLMConfig(vocab_size=V, **SHAPE), seed=4)
    root = write_megatron(tmp_path / "mega", [dict(model.state_dict())])
    (root / "config.json").write_text(json.dumps(hub_config(V)))
    line = one_line_error(run_cli("convert", root, "-o", tmp_path / "out"))
    assert "--tokenizer-kind chinese-sp-fix" in line and "chinese-sp" in line
    ok = run_cli("convert", root, "-o", tmp_path / "out", "--tokenizer-kind", "chinese-sp")
    assert ok.exit_code == 0, ok.output
    tok = load_manifest(tmp_path / "out").tokenizer
    assert tok["kind"] == "chinese-sp" and tok["special_tokens"]["gMASK"] == tok["special_tokens"]["eop"]


def test_derived_stages_refuse_an_export_without_tokenizer_in_one_line(tmp_path):
    hub, _ = write_hub_folder("gpt2", tmp_path / "hub")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (hub / name).unlink()
    line = one_line_error(run_cli("export", hub, "-o", tmp_path / "onnx"))  # refused unless said explicitly
    assert "has no tokenizer beside its weights" in line and "--no-tokenizer" in line
    assert not (tmp_path / "onnx").exists()
    exported = run_cli("export", hub, "-o", tmp_path / "onnx", "--no-validate", "--no-tokenizer")
    assert exported.exit_code == 0 and "tokenizer: none found" in exported.output
    for args in (("optimize",), ("quantize", "--scheme", "int8-dynamic")):
        line = one_line_error(run_cli(args[0], tmp_path / "onnx", "-o", tmp_path / "child", *args[1:]))
        assert "carries no tokenizer" in line and "--tokenizer" in line
    assert not (tmp_path / "child").exists()


def test_gelu_slip_is_caught_by_the_fp32_budget(tmp_path):
    """The scaled fp32 budget still catches tanh-for-erf on a tiny model (docs/glm.md 1.2: the HF code uses erf), while
    the right GeLU passes with room to spare."""
    from glm_export.compare import compare_sessions
    from glm_export.export import export_onnx
    from glm_export.reference_session import TorchSession
    from glm_runtime.session import OnnxRuntimeSession

    model = random_weights_model(GLMConfig(vocab_size=512, gelu="erf", **SHAPE), 0)
    with torch.no_grad():  # GeLU inputs of O(1), where tanh and erf differ (by up to 5e-4 at x = -2.7)
        for name, p in model.named_parameters():
            if "dense_h_to_4h.weight" in name:
                p.mul_(5.0)
    export_onnx(model, tmp_path / "onnx", validate=False, log=lambda m: None)
    slipped = random_weights_model(GLMConfig(vocab_size=512, gelu="tanh", **SHAPE), 0)
    slipped.load_state_dict(model.state_dict())
    right = compare_sessions(OnnxRuntimeSession(tmp_path / "onnx"), TorchSession(model), stage="test")
    wrong = compare_sessions(OnnxRuntimeSession(tmp_path / "onnx"), TorchSession(slipped), stage="test")
    assert right.passed and right.max_diff("logits") < 1e-4
    assert not wrong.passed and any("logits max |diff|" in f for f in wrong.failures), wrong.table()


def test_chinese_id_table_follows_the_preset_sizes_and_the_layout(tmp_path):
    """GLM-Large-Chinese vs GLM-10B-Chinese (docs/glm.md 7): the SentencePiece model is the same file, the ids differ;
    the model's sizes pick the table, and a Hugging Face folder uses gMASK = sop + 3 (its converter's copy)."""
    from types import SimpleNamespace

    from glm_runtime.tokenizer_folder import resolve_tokenizer

    V = write_vocab("chinese", tmp_path)
    model = tmp_path / "cog-pretrain.model"
    n = 120  # pieces
    large = resolve_tokenizer(model, config=SimpleNamespace(num_layers=24, hidden_size=1024, vocab_size=V))
    assert large[0].kind == "chinese-sp-fix" and large[0].special["gMASK"] == n + 9
    assert "glm-large-chinese" in large[1][0]
    mega = resolve_tokenizer(
        model, config=SimpleNamespace(num_layers=48, hidden_size=4096, vocab_size=V), layout="megatron"
    )[0]
    assert mega.kind == "chinese-sp" and mega.special["gMASK"] == mega.special["eop"] == n + 7
    hub = resolve_tokenizer(model, config=SimpleNamespace(num_layers=48, hidden_size=4096, vocab_size=V), layout="hf")[
        0
    ]
    assert hub.kind == "chinese-sp" and hub.options["hf_gmask"] and hub.special["gMASK"] == n + 9


def test_derived_stages_write_external_data_past_the_protobuf_limit(tmp_path, monkeypatch):
    from glm_export import derive

    hub, _ = write_hub_folder("bert", tmp_path / "hub")
    assert run_cli("export", hub, "-o", tmp_path / "onnx", "--no-validate").exit_code == 0
    monkeypatch.setattr(derive, "PROTOBUF_LIMIT", 1000)  # pretend the tiny graph is past 2 GB
    out = quantize_onnx(
        tmp_path / "onnx", tmp_path / "fp16", scheme="fp16", eval_text=short_text("en"), accept_loss=True
    )
    manifest = load_manifest(out)
    assert manifest.extra["external_data"] == "model.onnx.data" and "model.onnx.data" in manifest.files
    assert (out / "model.onnx").stat().st_size < 100_000 < (out / "model.onnx.data").stat().st_size
    session, tok = open_model(out)
    assert fill_blanks(session, tok, PROMPTS["en"][:1], max_new_tokens=2)[0].spans
