"""README true to the letter: every ```bash block of README.md either runs here as pasted, from a fresh folder in
which the repository's files are at hand (as in a clone), and exits 0 with something on stdout, or is listed in
SKIP with the reason it cannot run here (it installs packages, needs a checkpoint that is not shipped, is the test
suite itself). A block that starts a server in the background has that server stopped when the block ends."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# A block's first line -> why it does not run here. An entry that names no block fails (the list cannot go stale).
SKIP = {
    "pip install torch==2.13.0          # pinned; see below for the CPU build on a normal machine": "installs packages",
    "pip install -e '.[serve]' pytest httpx   # the runtime and glmx serve (no torch), and what their tests need": (
        "installs packages"
    ),
    "# glm-base / glm-large (BERT vocab.txt; only [MASK]: these models were not trained with [sMASK]/[gMASK])": (
        "needs the released glm-large checkpoint (a download)"
    ),
    "# glm-roberta-large (RoBERTa vocab.json + merges.txt)": "needs the released glm-roberta-large checkpoint",
    '# glm-2b / glm-10b (GPT-2 vocab.json + merges.txt; all three blanks); fits a 24 GiB machine, see "Large '
    'models"': "needs the released glm-10b checkpoint (20 GB)",
    "# glm-large-chinese / glm-10b-chinese (cog-pretrain.model)": "needs the released glm-large-chinese checkpoint",
    "# chatglm-6b (ice_text.model; [gMASK] <sop> at the end, or a blank anywhere)": (
        "needs the released chatglm-6b checkpoint (13 GB)"
    ),
    "# chatglm-6b-int4 / chatglm-6b-int8 (quantization_bit 4 / 8): their own integers, bit for bit": (
        "needs the released chatglm-6b-int4 checkpoint"
    ),
    "# a P-tuning v2 checkpoint (ChatGLM-6B's ptuning/ output) and a LoRA adapter (PEFT)": (
        "needs the released chatglm-6b checkpoint and a fine-tune of it"
    ),
    "glmx chat --model chatglm-int4                      # in the terminal; /clear forgets the history, /quit ends": (
        "needs a ChatGLM-6B export (the released checkpoint is a 13 GB download)"
    ),
    "python -m pytest -q": "the test suite itself",
    "python -m pytest -q -m slow": "the slow tier of the test suite itself",
    "ruff check . && ruff format --check .   # lint (pyflakes, pycodestyle, isort, bugbear, ...) and format": (
        "the tree's own lint and type checks, which .ci/run runs before the tests (they judge work in progress too)"
    ),
    "python glm_export/data/get_corpus.py data/corpus": "installs Debian packages and trains for 75 minutes",
}
BLOCK_TIMEOUT = 120  # seconds; a server that never answers fails the block instead of hanging the suite


def bash_blocks() -> list[tuple[int, str]]:
    """(line number, text) of every ```bash block of README.md."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    start = None
    for n, line in enumerate(lines, 1):
        if start is None and line.strip() == "```bash":
            start = n
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start : n - 1]) + "\n"))
            start = None
    return blocks


def first_line(text: str) -> str:
    return text.splitlines()[0].rstrip()


def test_every_skip_names_a_block():
    firsts = {first_line(text) for _, text in bash_blocks()}
    assert len(firsts) >= 8
    assert sorted(set(SKIP) - firsts) == [], "SKIP names blocks README no longer has"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(pgid: int) -> None:
    """Stop whatever the block left running (a server started with &): SIGTERM, then SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.mark.parametrize("line,text", bash_blocks(), ids=[f"README-line-{n}" for n, _ in bash_blocks()])
def test_readme_block_runs_as_pasted(line, text, tmp_path):
    if first_line(text) in SKIP:
        pytest.skip(SKIP[first_line(text)])
    # the glmx of the Python running the tests first (a venv's), as the venv's activate script would put it
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if shutil.which("glmx", path=env["PATH"]) is None:
        pytest.skip("the glmx command is not installed (pip install -e .)")
    if "glmx serve" in text:
        for need in ("starlette", "uvicorn"):
            if importlib.util.find_spec(need) is None:
                pytest.skip(f"glmx serve needs the serve extra ({need} missing)")
        if shutil.which("curl") is None:
            pytest.skip("the serve example uses curl")
        # the one change from the text as pasted: port 8000 may be taken on a shared machine
        text = re.sub(r"\b8000\b", str(free_port()), text)
    for entry in ROOT.iterdir():  # a fresh folder with the repository's files at hand, as in a clone
        if entry.name != ".git":
            (tmp_path / entry.name).symlink_to(entry)
    logs = tmp_path / ".readme-block"
    logs.mkdir()
    # files, not pipes: a server the block leaves running keeps its stdout open after bash has exited
    with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
        proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", text],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,  # the block and whatever it starts in the background: one process group
        )
        try:
            status = proc.wait(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            stop_group(proc.pid)
            proc.wait()
    said = (
        f"README line {line}: exit status {status}\n{(logs / 'out').read_text(errors='replace')[-2000:]}\n"
        f"{(logs / 'err').read_text(errors='replace')[-2000:]}"
    )
    assert status is not None, f"still running after {BLOCK_TIMEOUT} s; {said}"
    assert status == 0, said
    assert (logs / "out").read_text(errors="replace").strip(), said
