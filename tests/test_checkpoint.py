"""Checkpoints: the three layouts load to the same model, model-parallel shards merge per docs/glm.md 8.3,
glmx folders round-trip and refuse tampering, and every error path says what is wrong."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil

import numpy as np
import pytest

from glm_runtime.manifest import _seal
from tests.fill_fixtures import make_tokenizer

torch = pytest.importorskip("torch")
from safetensors.torch import save_file

from glm_export.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    load_checkpoint,
    merge_model_parallel,
    save_checkpoint,
    split_model_parallel,
)
from glm_export.hf_config import from_hf_dict, to_hf_dict
from glm_export.model import GLMModel
from glm_runtime.config import GLMConfig
from glm_runtime.manifest import ManifestError, load_manifest
from glm_runtime.tokenizer import load_tokenizer
from tests.random_models import random_weights_model
from tests.test_tokenizer import _write_bpe


def random_model(config, seed=0):
    return random_weights_model(config, seed, scale_embeddings=False)


def fp16_state_dict(model):
    return {k: v.detach().half().clone() for k, v in model.state_dict().items()}


def outputs(model):
    """Logits of a small two-row blank-filling batch: Part A of 6 tokens, then two Part B tokens."""
    ids = torch.tensor([[1, 11, 2, 12, 13, 0, 5, 21], [1, 14, 15, 2, 16, 0, 5, 31]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 2, 2], [0, 0, 0, 0, 0, 0, 1, 2]]).expand(2, 2, 8).clone()
    pos[1, 0, 6:] = 3
    with torch.no_grad():
        logits, _ = model(ids, pos, torch.tensor([6, 6]))
    return logits.float()


def write_megatron(root, shards, tag="release", tracker="latest_checkpointed_iteration.txt", extra=None):
    """Original layout (docs/glm.md 8.1): tracker + <tag>/mp_rank_XX_model_states.pt with the weights under 'module'."""
    folder = root / tag
    folder.mkdir(parents=True)
    if tracker:
        (root / tracker).write_text(tag + "\n")
    for r, sd in enumerate(shards):
        obj = {
            "module": sd,
            "iteration": 0,
            "np_rng_state": np.random.get_state(),
            "random_rng_state": random.getstate(),
            "torch_rng_state": torch.get_rng_state(),
        }
        obj.update(extra or {})
        torch.save(obj, folder / f"mp_rank_{r:02d}_model_states.pt")
    return root


def write_hf(folder, sd, config, *, prefix="glm.", fmt="bin", hf_config=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config or to_hf_dict(config)))
    keyed = {prefix + k: v for k, v in sd.items()}
    if fmt == "bin":
        torch.save(keyed, folder / "pytorch_model.bin")
    else:
        save_file(keyed, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def source(tiny_config):
    """A random tiny model, its fp16 weights, and the fp32 reference built from the fp16-rounded weights."""
    model = random_model(tiny_config)
    sd16 = fp16_state_dict(model)
    ref = GLMModel(tiny_config).eval()
    ref.load_state_dict({k: v.float() for k, v in sd16.items()})
    return model, sd16, ref


# ---------------------------------------------------------------- the layouts agree


def test_megatron_hf_and_glmx_layouts_load_to_the_same_model(tmp_path, tiny_config, source):
    _, sd16, ref = source
    expected = outputs(ref)
    paths = {
        "megatron": write_megatron(tmp_path / "mega", [sd16]),
        "hf-bin-prefixed": write_hf(tmp_path / "hf_bin", sd16, tiny_config, prefix="glm.", fmt="bin"),
        "hf-safetensors": write_hf(tmp_path / "hf_st", sd16, tiny_config, prefix="", fmt="safetensors"),
    }
    paths["glmx"] = save_checkpoint(load_checkpoint(paths["megatron"]).model, tmp_path / "glmx")
    layouts = {"megatron": "megatron", "hf-bin-prefixed": "hf", "hf-safetensors": "hf", "glmx": "glmx"}
    for label, path in paths.items():
        loaded = load_checkpoint(path)
        assert loaded.layout == layouts[label], label
        assert loaded.config.num_attention_heads == 4 and loaded.config.gelu == "tanh", label
        assert loaded.model.word_embeddings.weight.dtype == torch.float32
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, sd16[k].float()), f"{label}: {k}"
        assert torch.equal(outputs(loaded.model), expected), label
    mega = load_checkpoint(paths["megatron"])
    assert mega.source_dtype == torch.float16 and mega.config.name == "glm-tiny"  # matched a preset by its sizes
    assert load_checkpoint(paths["glmx"]).source_dtype == torch.float32


def test_dtype_none_keeps_the_file_dtype(tmp_path, source):
    _, sd16, ref = source
    loaded = load_checkpoint(write_megatron(tmp_path, [sd16]), dtype=None)
    assert loaded.model.transformer.final_layernorm.weight.dtype == torch.float16
    assert torch.equal(loaded.model.word_embeddings.weight, sd16["word_embeddings.weight"])


def test_hub_style_config_json_and_downstream_heads(tmp_path, tiny_config, source):
    """A hub config.json (no glmx block) means the HF remote code's erf GeLU; sequence-classification heads
    beside a "glm."-prefixed base are skipped and reported; sharded index files are read."""
    _, sd16, ref = source
    hub = {k: v for k, v in to_hf_dict(tiny_config).items() if k != "glmx"}
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hub))
    keys = sorted(sd16)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": {"glm." + k: sd16[k] for k in keys[:half]},
        "model-00002-of-00002.safetensors": {"glm." + k: sd16[k] for k in keys[half:]},
    }
    shards["model-00002-of-00002.safetensors"].update(
        {"dense.weight": torch.zeros(64, 64), "out_proj.weight": torch.zeros(2, 64)}
    )
    weight_map = {}
    for name, part in shards.items():
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    make_tokenizer(folder / "tokenizer.json")
    loaded = load_checkpoint(folder)
    assert loaded.layout == "hf" and loaded.config.gelu == "erf" and len(loaded.files) == 2
    assert sorted(loaded.ignored_keys) == ["dense.weight", "out_proj.weight"]
    assert loaded.tokenizer_file == folder / "tokenizer.json"
    erf_ref = GLMModel(tiny_config.replace(gelu="erf")).eval()
    erf_ref.load_state_dict(ref.state_dict())
    assert torch.equal(outputs(loaded.model), outputs(erf_ref))
    assert not torch.equal(outputs(loaded.model), outputs(ref))  # the GeLU choice is visible


# ---------------------------------------------------------------- model parallelism (docs/glm.md 8.3)


def test_split_matches_hand_built_shards_and_merge_inverts_it(source):
    model, _, _ = source
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    h = 64
    shards = split_model_parallel(sd, 2)
    for r in range(2):
        rows = slice(r * h // 2, (r + 1) * h // 2)  # heads 2r, 2r+1 of Q, K and V
        for suffix in ("weight", "bias"):
            full = sd[f"transformer.layers.1.attention.query_key_value.{suffix}"]
            q, k, v = full[:h], full[h : 2 * h], full[2 * h :]
            by_hand = torch.cat([q[rows], k[rows], v[rows]])
            assert torch.equal(shards[r][f"transformer.layers.1.attention.query_key_value.{suffix}"], by_hand)
        assert torch.equal(shards[r]["word_embeddings.weight"], sd["word_embeddings.weight"][r * 256 : (r + 1) * 256])
        assert torch.equal(
            shards[r]["transformer.layers.0.mlp.dense_h_to_4h.bias"],
            sd["transformer.layers.0.mlp.dense_h_to_4h.bias"][r * 128 : (r + 1) * 128],
        )
        assert torch.equal(
            shards[r]["transformer.layers.0.attention.dense.weight"],
            sd["transformer.layers.0.attention.dense.weight"][:, r * 32 : (r + 1) * 32],
        )
        assert torch.equal(
            shards[r]["transformer.layers.0.mlp.dense_4h_to_h.weight"],
            sd["transformer.layers.0.mlp.dense_4h_to_h.weight"][:, r * 128 : (r + 1) * 128],
        )
        for key in (
            "transformer.layers.0.mlp.dense_4h_to_h.bias",
            "transformer.layers.0.attention.dense.bias",
            "transformer.position_embeddings.weight",
            "transformer.final_layernorm.weight",
        ):
            assert torch.equal(shards[r][key], sd[key])  # replicated
    merged = merge_model_parallel(shards)
    assert merged.keys() == sd.keys() and all(torch.equal(merged[k], sd[k]) for k in sd)
    naive = torch.cat([s["transformer.layers.1.attention.query_key_value.weight"] for s in shards])
    assert not torch.equal(naive, sd["transformer.layers.1.attention.query_key_value.weight"])  # stride 3 matters


def test_two_way_shards_load_to_the_unsharded_model(tmp_path, source):
    _, sd16, ref = source
    root = write_megatron(
        tmp_path, split_model_parallel(sd16, 2), tag="1000", tracker="latest", extra={"mp_world_size": 2}
    )
    loaded = load_checkpoint(root)
    assert loaded.layout == "megatron" and len(loaded.files) == 2
    assert any("merged 2" in n for n in loaded.notes)
    assert torch.equal(outputs(loaded.model), outputs(ref))


def test_folder_without_tracker_and_single_file(tmp_path, source):
    _, sd16, ref = source
    write_megatron(tmp_path, [sd16], tag="release", tracker=None)
    bert_vocab(tmp_path / "vocab.txt")
    save_file(sd16, str(tmp_path / "bare.safetensors"))
    for path in (
        tmp_path / "release",
        tmp_path / "release" / "mp_rank_00_model_states.pt",
        tmp_path / "bare.safetensors",
    ):
        loaded = load_checkpoint(path)
        assert loaded.layout == "megatron" and torch.equal(outputs(loaded.model), outputs(ref))
        assert loaded.tokenizer_file == tmp_path / "vocab.txt"  # found in the checkpoint root


def test_heads_are_never_guessed_without_a_config(tmp_path):
    """No config and sizes of no preset: refused (heads cannot be read from the weights); a config.json beside
    the shards, or --config, is used and said."""
    config = GLMConfig(
        num_layers=1,
        hidden_size=128,
        num_attention_heads=4,
        vocab_size=256,
        max_sequence_length=16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )  # heads of width 32, not 64
    model = random_model(config, seed=3)
    root = write_megatron(tmp_path / "mega", [fp16_state_dict(model)])
    with pytest.raises(CheckpointError, match=r"match no preset: the number of attention heads cannot be read"):
        load_checkpoint(root)
    (tmp_path / "given.json").write_text(config.replace(gelu="erf").to_json())
    given = load_checkpoint(root, config=tmp_path / "given.json")
    assert given.config.num_attention_heads == 4 and given.config.gelu == "erf"
    assert any("given.json (given)" in n for n in given.notes)
    (root / "config.json").write_text(json.dumps(to_hf_dict(config) | {"glmx": {}}))  # HF form, says no GeLU
    beside = load_checkpoint(root)
    assert beside.config.num_attention_heads == 4 and beside.config.gelu == "tanh"  # Megatron's default
    assert any("gelu: tanh (the config does not say" in n and "ASSUMED" in n for n in beside.notes)
    assert any(str(root / "config.json") in n for n in beside.notes)
    ref = GLMModel(config).eval()
    ref.load_state_dict({k: v.float() for k, v in fp16_state_dict(model).items()})
    assert torch.equal(outputs(beside.model), outputs(ref))


# ---------------------------------------------------------------- glmx's own folder


def test_save_load_round_trip(tmp_path, tiny_config):
    model = random_model(tiny_config, seed=5)
    tok = make_tokenizer(tmp_path / "tokenizer.json").files["tokenizer.json"]
    out = save_checkpoint(model, tmp_path / "ckpt", tokenizer_file=tok, extra={"note": "x"})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    manifest = load_manifest(out, kind="checkpoint")
    assert manifest.precision == "fp32" and manifest.tokenizer["file"] == "tokenizer.json"
    assert manifest.config == tiny_config.to_dict() and manifest.extra == {"note": "x"}
    assert "torch" in manifest.versions and "safetensors" in manifest.versions
    assert from_hf_dict(json.loads((out / "config.json").read_text())) == tiny_config
    loaded = load_checkpoint(out)
    assert loaded.layout == "glmx" and loaded.config == tiny_config and loaded.manifest.kind == "checkpoint"
    assert loaded.tokenizer_file == out / "tokenizer.json"
    assert torch.equal(outputs(loaded.model), outputs(model))
    # without its manifest the folder still reads as a Hugging Face folder (glmx block keeps gelu etc.)
    hf = shutil.copytree(out, tmp_path / "as_hf")
    (hf / "manifest.json").unlink()
    as_hf = load_checkpoint(hf)
    assert as_hf.layout == "hf" and as_hf.config == tiny_config
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(model, out)


def bert_vocab(path, lines: int = 400):
    """A BERT-style vocab.txt (docs/glm.md 7 special ids) of `lines` entries: with sop/eop, V = 512 (glm-tiny)."""
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat"]
    path.write_text("\n".join(words + [f"w{i}" for i in range(lines - len(words))]) + "\n", encoding="utf-8")
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_gpt2_vocab(folder):
    """A GPT-2-style vocab.json (376 ids, <|endoftext|> last) + merges.txt: 385 ids with GLM's commands, V = 512."""
    _write_bpe(folder, [], 376, ["<|endoftext|>"])
    return folder


