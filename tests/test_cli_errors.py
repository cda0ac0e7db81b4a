"""Bad input through the CLI, as a careless or hostile user gives it: every case ends in exit status 1 and one
clear Error line naming the fix, with no traceback and no file written. Also: the same prompt and seed sample
the same wherever the prompt sits, JSONL lines carry their own settings, a UTF-8 byte-order mark is not text."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from glm_export.cli import main
from glm_export.hf_config import to_hf_dict


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small checkpoint, its export and an int8 child, and the bad inputs the cases read."""
    import shutil

    from glm_export.checkpoint import save_checkpoint
    from glm_export.tokenizer_training import train_bpe_tokenizer
    from tests.fill_fixtures import LINES, make_model, make_tokenizer
    from tests.test_checkpoint import bert_vocab
    from tests.test_published import write_megatron

    root = tmp_path_factory.mktemp("bad")
    tok = make_tokenizer(root / "tokenizer.json")
    model = make_model(tok, vocab_size=384)
    save_checkpoint(model, root / "ckpt", tokenizer_file=tok)
    run = CliRunner().invoke
    assert run(main, ["export", str(root / "ckpt"), "-o", str(root / "onnx")]).exit_code == 0
    quantized = run(
        main, ["quantize", str(root / "onnx"), "-o", str(root / "int8"), "--scheme", "int8-dynamic", "--accept-loss"]
    )
    assert quantized.exit_code == 0, quantized.output
    (root / "quantize.out").write_text(quantized.output, encoding="utf-8")  # what glmx quantize printed
    big = root / "big"
    big.mkdir()
    train_bpe_tokenizer(
        LINES * 20 + [" ".join(f"w{i}x{j}" for j in range(40)) for i in range(200)], 600, big / "tokenizer.json"
    )
    (root / "random.json").write_bytes(bytes(range(256)) * 4)
    bert_vocab(root / "vocab.txt", lines=30522)
    (root / "not-utf8.txt").write_bytes(b"The cat \xff\xfe [MASK] sat.\n")
    (root / "empty-corpus").mkdir()
    (root / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my own notes")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["transformer.layers.1.mlp.dense_4h_to_h.weight"][0, 0] = float("nan")
    write_megatron(root / "nan", [sd])
    (root / "nan" / "config.json").write_text(json.dumps(to_hf_dict(model.config)))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    write_megatron(root / "wrong-config", [good])  # the weights' 384 embedding rows, a config.json that says 128
    (root / "wrong-config" / "config.json").write_text(json.dumps(to_hf_dict(model.config.replace(vocab_size=128))))
    (root / "lines.jsonl").write_text('{"prompt": "a [MASK]", "num_beams": 3}\n', encoding="utf-8")
    (root / "unknown.jsonl").write_text('{"prompt": "a [MASK]", "temp": 3}\n', encoding="utf-8")
    (root / "broken.jsonl").write_text('{"prompt": "a [MASK]"\n', encoding="utf-8")
    (root / "notprompt.jsonl").write_text('{"text": 3}\n', encoding="utf-8")
    (root / "surrogate.jsonl").write_text('{"prompt": "a \\ud800 [MASK]"}\n', encoding="utf-8")
    shutil.copytree(root / "onnx", root / "moved" / "onnx")  # its parent checkpoint, recorded relative, is not there
    forge_config(root / "onnx", root / "forged-p", max_sequence_length=4096)  # the graph's tables have 129 rows
    (root / "short-corpus").mkdir()  # one file of 7-word documents: no single-word blank can be cut from them
    (root / "short-corpus" / "notes.txt").write_text(
        "\n\n".join(f"note {i} says the day was long" for i in range(1500)), encoding="utf-8"
    )
    (root / "records.jsonl").write_text('{"text": "a fine day", "label": "p"}\n', encoding="utf-8")
    (root / "records-bool.jsonl").write_text('{"text": "a fine day", "label": true}\n', encoding="utf-8")
    return root


def forge_config(src, dst, **fields):
    """A copy of an export whose manifest config says other sizes, resealed so that only the graph can tell."""
    import shutil

    from glm_runtime.manifest import MANIFEST_NAME, SELF_HASH, _seal

    shutil.copytree(src, dst)
    data = json.loads((dst / MANIFEST_NAME).read_text(encoding="utf-8"))
    data.pop(SELF_HASH)
    data["config"].update(fields)
    _seal(dst, data)


OUT = "{root}/out"  # every case that writes would write here; none may
CASES = [
    # output folders (data loss)
    ("export-onto-input", ["export", "{root}/ckpt", "-o", "{root}/ckpt", "--overwrite"], None, "is the input"),
    (
        "quantize-onto-input",
        ["quantize", "{root}/onnx", "-o", "{root}/onnx", "--scheme", "fp16", "--overwrite"],
        None,
        "is the input",
    ),
    ("export-inside-input", ["export", "{root}/ckpt", "-o", "{root}/ckpt/sub"], None, "inside the input"),
    ("export-above-input", ["export", "{root}/ckpt", "-o", "{root}", "--overwrite"], None, "contains the input"),
    (
        "overwrite-users-folder",
        ["export", "{root}/ckpt", "-o", "{root}/mine", "--overwrite"],
        None,
        "not a glmx artifact",
    ),
    (
        "exists-without-overwrite",
        ["quantize", "{root}/onnx", "-o", "{root}/int8", "--scheme", "int8-dynamic"],
        None,
        "already exists; pass --overwrite",
    ),
    # inputs checked where they enter
    (
        "tokenizer-too-big",
        ["export", "{root}/ckpt", "-o", OUT, "--tokenizer", "{root}/big/tokenizer.json"],
        None,
        "embedding rows",
    ),
    (
        "tokenizer-random-bytes",
        ["export", "{root}/ckpt", "-o", OUT, "--tokenizer", "{root}/random.json"],
        None,
        "cannot read",
    ),
    (
        "tokenizer-wrong-family",
        ["export", "{root}/ckpt", "-o", OUT, "--tokenizer", "{root}/vocab.txt"],
        None,
        "embedding rows",
    ),
    (
        "tokenizer-and-no-tokenizer",
        ["export", "{root}/ckpt", "-o", OUT, "--tokenizer", "{root}/tokenizer.json", "--no-tokenizer"],
        None,
        "contradict",
    ),
    # found when the tensor is read (weights stream through the export), and nothing is written
    (
        "nan-weights",
        ["export", "{root}/nan", "-o", OUT, "--no-tokenizer"],
        None,
        "transformer.layers.1.mlp.dense_4h_to_h.weight holds 1 NaN or inf",
    ),
    ("nan-weights-convert", ["convert", "{root}/nan", "-o", OUT], None, "NaN or inf"),
    (
        "config-says-other-sizes",
        ["export", "{root}/wrong-config", "-o", OUT, "--tokenizer", "{root}/tokenizer.json"],
        None,
        "vocab_size: config 128, weights 384",
    ),
    ("unknown-preset", ["convert", "{root}/nan", "-o", OUT, "--preset", "glm-99b"], None, "unknown preset"),
    (
        "preset-and-config",
        ["convert", "{root}/nan", "-o", OUT, "--preset", "glm-tiny", "--config", "{root}/nan/config.json"],
        None,
        "not both",
    ),
    (
        "kind-mismatch",
        ["export", "{root}/ckpt", "-o", OUT, "--tokenizer", "{root}/vocab.txt", "--tokenizer-kind", "gpt2"],
        None,
        "was asked for",
    ),
    # no ignored option
    (
        "beams-without-beam",
        ["fill", "--model", "{root}/onnx", "--num-beams", "4", "a [MASK]"],
        None,
        "--num-beams applies to --strategy beam",
    ),
    (
        "sampling-under-beam",
        ["fill", "--model", "{root}/onnx", "--strategy", "beam", "--top-k", "5", "a [MASK]"],
        None,
        "--top-k applies to --strategy sample",
    ),
    (
        "seed-under-greedy",
        ["fill", "--model", "{root}/onnx", "--seed", "3", "a [MASK]"],
        None,
        "--seed applies to --strategy sample",
    ),
    (
        "temperature-zero",
        ["fill", "--model", "{root}/onnx", "--strategy", "sample", "--temperature", "0", "a [MASK]"],
        None,
        "use --strategy greedy",
    ),
    (
        "early-stopping-greedy",
        ["fill", "--model", "{root}/onnx", "--early-stopping", "a [MASK]"],
        None,
        "--early-stopping applies to --strategy beam",
    ),
    (
        "jsonl-line-setting-refused",
        ["fill", "--model", "{root}/onnx", "--jsonl", "{root}/lines.jsonl"],
        None,
        "line 1: --num-beams applies to --strategy beam",
    ),
    (
        "jsonl-unknown-key",
        ["fill", "--model", "{root}/onnx", "--jsonl", "{root}/unknown.jsonl"],
        None,
        "unknown key 'temp'",
    ),
    ("jsonl-not-json", ["fill", "--model", "{root}/onnx", "--jsonl", "{root}/broken.jsonl"], None, "is not JSON"),
    (
        "jsonl-no-prompt",
        ["fill", "--model", "{root}/onnx", "--jsonl", "{root}/notprompt.jsonl"],
        None,
        'a "prompt" string',
    ),
    (
        "block-size-int8",
        ["quantize", "{root}/onnx", "-o", OUT, "--scheme", "int8-dynamic", "--block-size", "64"],
        None,
        "--block-size applies to --scheme int4-weight or int8-weight",
    ),
    (
        "accuracy-level-qdq",
        ["quantize", "{root}/onnx", "-o", OUT, "--scheme", "qdq-int8", "--accuracy-level", "1"],
        None,
        "--accuracy-level applies to --scheme int4-weight or int8-weight",
    ),
    (
        "head-bits-with-fp32-head",
        ["quantize", "{root}/onnx", "-o", OUT, "--scheme", "int4-weight", "--keep-fp32", "head", "--head-bits", "8"],
        None,
        "the head is kept fp32",
    ),
    (
        "head-bits-int8-dynamic",
        ["quantize", "{root}/onnx", "-o", OUT, "--scheme", "int8-dynamic", "--head-bits", "8"],
        None,
        "--head-bits applies to --scheme int4-weight or int8-weight",
    ),
    (
        "bench-llamacpp-missing",
        ["bench", "--llamacpp", "{root}/no-llama", "-o", OUT],
        None,
        "benchmarks/build_llamacpp.sh",
    ),
    (
        "bench-chatglmcpp-missing",
        ["bench", "--chatglmcpp", "{root}/no-chatglmcpp", "-o", OUT],
        None,
        "benchmarks/build_chatglmcpp.sh",
    ),
    (
        "calibration-int4",
        ["quantize", "{root}/onnx", "-o", OUT, "--scheme", "int4-weight", "--calibration", "{root}/not-utf8.txt"],
        None,
        "only used by qdq-int8",
    ),
    # unreadable input
    ("stdin-not-utf8", ["fill", "--model", "{root}/onnx", "--stdin"], b"a \xff [MASK]\n", "not UTF-8"),
    # argv bytes that are not UTF-8 reach Python as lone surrogates (os.fsdecode), a JSON escape may hold one too
    ("prompt-not-utf8", ["fill", "--model", "{root}/onnx", os.fsdecode(b"a \xff [MASK]")], None, "byte 0xff"),
    ("score-not-utf8", ["score", "--model", "{root}/onnx", "a [MASK]", "-c", os.fsdecode(b"\xfe")], None, "not UTF-8"),
    ("jsonl-lone-surrogate", ["fill", "--model", "{root}/onnx", "--jsonl", "{root}/surrogate.jsonl"], None, "U+D800"),
    ("jsonl-not-utf8", ["fill", "--model", "{root}/onnx", "--jsonl", "{root}/not-utf8.txt"], None, "not UTF-8"),
    (
        "calibration-not-utf8",
        ["quantize", "{root}/onnx", "-o", OUT, "--scheme", "qdq-int8", "--calibration", "{root}/not-utf8.txt"],
        None,
        "not UTF-8",
    ),
    ("check-trt-corrupt", ["check-trt", "{root}/corrupt.onnx"], None, "not a readable ONNX graph"),
    ("evaluate-empty-corpus", ["evaluate", "{bundled}", "{root}/empty-corpus"], None, "no .txt files"),
    ("evaluate-no-fills", ["evaluate", "{bundled}", "{root}/short-corpus", "--fill-examples", "0"], None, "at least 1"),
    (
        "evaluate-no-blanks",
        ["evaluate", "{bundled}", "{root}/short-corpus", "--fill-examples", "5", "--ppl-batches", "1"],
        None,
        "no single-word blank",
    ),
    # messages that name the fix
    ("fill-a-checkpoint", ["fill", "--model", "{root}/ckpt", "a [MASK]"], None, "export it first"),
    (
        "torch-on-a-copied-export",
        ["fill", "--model", "{root}/moved/onnx", "--backend", "torch", "a [MASK]"],
        None,
        "the checkpoint this export was made from (recorded as ../ckpt) is not at {root}/moved/ckpt; pass the "
        "checkpoint folder itself with --backend torch, or use --backend onnxruntime",
    ),
    (
        "tensorrt-on-onnx",
        ["fill", "--model", "{root}/onnx", "--backend", "tensorrt", "a [MASK]"],
        None,
        "glmx build-engine",
    ),
    (
        "keep-fp32-unknown-role",
        [
            "quantize",
            "{root}/onnx",
            "-o",
            OUT,
            "--scheme",
            "int8-dynamic",
            "--keep-fp32",
            "embedding",
            "--keep-fp32",
            "heads",
        ],
        None,
        "pass one of those roles",
    ),
    ("optimize-an-int8", ["optimize", "{root}/int8", "-o", OUT], None, "optimize the fp32"),
    (
        "quantize-an-int8",
        ["quantize", "{root}/int8", "-o", OUT, "--scheme", "int4-weight"],
        None,
        "quantize the export it came from",
    ),
    (
        "int8-dynamic-of-an-int8",
        ["quantize", "{root}/int8", "-o", OUT, "--scheme", "int8-dynamic"],
        None,
        "is made from the fp32 export",
    ),
    (
        "classify-template-attribute",
        [
            "classify",
            "--model",
            "{root}/onnx",
            "{root}/records.jsonl",
            "--template",
            "{{text.foo}} [MASK]",
            "--verbalizer",
            '{{"p": " b", "1": " c"}}',
        ],
        None,
        "{{text.foo}} reads an attribute or an index",
    ),
    (
        "classify-template-method",
        [
            "classify",
            "--model",
            "{root}/onnx",
            "{root}/records.jsonl",
            "--template",
            "{{text.upper}} [MASK]",
            "--verbalizer",
            '{{"p": " b", "1": " c"}}',
        ],
        None,
        "{{text.upper}} reads an attribute or an index",
    ),
    (
        "classify-template-index",
        [
            "classify",
            "--model",
            "{root}/onnx",
            "{root}/records.jsonl",
            "--template",
            "{{text[0]}} [MASK]",
            "--verbalizer",
            '{{"p": " b", "1": " c"}}',
        ],
        None,
        "{{text[0]}} reads an attribute or an index",
    ),
    (
        "classify-gold-not-a-label",
        [
            "classify",
            "--model",
            "{root}/onnx",
            "{root}/records-bool.jsonl",
            "--template",
            "{{text}} [MASK]",
            "--verbalizer",
            '{{"p": " b", "1": " c"}}',
        ],
        None,
        "gold label true of record 0 is a bool",
    ),
    ("no-prompt", ["fill", "--model", "{root}/onnx"], None, "give exactly one of"),
    ("no-blank", ["fill", "--model", "{root}/onnx", "no blank here"], None, "no blank to fill"),
    (
        "too-long",
        ["fill", "--model", "{root}/onnx", "--max-new-tokens", "500", "a [MASK]"],
        None,
        "too long for the model",
    ),
    ("missing-model", ["fill", "--model", "{root}/nowhere", "a [MASK]"], None, "does not exist"),
    (
        "forged-max-sequence-length",
        ["fill", "--model", "{root}/forged-p", "a " * 200 + "[MASK]"],
        None,
        "max_sequence_length 4096 disagrees with the graph",
    ),
    ("bench-unknown-model", ["bench", "--model", "nosuch", "-o", OUT], None, "unknown model"),
    ("empty-stdin", ["fill", "--model", "{root}/onnx", "--stdin"], b"\n\n", "no prompts given"),
]


@pytest.mark.parametrize("name,args,stdin,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_clear_line_and_writes_nothing(files, name, args, stdin, expected):
    from glm_export.export import BUNDLED_CHECKPOINT

    before = sorted(p.name for p in files.iterdir())
    argv = [a.format(root=files, bundled=BUNDLED_CHECKPOINT) for a in args]
    result = CliRunner().invoke(main, argv, input=stdin)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:], result.output  # progress may come first; one Error line ends it
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, KeyError))
    assert expected.format(root=files) in lines[-1], lines[-1]
    assert sorted(p.name for p in files.iterdir()) == before  # no output, no staging folder, no lock


