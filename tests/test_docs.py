"""docs/architecture.md cannot go stale silently: its command table names every `glmx` command, no other, and for
each the function that does the work, which must exist and be what the command calls."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def command_table(path: Path = ARCHITECTURE) -> dict[str, str]:
    """command name -> the first dotted name of its function column, from the table under '## Commands'."""
    text = path.read_text(encoding="utf-8")
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        command = cells[0].strip("`").split()[0]
        rows[command] = re.search(r"`((?:glm_runtime|glm_export|glmx_benchmarks)\.[\w.]+)`", cells[1]).group(1)
    return rows


def resolve(dotted: str):
    """The object a dotted name means: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ImportError(dotted)


def test_the_table_lists_every_command_and_no_other():
    pytest.importorskip("torch")  # the export side's commands join the group only where glm_export imports
    import glm_export.cli  # noqa: F401 - its commands join the group
    import glm_runtime.chat_cli  # noqa: F401 - glmx chat joins the group too (glm_runtime.cli.run loads both)
    from glm_runtime.cli import main

    assert set(command_table()) == set(main.commands)


def test_each_commands_function_exists_and_is_what_the_command_calls():
    pytest.importorskip("torch")
    import glm_export.cli  # noqa: F401 - its commands join the group
    import glm_runtime.chat_cli  # noqa: F401 - glmx chat joins the group too (glm_runtime.cli.run loads both)
    from glm_runtime.cli import main

    for command, dotted in command_table().items():
        target = resolve(dotted)
        assert callable(target), (command, dotted)
        # a method is called through its class (Engine(...).run): the command names the class
        called = dotted.split(".")[-2] if inspect.isclass(resolve(dotted.rsplit(".", 1)[0])) else target.__name__
        source = inspect.getsource(main.commands[command].callback)
        assert re.search(rf"\b{re.escape(called)}\b", source), f"glmx {command} does not call {dotted}"


def test_the_check_notices_a_stale_row(tmp_path):
    """A row naming a function that is gone is caught."""
    stale = ARCHITECTURE.read_text(encoding="utf-8").replace(
        "`glm_runtime.score.score_candidates`", "`glm_runtime.score.score_all`", 1
    )
    path = tmp_path / "architecture.md"
    path.write_text(stale, encoding="utf-8")
    with pytest.raises(AttributeError):
        resolve(command_table(path)["score"])
