"""Install the pretraining corpus from Debian packages and extract it as plain-text documents.

In: an output folder. Out: <folder>/python-docs/*.txt (prose paragraphs of the Python 3.11 manual's reST sources),
<folder>/fortunes/*.txt (fortune collections, one fortune per document, separated by blank lines) and
<folder>/corpus.json naming the packages and versions. Usage: python glm_export/data/get_corpus.py data/corpus

Both sources are reduced to running prose, so a model of a few million weights spends its capacity on words,
not on layout: hard-wrapped lines are joined, whitespace runs become one space, fortunes lose their
"-- Author" attribution lines, and fortunes that are mostly pictures, tables or numbers are dropped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PACKAGES = ("python3.11-doc", "fortunes", "fortunes-min")
RST_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES = Path("/usr/share/games/fortunes")
NOT_PROSE = {"ascii-art"}  # fortune files of pictures, not text
CLEANING = 2  # version of the cleaning rules, recorded in corpus.json
MIN_WORDS = 5
MIN_LETTER_SHARE = 0.6  # letters among the non-space characters of a kept fortune
_ATTRIBUTION = re.compile(r"^\s*--\s*\S")  # "\t\t-- Mark Twain": the attribution that ends a fortune

# inline reST markup -> its text: :role:`!title <target>` -> title, ``code`` -> code, `text <url>`_ -> text
_ROLE = re.compile(r":[\w:+-]+:`[!~]?([^`<]*?)\s*(?:<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")


def package_version(name: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def install_packages() -> None:
    missing = [p for p in PACKAGES if not package_version(p)]
    if missing:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", *missing],
            check=True,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )


def clean_fortune(text: str) -> str:
    """One fortune as prose: attribution (the first "-- ..." line after the first line, and all after it)
    removed, each paragraph's lines joined with single spaces, paragraphs joined by one newline; "" when what
    is left is too short or mostly not letters (ASCII pictures, tables, lists of numbers)."""
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if _ATTRIBUTION.match(line):
            lines = lines[:i]
            break
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines))]
    prose = "\n".join(p for p in paras if p)
    chars = re.sub(r"\s", "", prose)
    if len(prose.split()) < MIN_WORDS or sum(c.isalpha() for c in chars) < MIN_LETTER_SHARE * len(chars):
        return ""
    return prose


def rst_to_prose(text: str) -> str:
    """Keep the prose paragraphs of a reST file: no code blocks, directives, tables or headings."""
    kept = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if not lines or lines[0].startswith((" ", "\t", "..", ">>>", "+", "=", "-", "*", "|", "#")):
            continue
        if len(lines) >= 2 and re.fullmatch(r"([=\-~^*#\"'`+])\1{2,}", lines[1].strip()):
            continue  # a heading
        if any(ln.startswith((" ", "\t")) for ln in lines):
            continue  # definition lists, option tables, continued blocks
        prose = " ".join(ln.strip() for ln in lines)
        if len(prose.split()) < 8:
            continue
        prose = _ROLE.sub(r"\1", prose)
        prose = _LINK.sub(r"\1", prose)
        prose = _LITERAL.sub(r"\1", prose)
        prose = _EMPH.sub(r"\1", prose)
        prose = re.sub(r"::$", ":", prose)
        kept.append(" ".join(prose.split()))  # "end.  Next" -> "end. Next"
    return "\n".join(kept)


def extract(out_dir: Path) -> dict:
    docs_dir, fort_dir = out_dir / "python-docs", out_dir / "fortunes"
    docs_dir.mkdir(parents=True, exist_ok=True)
    fort_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in sorted(RST_SOURCES.rglob("*.rst.txt")):
        prose = rst_to_prose(src.read_text(encoding="utf-8", errors="replace"))
        if prose:
            name = str(src.relative_to(RST_SOURCES)).replace("/", "__").replace(".rst.txt", ".txt")
            (docs_dir / name).write_text(prose + "\n", encoding="utf-8")
            total += len(prose.encode())
    for src in sorted(FORTUNES.iterdir()):
        if src.suffix or src.is_dir() or src.is_symlink() or src.name in NOT_PROSE:
            continue  # skip .dat indexes, .u8 variants and pictures
        pieces = [
            clean_fortune(p) for p in re.split(r"^%$", src.read_text(encoding="utf-8", errors="replace"), flags=re.M)
        ]
        pieces = [p for p in pieces if p]
        (fort_dir / f"{src.name}.txt").write_text("\n\n".join(pieces) + "\n", encoding="utf-8")
        total += sum(len(p.encode()) for p in pieces)
    info = {
        "packages": {p: package_version(p) for p in PACKAGES},
        "bytes": total,
        "cleaning": CLEANING,
        "documents": "python-docs: one file = one document; fortunes: blank-line separated fortunes",
    }
    (out_dir / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: get_corpus.py OUT_DIR   (e.g. data/corpus)", file=sys.stderr)
        return 2
    install_packages()
    info = extract(Path(argv[0]))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