BPE_TEXT = "the cat sat on the mat [MASK] glm"


def test_bpe_pair_tokenizer_is_copied_hashed_and_guarded(tmp_path, tiny_config):
    vocab = small_gpt2_vocab(tmp_path / "vocab")
    out = save_checkpoint(random_model(tiny_config, seed=8), tmp_path / "ckpt", tokenizer_file=vocab / "vocab.json")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "manifest.json",
        "merges.txt",
        "model.safetensors",
        "vocab.json",
    ]
    manifest = load_manifest(out, kind="checkpoint")
    hashes = {name: _sha(vocab / name) for name in ("vocab.json", "merges.txt")}
    assert {name: manifest.files[name] for name in hashes} == hashes
    assert {k: manifest.tokenizer[k] for k in ("file", "sha256", "files", "kind")} == {
        "file": "vocab.json",
        "sha256": hashes["vocab.json"],
        "files": hashes,
        "kind": "gpt2",
    }
    loaded = load_checkpoint(out)
    assert loaded.tokenizer_file == out / "vocab.json"
    assert load_tokenizer(loaded.tokenizer_file).encode(BPE_TEXT) == load_tokenizer(vocab).encode(BPE_TEXT)
    # merges.txt is guarded like vocab.json: an edited file, or a manifest that stops hashing it, is refused
    edited = shutil.copytree(out, tmp_path / "edited")
    with open(edited / "merges.txt", "a", encoding="utf-8") as fh:
        fh.write("c a\n")
    with pytest.raises(ManifestError, match=r"merges\.txt does not match its manifest .*modified"):
        load_checkpoint(edited)
    unhashed = shutil.copytree(out, tmp_path / "unhashed")
    data = json.loads((unhashed / "manifest.json").read_text())
    del data["files"]["merges.txt"]
    _seal(unhashed, data)  # planted: re-sealed so the deeper check must see it
    with pytest.raises(ManifestError, match=r"names tokenizer file 'merges\.txt' but does not hash it"):
        load_checkpoint(unhashed)
    # half a pair is refused before anything is written
    (tmp_path / "half").mkdir()
    shutil.copyfile(vocab / "vocab.json", tmp_path / "half" / "vocab.json")
    with pytest.raises(CheckpointError, match=r"missing: .*merges\.txt"):
        save_checkpoint(loaded.model, tmp_path / "ckpt_half", tokenizer_file=tmp_path / "half" / "vocab.json")
    assert not (tmp_path / "ckpt_half").exists()


