"""Install Chinese fortune collections from a Debian package and write them as held-out Chinese prose.

In: the Debian package fortunes-zh (installed with apt-get when missing). Out: one text file, by default
glm_export/data/heldout_zh.txt: '# ' provenance lines (package and exact version, files used, cleaning rules,
number of documents), then documents separated by one blank line, each document one line of prose. It is the
held-out text for the quantization accuracy report of Chinese GLM models (glm_export.compare.split_text
skips the '# ' lines and uses alternate documents). Usage: python glm_export/data/get_corpus_zh.py [--out PATH]

Each fortune is reduced to running prose: terminal colour codes are removed, hard-wrapped lines are joined
without a space between CJK characters, whitespace runs become one space, attributions ("-- 李白《...》" and all
after it, "作者：..." / "题目：..." lines, a line that is only a 《title》) are dropped, and so are headings,
code, lists, boxes and footnotes; fortunes with too few CJK characters are dropped, exact duplicates too, and a
document longer than MAX_CHARS is cut at the last sentence end (。！？) before it. Documents are taken in file
order until the file passes TARGET_BYTES, so the same package version always gives a byte-identical file.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "fortunes-zh"
FORTUNES = Path("/usr/share/games/fortunes")
SOURCES = ("chinese", "song100", "tang300")  # the package's fortune files (the .u8 names are links to these)
DEFAULT_OUT = Path(__file__).parent / "heldout_zh.txt"
CLEANING = 2  # version of the cleaning rules, recorded in the provenance lines
MIN_CJK = 20  # CJK ideographs in a kept document
MIN_CJK_SHARE = 0.5  # CJK characters (ideographs and CJK punctuation) among its non-space characters
MAX_CHARS = 600  # a longer document is cut at a sentence end
TARGET_BYTES = 150_000  # documents are added until the text passes this many UTF-8 bytes
MIN_BYTES, MAX_BYTES = 60_000, 200_000  # sanity bounds on the written file

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # "\x1b[33m", "\x1b[;m": the colours of the attribution
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_ATTRIBUTION = re.compile(r"^\s*(?:--|——|－－)")  # "    -- 李白《子夜吴歌·秋歌》" ends a fortune
_BYLINE = re.compile(r"^\s*(?:作者|题目)\s*[:：]")  # "作者：张九龄", "题目:《塞上》" (tang300, song100)
_TITLE = re.compile(r"^\s*《[^》]*》\s*$")  # "《感遇・其一》" alone on a line
_NOT_PROSE = re.compile(r"^(?:[*•·+$#>|]\s|\d+\.\s|[\u2500-\u257f]|\[\d+\]|https?://|#!)")  # list, code, box, note
_FOOTMARK = re.compile(r"\s?\[\d+\]")  # "“Debian 组织结构”[1] 页面" -> "“Debian 组织结构” 页面"
_CLAUSE_END = "。！？；：，、…”’」』.!?;:,"
_HEADING = re.compile(r"^(?:第\s?\d+\s?章|\d+(?:\.\d+)+\.?)\s")  # "第 8 章 国际化和本地化", "5.5. 网络"
_SENTENCE_END = re.compile(r"[。！？][”’」』）]*")


def _ideograph(c: str) -> bool:
    o = ord(c)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x3FFFF


def _cjk(c: str) -> bool:
    """An ideograph, CJK punctuation (、。《》「」…) or a full-width form (，：！？（）)."""
    o = ord(c)
    return _ideograph(c) or 0x3000 <= o <= 0x303F or 0xFF00 <= o <= 0xFFEF or c in "“”‘’…—・·"


def package_version(name: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def install_package() -> None:
    if not package_version(PACKAGE):
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", PACKAGE],
            check=True,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )


def join(a: str, b: str) -> str:
    """Two pieces of one text: no space where either side is CJK punctuation or both are ideographs
    ("访" + "问" -> "访问"), one space otherwise ("在" + "Debian 下" -> "在 Debian 下")."""
    if not a or not b:
        return a + b
    x, y = a[-1], b[0]
    if (_cjk(x) and not _ideograph(x)) or (_cjk(y) and not _ideograph(y)) or (_ideograph(x) and _ideograph(y)):
        return a + b
    return a + " " + b


def clean_fortune(text: str) -> str:
    """One fortune as one line of prose, or "" when too little of it is Chinese prose."""
    text = _CONTROL.sub("", _ANSI.sub("", text)).replace("\r", "")
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i > 0 and _ATTRIBUTION.match(line):
            lines = lines[:i]
            break
    lines = [ln for ln in lines if not (_BYLINE.match(ln) or _TITLE.match(ln))]
    prose = ""
    for para in re.split(r"\n\s*\n", "\n".join(lines)):
        rows = [" ".join(ln.split()) for ln in para.split("\n")]
        rows = [r for r in rows if r]
        if not rows or any(_NOT_PROSE.match(r) for r in rows):
            continue
        if len(rows) == 1 and (_HEADING.match(rows[0]) or (len(rows[0]) <= 40 and rows[0][-1] not in _CLAUSE_END)):
            continue  # a heading: "12.1. Shell 脚本", "提示", "其一", "5.5. 网络连接方式（传统）"
        joined = ""
        for r in rows:
            joined = join(joined, r)
        chars = [c for c in joined if not c.isspace()]
        if sum(_cjk(c) for c in chars) < MIN_CJK_SHARE * len(chars):
            continue  # a command line, a path, an English paragraph
        prose = join(prose, joined)
    prose = " ".join(_FOOTMARK.sub("", prose).split())
    if len(prose) > MAX_CHARS:
        ends = [m.end() for m in _SENTENCE_END.finditer(prose, 0, MAX_CHARS)]
        prose = prose[: ends[-1]] if ends else ""
    chars = [c for c in prose if not c.isspace()]
    if sum(_ideograph(c) for c in chars) < MIN_CJK or sum(_cjk(c) for c in chars) < MIN_CJK_SHARE * len(chars):
        return ""
    return prose


def collect() -> tuple[list[str], dict[str, int]]:
    """Every STRIDE-th cleaned document of all the files in file order, so the text spans the package (its
    technical prose, the classics, proverbs, poetry) rather than its first file's first pages; STRIDE is what
    brings the total to about TARGET_BYTES. Also: how many came from each fortune file."""
    pool: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in SOURCES:
        src = FORTUNES / name
        if not src.is_file():
            continue
        for piece in re.split(r"^%[ \t]*$", src.read_text(encoding="utf-8", errors="replace"), flags=re.M):
            doc = clean_fortune(piece)
            if doc and doc not in seen:
                seen.add(doc)
                pool.append((name, doc))
    total = sum(len(doc.encode()) + 2 for _, doc in pool)
    stride = max(1, -(-total // TARGET_BYTES))
    docs, used = [], {}
    for name, doc in pool[::stride]:
        docs.append(doc)
        used[name] = used.get(name, 0) + 1
    return docs, used


def render(docs: list[str], used: dict[str, int], version: str) -> str:
    files = ", ".join(f"{FORTUNES / n} ({k} documents)" for n, k in used.items())
    header = [
        "# Held-out Chinese text for glmx quantization accuracy reports: verbatim fortunes, not written by glmx.",
        f"# Source: Debian package {PACKAGE} {version}; files used: {files}; every k-th document of them in file "
        f"order, k chosen for about {TARGET_BYTES} bytes.",
        f"# Cleaned by glm_export/data/get_corpus_zh.py, cleaning {CLEANING}: colour codes, attributions, "
        f"headings, code, lists and footnotes removed, lines joined; kept if >= {MIN_CJK} CJK ideographs and "
        f"CJK share >= {MIN_CJK_SHARE}; duplicates dropped; each cut to <= {MAX_CHARS} chars at 。！？: "
        f"{len(docs)} documents.",
        "# Lines starting with '# ' at the top are provenance and are skipped by the reader.",
    ]
    return "\n".join(header) + "\n" + "\n\n".join(docs) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file [default: {DEFAULT_OUT}]")
    args = ap.parse_args(argv)
    install_package()
    version = package_version(PACKAGE)
    if not version:
        print(f"get_corpus_zh.py: {PACKAGE} is not installed", file=sys.stderr)
        return 1
    docs, used = collect()
    text = render(docs, used, version)
    size = len(text.encode())
    if not MIN_BYTES <= size <= MAX_BYTES:
        print(f"get_corpus_zh.py: {size} bytes, outside {MIN_BYTES}..{MAX_BYTES}; not written", file=sys.stderr)
        return 1
    write_atomic(args.out, text)
    print(f"{args.out}: {len(docs)} documents, {size} bytes, {PACKAGE} {version}, files {dict(used)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
