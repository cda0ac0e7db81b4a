"""benchmarks/chatglmcpp.py without a chatglm.cpp build: how it finds one, how it reads chatglm.cpp's own timings,
and the table it writes from a record (the figures of the committed full-size run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmx_benchmarks.chatglmcpp import PERF, find_chatglmcpp, table
from glmx_benchmarks.llamacpp import PeerError

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_find_chatglmcpp_says_how_to_build_one(tmp_path):
    with pytest.raises(PeerError, match="--chatglmcpp DIR or set GLMX_CHATGLMCPP"):
        find_chatglmcpp(None)
    with pytest.raises(PeerError, match="no bin/main.*build_chatglmcpp.sh"):
        find_chatglmcpp(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "main").write_text("")
    with pytest.raises(PeerError, match="no chatglm_cpp/convert.py"):
        find_chatglmcpp(tmp_path)
    (tmp_path / "chatglm_cpp").mkdir()
    (tmp_path / "chatglm_cpp" / "convert.py").write_text("")
    assert find_chatglmcpp(tmp_path) == tmp_path


def test_reads_chatglmcpp_verbose_timings():
    """The two lines `main -v` prints (chatglm.cpp 0.4.2's perf report), parsed to (kind, ms, tokens, ms/token)."""
    out = "prompt time: 1234.5 ms / 35 tokens (35.27 ms/token)\noutput time: 5339.2 ms / 16 tokens (333.70 ms/token)\n"
    found = {k: (float(t), int(n), float(p)) for k, t, n, p in PERF.findall(out)}
    assert found == {"prompt": (1234.5, 35, 35.27), "output": (5339.2, 16, 333.70)}


def test_table_of_the_committed_run():
    """The committed full-size record renders with the ratios its report states (1.22x int4 decode, 2.98x chats)."""
    record = json.loads((RESULTS / "chatglmcpp.json").read_text())
    md = table(record)
    decode = next(line for line in md.splitlines() if line.startswith("| decode"))
    assert "| 274.7 | 333.7 | 1.22x | 513.0 | 485.7 | 0.95x |" in decode
    assert "| 46.4 | 97.7 | 2.11x | 64.7 | 102.3 | 1.58x |" in md
    assert "7.52 tokens/s" in md and "2.53 tokens/s: 2.98x" in md