def test_convert_keeps_both_bpe_files_of_a_megatron_root(tmp_path, source):
    """GLM-10B / glm-roberta-large layout: vocab.json + merges.txt in the checkpoint root beside the tracker."""
    _, sd16, _ = source
    root = small_gpt2_vocab(write_megatron(tmp_path / "mega", [sd16]))
    loaded, out = convert_checkpoint(root, tmp_path / "out")
    assert loaded.tokenizer_file == root / "vocab.json"
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (root / name).read_bytes()
    assert load_tokenizer(load_checkpoint(out).tokenizer_file).encode(BPE_TEXT) == load_tokenizer(root).encode(BPE_TEXT)


def test_fp16_save(tmp_path, tiny_config):
    model = random_model(tiny_config, seed=6)
    out = save_checkpoint(model, tmp_path / "ckpt16", dtype=torch.float16)
    loaded = load_checkpoint(out)
    assert load_manifest(out).precision == "fp16" and loaded.source_dtype == torch.float16
    assert torch.equal(loaded.model.word_embeddings.weight, model.word_embeddings.weight.half().float())


def test_tampered_weight_file_is_refused(tmp_path, tiny_model):
    out = save_checkpoint(tiny_model, tmp_path / "ckpt")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.safetensors does not match its manifest"):
        load_checkpoint(out)


