"""glmx commands in processes of their own, without paying the imports each time.

A `ForkedCLI` is one helper process that has imported torch, onnx, onnxruntime and glm_export's stages once
(about 2 s); each command is a child forked from it that runs the `glmx` console script's entry point
(glm_runtime.cli.run) on its arguments, then exits with the command's status. The child is a real process of its
own (its own pid, locks, signals and peak memory), so tests can SIGKILL it mid-stage or read its peak resident
set; only the imports are inherited. Nothing else runs in the helper, so no thread pool exists when it forks.

    with ForkedCLI() as cli:
        child = cli.start("export", folder, "-o", out)   # -> Child: pid, stderr
        child.kill(); child.wait()                       # -> exit status, and the peak RSS in child.peak_rss
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, sys
import torch, onnx, onnxruntime  # noqa: F401  the imports every child inherits
import glm_export.checkpoint, glm_export.compare, glm_export.export, glm_export.optimize, glm_export.pieces
import glm_export.quantize
from glm_runtime.cli import run
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "start":
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.argv = ["glmx", *request["args"]]
            code = 1
            try:
                run()
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    else:  # wait
        _, status, usage = os.wait4(request["pid"], 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "peak_rss": usage.ru_maxrss * 1024}), flush=True)
"""


class Child:
    """One forked glmx command: its pid, its stderr (a file), and after wait() its exit status and peak RSS."""

    def __init__(self, cli: ForkedCLI, pid: int, stderr: Path):
        self.cli, self.pid, self.stderr_file = cli, pid, stderr
        self.returncode: int | None = None
        self.peak_rss: int | None = None

    def running(self) -> bool:
        """True until the command has ended (an ended, unreaped child is a zombie: state Z)."""
        if self.returncode is not None:
            return False
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 60.0) -> int:
        if self.returncode is None:
            t0 = time.monotonic()
            while self.running():
                if time.monotonic() - t0 > timeout:
                    self.kill()
                    raise TimeoutError(f"glmx pid {self.pid} ran past {timeout} s")
                time.sleep(0.01)
            reply = self.cli._ask({"op": "wait", "pid": self.pid})
            self.returncode, self.peak_rss = reply["rc"], reply["peak_rss"]
        return self.returncode

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")


class ForkedCLI:
    """The helper process; use as a context manager (it ends with the block)."""

    def __init__(self, scratch: Path):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the forked-CLI helper ended (status {self.proc.wait()})")
        return json.loads(line)

    def start(self, *args) -> Child:
        self.count += 1
        stderr = self.scratch / f"stderr-{self.count}.txt"
        reply = self._ask({"op": "start", "args": [str(a) for a in args], "stderr": str(stderr)})
        return Child(self, reply["pid"], stderr)

    def run(self, *args, timeout: float = 600.0) -> Child:
        """Start a command and wait for it to end."""
        child = self.start(*args)
        child.wait(timeout)
        return child

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def __enter__(self) -> ForkedCLI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
