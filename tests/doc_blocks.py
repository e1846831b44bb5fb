"""The code blocks of the Markdown docs, read and run by the tests so the docs cannot go stale.

A ```` ```python ```` block may be followed by a ```` ```text ```` block: what running it
prints. ``run_python`` runs the blocks in order in one namespace (a page's examples
build on each other, as in a session at the prompt) and checks each printed text as
doctest would (``...`` stands for anything), except that numbers need only agree to
within 0.002: probabilities printed to three digits may round the other way on
another BLAS kernel.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"-?\d+\.\d+")
TOLERANCE = 0.002


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based


def blocks(text: str, *, first_line: int = 1) -> list[Block]:
    """The fenced blocks of a Markdown text, in order."""
    found: list[Block] = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        line = first_line + text.count("\n", 0, match.start())
        found.append(Block(match[1], match[2], line))
    return found


def section(path: Path, title: str) -> tuple[str, int]:
    """The text of a ``## title`` section, up to the next ``## `` heading, and its first line number."""
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"{path.name} has no '## {title}' section"
    return match[1], text.count("\n", 0, match.start(1)) + 1


def same_output(expected: str, got: str) -> bool:
    if "..." in expected:
        return doctest.OutputChecker().check_output(expected, got, doctest.ELLIPSIS)
    if NUMBER.sub("#", expected).strip() != NUMBER.sub("#", got).strip():
        return False
    pairs = zip(NUMBER.findall(expected), NUMBER.findall(got), strict=True)
    return all(abs(float(a) - float(b)) <= TOLERANCE for a, b in pairs)


def run_python(found: list[Block], source: str, replace: dict[str, str] | None = None) -> int:
    """Run the python blocks in order in one namespace, each checked against the text block that
    follows it, if any; ``replace`` rewrites the code first (a test server's address). Returns
    how many blocks ran."""
    namespace: dict[str, object] = {"__name__": "__doc__"}
    ran = 0
    for i, block in enumerate(found):
        if block.language != "python":
            continue
        code = block.code
        for old, new in (replace or {}).items():
            code = code.replace(old, new)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(code, f"{source}, block at line {block.line}", "exec"), namespace)
        after = found[i + 1] if i + 1 < len(found) else None
        if after is not None and after.language == "text":
            assert same_output(after.code, printed.getvalue()), (
                f"{source}, block at line {block.line} printed:\n{printed.getvalue()}\n"
                f"where the text at line {after.line} says:\n{after.code}"
            )
        ran += 1
    return ran
