"""Generic English text wherever Python runs: paragraphs of the standard library's module docstrings.

Distillation reports what a port costs elsewhere as the target's perplexity change on generic
text; without ``--calibration`` it uses these paragraphs (read from the running interpreter's
own standard library, so nothing is shipped or downloaded).
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

MIN_CHARS, MAX_CHARS = 120, 600


def stdlib_paragraphs(count: int, seed: int = 0) -> list[str]:
    """Up to ``count`` prose paragraphs (one line each) from standard-library module docstrings, seeded order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for block in (doc or "").split("\n\n"):
            text = " ".join(block.split())
            letters = sum(c.isalpha() or c == " " for c in text)
            if MIN_CHARS <= len(text) <= MAX_CHARS and letters >= 0.85 * len(text) and ">>>" not in text:
                found.append(text)
    random.Random(seed).shuffle(found)
    return found[:count]


__all__ = ["stdlib_paragraphs"]
