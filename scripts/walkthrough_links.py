"""Keep docs/walkthrough.md's code links pointing at the right lines.

A link looks like [`dpo_loss`](../minidpo/methods/dpo.py#L61): the backticked name must be defined on that line
(`def name`, `class name`, or `name =` / `name:` at the start of a statement). `check()` lists the links that are stale;
`python scripts/walkthrough_links.py` rewrites each stale line number to where the name is defined now.
tests/test_docs.py runs check(), so a refactor that moves a function fails the suite until this script is run.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "walkthrough.md"
LINK = re.compile(r"\[`(?P<name>[A-Za-z_][\w.]*)`\]\(\.\./(?P<path>[\w/.-]+\.py)#L(?P<line>\d+)\)")


def defines(line: str, name: str) -> bool:
    short = name.split(".")[-1]
    s = line.strip()
    return bool(re.match(rf"(async\s+)?(def|class)\s+{re.escape(short)}\b", s) or
                re.match(rf"{re.escape(short)}\s*[:=]", s) or re.match(rf"self\.{re.escape(short)}\s*=", s))


def find(path: Path, name: str) -> int | None:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if defines(line, name):
            return i
    return None


def check(doc: Path = DOC) -> list[str]:
    """Stale links: 'name -> path#Lline' for each link whose line does not define its name."""
    bad = []
    for m in LINK.finditer(doc.read_text()):
        path = ROOT / m["path"]
        lines = path.read_text().splitlines() if path.is_file() else []
        n = int(m["line"])
        if not (1 <= n <= len(lines) and defines(lines[n - 1], m["name"])):
            bad.append(f"{m['name']} -> {m['path']}#L{n}")
    return bad


def fix(doc: Path = DOC) -> int:
    text, changed = doc.read_text(), 0

    def repl(m: re.Match) -> str:
        nonlocal changed
        line = find(ROOT / m["path"], m["name"]) if (ROOT / m["path"]).is_file() else None
        if line is None:
            raise SystemExit(f"{m['name']} is not defined in {m['path']}: fix the link by hand")
        if line != int(m["line"]):
            changed += 1
        return f"[`{m['name']}`](../{m['path']}#L{line})"
    doc.write_text(LINK.sub(repl, text))
    return changed


if __name__ == "__main__":
    print(f"updated {fix()} links in {DOC.relative_to(ROOT)}")
    sys.exit(0)
