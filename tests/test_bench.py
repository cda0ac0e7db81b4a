"""`glmx bench --quick` on the tiny model: it writes sane JSON + Markdown, and the sanity check refuses bad figures.
Also: the floor's FLOP and byte counts against hand-computed values, and the target verdicts."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner

from glm_export.cli import main
from glmx_benchmarks import bench, floor
from glmx_benchmarks.report import readme_table


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `glmx bench --quick` run shared by the tests: (its output folder, its results.json, the cache)."""
    root = tmp_path_factory.mktemp("bench")
    out, cache = root / "out", root / "cache"
    result = CliRunner().invoke(main, ["bench", "--quick", "-o", str(out), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, json.loads((out / "results.json").read_text()), cache


def test_quick_writes_every_figure(quick_run):
    out, results, _ = quick_run
    for name in ("results.json", "results.md", "README.md"):
        assert (out / name).stat().st_size > 0
    for section in ("decode", "batch", "context"):  # one plot per section, a real PNG
        assert (out / f"tiny-{section}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", section
    variants = results["models"]["tiny"]["variants"]
    assert set(variants) == {"torch-fp32", "ort-fp32"}
    flags = results["machine"]["cpu_flags"]  # every result says which kernels the CPU has (lscpu)
    assert isinstance(flags, list) and ("CPU flags: " + " ".join(flags)) in (out / "results.md").read_text()
    grid = results["grid"]
    for v in variants.values():
        assert set(v["context"]) == {str(c) for c in grid["contexts"]}
        assert set(v["decode"]) == {str(p) for p in grid["pasts"]}
        assert set(v["batch"]) == {str(b) for b in grid["batches"]}
        for section in ("context", "decode", "batch"):
            for fig in v[section].values():
                assert fig["n"] == len(fig["samples"]) >= 3
                assert 0 < fig["median"] <= fig["p90"] and math.isfinite(fig["floor_s"])
        assert v["peak_rss_bytes"] > 0 and v["disk_bytes"] > 0 and v["load_s"] > 0
    # ratios come from the same run: torch's own speed-up is exactly 1, ORT's is torch median / ORT median
    torch_fig, ort_fig = variants["torch-fp32"]["decode"]["8"], variants["ort-fp32"]["decode"]["8"]
    assert torch_fig["speedup_vs_torch"] == 1.0
    assert ort_fig["speedup_vs_torch"] == pytest.approx(torch_fig["median"] / ort_fig["median"])
    assert variants["ort-fp32"]["accuracy"]["parity_passed"] is True  # copied from the export's manifest
    assert results["machine"]["load_average_start"] and results["machine"]["versions"]["onnxruntime"]
    readme = (out / "README.md").read_text()
    assert "glmx bench --quick" in readme and results["command"] in readme
    assert "| ort-fp32 |" in (out / "results.md").read_text()
    bench.check_results(results)  # what was written passes the checker


@pytest.mark.parametrize(
    "plant, message",
    [
        (
            lambda r: r["models"]["tiny"]["variants"]["ort-fp32"]["decode"]["8"].update(median=float("nan")),
            "decode 8: median = nan",
        ),
        (lambda r: r["models"]["tiny"]["variants"]["ort-fp32"]["context"]["16"].update(p90=1e-9), "context 16: p90"),
        (
            lambda r: r["models"]["tiny"]["variants"]["torch-fp32"]["batch"]["4"].pop("median"),
            "batch 4: field 'median' is missing",
        ),
        (lambda r: r["models"]["tiny"]["variants"]["ort-fp32"].update(peak_rss_bytes=0), "peak_rss_bytes = 0"),
        (lambda r: r["models"]["tiny"]["variants"]["ort-fp32"].pop("decode"), "no decode figures"),
        (lambda r: r.pop("machine"), "field 'machine' is missing"),
    ],
)
def test_check_results_refuses_a_planted_bad_figure(quick_run, plant, message):
    results = copy.deepcopy(quick_run[1])
    plant(results)
    with pytest.raises(bench.BenchmarkError, match="not sane") as err:
        bench.check_results(results)
    assert message in str(err.value)


def test_readme_table_from_json(quick_run):
    out, results, _ = quick_run
    table = readme_table(results)
    assert table.count("\n| ") == 3 and "| torch-fp32 | " in table and "| ort-fp32 | " in table
    printed = CliRunner().invoke(main, ["bench", "--readme-table", str(out / "results.json")])
    assert printed.exit_code == 0 and table in printed.output


def test_unknown_variant_is_refused_with_the_choices(quick_run, tmp_path):
    result = CliRunner().invoke(
        main, ["bench", "--quick", "--variant", "ort-int3", "-o", str(tmp_path), "--cache-dir", str(quick_run[2])]
    )
    assert result.exit_code == 1
    assert "unknown variant 'ort-int3'" in result.output and "ort-int8" in result.output


def test_bench_refuses_an_existing_folder_that_is_not_a_bench_results_folder(quick_run, tmp_path, monkeypatch):
    """`glmx bench -o DIR` writes README.md and results.json: into a folder of the user's (here: their own README
    and a results.json glmx bench did not write) it refuses before any work, in one line saying what to do; an
    earlier bench results folder (the quick run's, the committed benchmarks/results) or an empty one is taken."""
    from pathlib import Path

    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("# my project")
    (mine / "results.json").write_text('{"accuracy": 0.93}')
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    monkeypatch.setattr(bench, "machine_info", lambda *a: pytest.fail("measured before refusing"))
    for args in (["--quick"], []):
        result = CliRunner().invoke(main, ["bench", *args, "-o", str(mine), "--cache-dir", str(quick_run[2])])
        line = result.output.strip()
        assert result.exit_code == 1 and line.startswith("Error: ") and "\n" not in line, result.output
        assert "not a glmx bench results folder" in line and "-o" in line, line
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    (mine / "results.json").unlink()
    with pytest.raises(bench.BenchmarkError, match="not a glmx bench results folder"):
        bench.check_bench_output(mine)  # README.md alone: still the user's
    for ok in (quick_run[0], Path(bench.__file__).parent / "results", tmp_path / "empty", tmp_path / "new"):
        if ok.name == "empty":
            ok.mkdir()
        bench.check_bench_output(ok)


def test_floor_counts_match_hand_computed_values(quick_run):
    from glmx_benchmarks.artifacts import model_config

    cfg = model_config("tiny")  # L=2, h=64, V=8064 (the bundled tokenizer's size)
    T, h, L, V = 16, 64, 2, 8064
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (L, h, V)
    by_hand = L * (2 * T * h * 3 * h + 2 * T * h * h + 2 * T * h * 4 * h * 2 + 4 * T * T * h) + 2 * T * h * V
    assert floor.context_flops(cfg, T) == by_hand
    # streamed bytes = every parameter except the two position tables, which are only gathered from
    folder = quick_run[2] / "tiny-v8064" / "onnx-fp32"
    params = cfg.num_parameters() - 2 * (cfg.max_sequence_length + 1) * h
    counted = floor.streamed_weight_bytes(folder)
    assert 0 <= counted["streamed_bytes"] - 4 * params < 1024  # + the graph's small constants (shapes, scales)
    assert 0 <= counted["gathered_bytes"] - 4 * 2 * (cfg.max_sequence_length + 1) * h < 1024
    assert floor.kv_bytes(cfg, past=10, batch=3) == 2 * L * 3 * 10 * h * 4


def _fig(median, **extra):
    """A timing figure as the worker writes it, with the ratios add_comparisons would add."""
    return {"median": median, "p90": median, "n": 3, "samples": [median] * 3, **extra}


def test_targets_say_met_or_missed_and_by_how_much():
    model = {
        "variants": {
            "torch-fp32": {"decode": {"128": _fig(0.13)}, "context": {"128": _fig(3.0)}, "batch": {"8": _fig(0.4)}},
            "ort-int8": {
                "decode": {"128": _fig(0.02, vs_floor=1.2, speedup_vs_torch=6.5)},
                "context": {"128": _fig(1.5, speedup_vs_torch=2.0)},
                "batch": {"8": _fig(0.05, speedup_vs_torch=8.0)},
            },
            "ort-int4": {"skipped": "not built"},
        }
    }
    targets = bench.evaluate_targets(model)
    assert targets["decode_speedup"]["met"] is True and targets["decode_speedup"]["margin"] == pytest.approx(1.3)
    assert targets["decode_vs_floor"]["met"] is False
    assert targets["decode_vs_floor"]["margin"] == pytest.approx(1.15 / 1.2)
    assert targets["context_speedup"]["met"] is False and targets["context_speedup"]["variant"] == "ort-int8"
    assert targets["batch8_speedup"]["met"] is True


def test_targets_count_only_paths_within_their_accuracy_budget():
    model = {
        "variants": {
            "torch-fp32": {"decode": {"128": _fig(0.13)}, "context": {"128": _fig(3.0)}, "batch": {"8": _fig(0.4)}},
            "ort-int8-head": {
                "decode": {"128": _fig(0.02, vs_floor=1.4, speedup_vs_torch=6.5)},
                "context": {"128": _fig(0.9, speedup_vs_torch=3.3)},
                "batch": {"8": _fig(0.05, speedup_vs_torch=8.0)},
            },
            "ort-int4": {
                "decode": {"128": _fig(0.025, vs_floor=1.3, speedup_vs_torch=5.2)},
                "context": {"128": _fig(2.0, speedup_vs_torch=1.5)},
                "batch": {"8": _fig(0.1, speedup_vs_torch=4.0)},
            },
        }
    }
    status = {
        "ort-int8-head": bench.budget_verdict({"within_budget": False, "top1_agreement": 0.97, "fill_agreement": 0.6}),
        "ort-int4": bench.budget_verdict({"within_budget": True, "top1_agreement": 0.978, "fill_agreement": 0.8}),
    }
    assert status["ort-int8-head"]["within_budget"] is False and "outside" in status["ort-int8-head"]["why"]
    unfiltered = bench.evaluate_targets(model)
    assert unfiltered["context_speedup"]["variant"] == "ort-int8-head" and unfiltered["context_speedup"]["met"]
    targets = bench.evaluate_targets(model, status=status)
    assert {t["variant"] for t in targets.values()} == {"ort-int4"}
    assert targets["context_speedup"]["met"] is False and targets["decode_speedup"]["met"] is True
    # a variant without a verdict is not counted either
    assert bench.evaluate_targets(model, status={})["decode_speedup"]["value"] is None
    assert bench.budget_verdict({"parity_passed": True})["within_budget"] is True
    assert bench.budget_verdict({"parity": "skipped"})["within_budget"] is None


@pytest.mark.parametrize("threads", [1, 2])
def test_ort_gemv_read_kernel_computes_x_at_w(threads):
    """The ONNX Runtime read kernel really streams the weights: its output equals x @ W (float64 reference)."""
    w = floor.gemv_weights(1)
    assert w.dtype == np.float32 and w.shape[0] == floor.GEMV_ROWS and w.nbytes >= 2**20
    x = np.random.default_rng(1).standard_normal((1, w.shape[0]), dtype=np.float32)
    y = floor.ort_gemv(w, threads)(x)
    reference = x.astype(np.float64) @ w.astype(np.float64)
    assert y.shape == (1, w.shape[1])
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-3)  # fp32 sums over K=4096 terms


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bandwidth_is_the_max_over_the_reported_kernels(threads):
    bw = floor.measure_bandwidth(megabytes=4, threads=threads, repeats=1)
    kernels = bw["read_kernels"]
    expected = {"numpy_sum_1_thread", "ort_gemv"} | ({"numpy_sum_threads"} if threads > 1 else set())
    assert set(kernels) == expected
    assert all(math.isfinite(rate) and rate > 0 for rate in kernels.values())
    assert bw["read_bytes_per_s"] == max(kernels.values()) and kernels[bw["read_kernel"]] == bw["read_bytes_per_s"]
    assert "max over read kernels" in bw["method"] and bw["read_kernel"] in bw["method"]
    assert bw["read_threads"] == threads and bw["copy_bytes_per_s"] > 0


def test_quick_run_records_every_read_kernel(quick_run):
    bw = quick_run[1]["floor"]["bandwidth"]
    assert set(bw["read_kernels"]) >= {"numpy_sum_1_thread", "ort_gemv"}
    assert bw["read_bytes_per_s"] == max(bw["read_kernels"].values())


def test_quick_run_measures_the_target_figures_in_rotated_rounds(quick_run):
    out, results, _ = quick_run
    grid, model = results["grid"], results["models"]["tiny"]
    assert grid["rounds"] == bench.QUICK_ROUNDS == 1 + len(model["rounds"]) and grid["rounds_model"] == "tiny"
    want, order = grid["round_figures"], list(bench.QUICK_VARIANTS)  # the full pass runs them in this order
    for one in model["rounds"]:
        assert sorted(one["order"]) == sorted(model["variants"]) and one["order"][0] != order[0]
        order = one["order"]
        for v in one["variants"].values():  # a round re-measures exactly the target figures
            assert [int(c) for c in v["context"]] == want["contexts"] and [int(p) for p in v["decode"]] == want["pasts"]
    for key, t in model["target_rounds"].items():
        assert len(t["rounds"]) == grid["rounds"], key
        assert t["rounds"][0]["value"] == model["targets"][key]["value"]  # round 1 is the full pass
        assert t["min"] <= t["median"] <= t["max"]
    # a later round's speed-up is torch's median over the variant's median in that round, not across rounds
    later = model["rounds"][0]["variants"]
    past = str(want["pasts"][0])
    ratio = later["torch-fp32"]["decode"][past]["median"] / later["ort-fp32"]["decode"][past]["median"]
    assert model["target_rounds"]["decode_speedup"]["rounds"][1]["value"] == pytest.approx(ratio)
    assert f"Targets over {grid['rounds']} rounds" in (out / "results.md").read_text()


def test_floor_uses_the_best_bandwidth_sample_of_the_run(quick_run):
    """Bandwidth is sampled at the start, before each later round and at the end; every ratio uses the max."""
    results = quick_run[1]
    bw = results["floor"]["bandwidth"]
    rounds = results["grid"]["rounds"]
    assert len(bw["samples_read_bytes_per_s"]) == 1 + (rounds - 1) + 1
    assert bw["read_bytes_per_s"] == max(bw["samples_read_bytes_per_s"])
    fig = results["models"]["tiny"]["variants"]["ort-fp32"]["decode"]
    past = next(iter(fig))
    config = bench.GLMConfig.from_dict(results["models"]["tiny"]["config"])
    streamed = results["models"]["tiny"]["variants"]["ort-fp32"]["streamed_weight_bytes"]
    floor_s = floor.decode_floor_s(streamed, config, int(past), 1, bw["read_bytes_per_s"], 4)
    assert fig[past]["floor_s"] == pytest.approx(floor_s)


def test_rotated_orders_put_each_variant_in_another_slot():
    names = ["a", "b", "c"]
    assert bench.rotated(names, 0) == ["a", "b", "c"]
    assert bench.rotated(names, 1) == ["b", "c", "a"]
    assert bench.rotated(names, 2) == ["c", "a", "b"]
    assert bench.rotated(names, 3) == names
    assert bench.rotated(["a", "b"], 1) == ["b", "a"]


def test_round_summary_gives_median_range_and_verdict():
    def targets(value, met):
        return {key: {"value": value, "variant": "v", "met": met} for key in bench.TARGETS}

    summary = bench.summarize_rounds([targets(5.5, True), targets(4.0, False), targets(6.0, True)])
    s = summary["decode_speedup"]
    assert (s["median"], s["min"], s["max"], s["met_rounds"]) == (5.5, 4.0, 6.0, 2)
    assert s["verdict"] == "met in 2 of 3 rounds"
    assert bench.summarize_rounds([targets(1.4, False)] * 2)["decode_vs_floor"]["verdict"] == "missed in every round"
    assert bench.summarize_rounds([targets(6.0, True)] * 3)["batch8_speedup"]["verdict"] == "met in every round"


def test_a_cached_quantized_variant_from_an_older_recipe_is_not_reused(fill_onnx, tmp_path):
    """The benchmark's cache reuses a quantized folder only if it was made with today's defaults: blocks, MLP
    blocks and head format as well as what stays fp32 (an int4 folder from the all-32 recipe is rebuilt)."""
    from glm_export.quantize import quantize_onnx
    from glmx_benchmarks.artifacts import _recorded_recipe, current_recipe, keep_fp32

    keep = keep_fp32("int4-weight")
    today = quantize_onnx(fill_onnx, tmp_path / "today", scheme="int4-weight", accept_loss=True, log=lambda m: None)
    older = quantize_onnx(
        fill_onnx,
        tmp_path / "older",
        scheme="int4-weight",
        block_size=32,
        head_block_size=32,
        accept_loss=True,
        log=lambda m: None,
    )
    assert _recorded_recipe(today) == current_recipe("int4-weight", keep)
    assert _recorded_recipe(older) != current_recipe("int4-weight", keep)
    assert _recorded_recipe(older)["mlp_block_size"] == 32


@pytest.mark.slow  # a second whole --quick run (9 s here); test_quick_writes_every_figure runs one by default
def test_quick_without_an_output_folder_prints_its_results_and_leaves_nothing(quick_run, tmp_path, monkeypatch):
    """`glmx bench --quick` without -o: the results table on stdout, its temporary folder removed (-o keeps one)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a temporary folder would be made
    result = CliRunner().invoke(main, ["bench", "--quick", "--cache-dir", str(quick_run[2])])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| backend |" in result.stdout and "ort-fp32" in result.stdout, result.stdout
    assert list(tmp_path.iterdir()) == []