def test_the_table_covers_the_issue(files):
    assert len(CASES) >= 37


def _fill(files, *args, stdin=None):
    result = CliRunner().invoke(main, ["fill", "--model", str(files / "onnx"), *map(str, args)], input=stdin)
    assert result.exit_code == 0, result.output
    return result.output.split("\n")[:-1]  # at \n alone: a sampled result may hold a form feed or U+2028


def test_a_prompt_samples_the_same_alone_and_anywhere_in_a_file(files):
    prompt = "the quick [MASK] fox jumps over the [MASK] dog"
    alone = _fill(files, "--strategy", "sample", "--seed", "7", "--max-new-tokens", "6", prompt)
    other = _fill(files, "--strategy", "sample", "--seed", "8", "--max-new-tokens", "6", prompt)
    lines = f"a stitch in [MASK] saves nine\n{prompt}\nall that [MASK] is not gold\n{prompt}\n".encode()
    batch = _fill(files, "--strategy", "sample", "--seed", "7", "--max-new-tokens", "6", "--stdin", stdin=lines)
    assert batch[1] == batch[3] == alone[0]  # line 2 and line 4 of a file, and alone: one stream per prompt
    assert other != alone  # the seed matters


def test_one_output_line_per_input_line_whatever_the_line_holds(files, tmp_path):
    """Input lines split at \\n alone (a form feed or U+2028 inside a prompt or a JSON string stays in it; CRLF
    files work), and a result's own line breaks are written as \\n, so output line i answers input line i."""
    from glm_runtime.cli_inputs import result_line

    prompts = ["a stitch\x0cin [MASK] nine", "all that\u2028[MASK] is gold", "the quick [MASK] fox"]
    stdin = ("\r\n".join(prompts) + "\r\n").encode()
    out = _fill(files, "--max-new-tokens", "3", "--stdin", stdin=stdin)
    assert len(out) == 3 and out == [_fill(files, "--max-new-tokens", "3", p)[0] for p in prompts]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
    assert _fill(files, "--max-new-tokens", "3", "--jsonl", tmp_path / "in.jsonl") == out
    assert result_line("one\ntwo\r\nthree\rfour") == "one\\ntwo\\nthree\\nfour"


