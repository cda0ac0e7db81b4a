"""One module name, one meaning: no two Python files of glm_export/, runtime/ and benchmarks/ share a basename
unless SHARED_ON_PURPOSE says why (docs/architecture.md, "Names that mean one thing")."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("glm_export", "runtime", "benchmarks")

# basename -> why every package may have one; the same role in each
SHARED_ON_PURPOSE = {
    "__init__.py": "each package's own front door",
    "cli.py": "each package's commands of the one glmx command line (runtime/cli.py builds the group, "
    "glm_export/cli.py's commands join it)",
}


def modules_by_name() -> dict[str, list[str]]:
    """basename -> the files that have it, as paths relative to the repository root."""
    found: dict[str, list[str]] = defaultdict(list)
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[path.name].append(path.relative_to(ROOT).as_posix())
    return found


def test_no_two_modules_share_a_name_by_accident():
    twice = {
        name: paths for name, paths in modules_by_name().items() if len(paths) > 1 and name not in SHARED_ON_PURPOSE
    }
    assert not twice, (
        "module names that exist twice; rename one to say what it holds, or add the name to "
        f"SHARED_ON_PURPOSE with the reason both mean the same thing: {twice}"
    )


def test_the_allow_list_names_only_names_that_are_shared():
    """A name left in SHARED_ON_PURPOSE after a rename would let the next duplicate in unseen."""
    found = modules_by_name()
    assert all(len(found.get(name, [])) > 1 for name in SHARED_ON_PURPOSE), {
        name: found.get(name, []) for name in SHARED_ON_PURPOSE
    }