# ---------------------------------------------------------------- error paths


def test_missing_key(tmp_path, tiny_config, source):
    _, sd16, _ = source
    del sd16["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    with pytest.raises(CheckpointError, match=r"lacks 1 of .*transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        load_checkpoint(write_hf(tmp_path / "hf", sd16, tiny_config))


def test_unexpected_key(tmp_path, tiny_config, source):
    _, sd16, _ = source
    sd16["dense.weight"] = torch.zeros(2, 64)  # a head name, but with no prefixed base beside it: not skipped
    with pytest.raises(CheckpointError, match=r"unexpected keys \['dense\.weight'\]"):
        load_checkpoint(write_hf(tmp_path / "hf", sd16, tiny_config, prefix="", fmt="safetensors"))


def test_mis_shaped_key(tmp_path, tiny_config, source):
    _, sd16, _ = source
    key = "transformer.layers.0.attention.dense.weight"
    sd16[key] = sd16[key][:, :32].contiguous()
    with pytest.raises(CheckpointError, match=re.escape(f"{key}: expected [64, 64], got [64, 32]")):
        load_checkpoint(write_hf(tmp_path / "hf", sd16, tiny_config))


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "megatron"])
def test_truncated_file(tmp_path, tiny_config, source, fmt):
    _, sd16, _ = source
    if fmt == "megatron":
        path = write_megatron(tmp_path / "m", [sd16]) / "release" / "mp_rank_00_model_states.pt"
        root = tmp_path / "m"
    else:
        root = write_hf(tmp_path / "hf", sd16, tiny_config, fmt=fmt)
        path = root / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{re.escape(path.name)}: the file is truncated"):
        load_checkpoint(root)