def test_jsonl_lines_carry_their_own_settings(files, tmp_path):
    prompt = "the quick [MASK] fox"
    path = tmp_path / "requests.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"prompt": prompt, "max_new_tokens": 1},
                {"prompt": prompt, "strategy": "sample", "seed": 7, "max_new_tokens": 6},
                prompt,
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    out = [json.loads(line) for line in _fill(files, "--jsonl", path, "--json", "--max-new-tokens", "6")]
    assert len(out[0]["spans"][0]["token_ids"]) <= 1 and out[0]["spans"][0]["stop"] in ("length", "eop", "eos")
    sampled = _fill(files, "--strategy", "sample", "--seed", "7", "--max-new-tokens", "6", "--json", prompt)
    assert out[1]["spans"] == json.loads(sampled[0])["spans"]
    greedy = _fill(files, "--max-new-tokens", "6", "--json", prompt)
    assert out[2]["spans"] == json.loads(greedy[0])["spans"]


def test_a_byte_order_mark_is_not_prompt_text(files):
    plain = _fill(files, "--stdin", "--max-new-tokens", "3", stdin=b"the quick [MASK] fox\n")
    marked = _fill(files, "--stdin", "--max-new-tokens", "3", stdin="\ufeffthe quick [MASK] fox\n".encode("utf-8"))
    assert marked == plain and not marked[0].startswith("\ufeff")


def test_perplexity_changes_are_printed_as_percent_like_readme(files):
    """The recorded ppl_change is a fraction (child / parent - 1); what glmx prints says percent, as README's
    quantization table does."""
    import re

    from glm_export.compare import budget_misses, ppl_change_text

    said = (files / "quantize.out").read_text(encoding="utf-8")
    assert re.search(r"Part B ppl change [+-]\d+\.\d\d%", said), said
    assert ppl_change_text(0.0003) == "+0.03%" and ppl_change_text(-0.0125) == "-1.25%"
    figures = {"finite": True, "top1_agreement": 1.0, "fill_agreement": 1.0, "ppl_change": 0.05, "max_logit_diff": 0}
    assert budget_misses("int8-dynamic", figures) == ["Part B perplexity change +5.00% beyond ±2%"]