def test_unknown_layout(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(
        CheckpointError,
        match=r"not a GLM checkpoint.*manifest\.json.*pytorch_model\.bin.*"
        r"latest_checkpointed_iteration\.txt.*weights\.npz",
    ):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_inconsistent_model_parallel_shards(tmp_path, tiny_config, source):
    _, sd16, _ = source
    shards = split_model_parallel(sd16, 2)
    gap = write_megatron(tmp_path / "gap", shards)
    (gap / "release" / "mp_rank_01_model_states.pt").rename(gap / "release" / "mp_rank_02_model_states.pt")
    with pytest.raises(CheckpointError, match=r"inconsistent: found ranks \[0, 2\]"):
        load_checkpoint(gap)
    world = write_megatron(tmp_path / "world", shards, extra={"mp_world_size": 4})
    with pytest.raises(CheckpointError, match="mp_world_size=4, but 2 mp_rank files"):
        load_checkpoint(world)
    with pytest.raises(CheckpointError, match="one of 2 model-parallel shards; pass the folder"):
        load_checkpoint(world / "release" / "mp_rank_00_model_states.pt")
    other_run = split_model_parallel(fp16_state_dict(random_model(tiny_config, seed=9)), 2)
    mixed = [shards[0], other_run[1]]
    with pytest.raises(CheckpointError, match="identical on every model-parallel rank"):
        merge_model_parallel(mixed)


def test_config_mismatch_with_weights(tmp_path, tiny_config, source):
    _, sd16, _ = source
    hf = to_hf_dict(tiny_config) | {"num_layers": 3}
    with pytest.raises(CheckpointError, match="do not match config.*num_layers: config 3, weights 2"):
        load_checkpoint(write_hf(tmp_path / "hf", sd16, tiny_config, hf_config=hf))
    with pytest.raises(CheckpointError, match="hidden_size: config 1024, weights 64"):
        load_checkpoint(write_megatron(tmp_path / "m", [sd16]), config="glm-large")


def test_bad_tracker_and_missing_module(tmp_path, source):
    _, sd16, _ = source
    root = write_megatron(tmp_path / "t", [sd16], tag="release")
    (root / "latest_checkpointed_iteration.txt").write_text("2000\n")
    with pytest.raises(CheckpointError, match=r"names checkpoint '2000', but .*2000 does not exist"):
        load_checkpoint(root)
    folder = tmp_path / "nomod" / "release"
    folder.mkdir(parents=True)
    torch.save({"iteration": 1, "optimizer": {"lr": 1.0}}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="has no 'module' entry"):
        load_checkpoint(folder)


def test_unsafe_pickle_is_refused(tmp_path, source):
    import fractions

    _, sd16, _ = source
    root = write_megatron(tmp_path, [sd16], extra={"lr": fractions.Fraction(1, 3)})
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*mp_rank_00.*fractions\.Fraction"):
        load_checkpoint(root)


# ---------------------------------------------------------------- glmx convert


def test_convert_command(tmp_path, source):
    from click.testing import CliRunner

    from glm_export.cli import main

    _, sd16, ref = source
    src = write_megatron(tmp_path / "mega", [sd16])
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "out"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert "layout: megatron" in result.output and "config: glm-tiny" in result.output
    assert f"parameters: {load_checkpoint(src).config.num_parameters():,}" in result.output  # formula = count
    loaded = load_checkpoint(tmp_path / "out")
    assert loaded.manifest.extra["source"]["layout"] == "megatron" and loaded.manifest.precision == "fp32"
    assert torch.equal(outputs(loaded.model), outputs(ref))
    again = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "out")])
    assert again.exit_code == 1 and "already exists" in again.output and "Traceback" not in again.output
