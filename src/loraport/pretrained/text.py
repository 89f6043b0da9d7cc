"""Offline text on every machine: English prose from ``/usr/share/doc``, Python standard-library sources.

* :func:`doc_paragraphs`: paragraphs of the READMEs, NEWS, ``.txt`` and ``.md`` files under
  ``/usr/share/doc`` (gzipped or not), joined into one line each, kept when they read like
  prose (mostly letters, enough common English words, no code or tables), deduplicated.
* :func:`generic_lines`: a seeded sample of them, for generic calibration text and for a
  held-out generic loss (disjoint samples via ``skip``).
* :func:`python_source`: standard-library ``.py`` files, seeded order, up to a character
  budget: the other text domain that the SmolLM2 derivatives are trained on.
* :func:`task_domain_lines`: unlabeled text of a task's domain, its *questions without
  answers* in the evaluator's prompt form (``Question: ... Answer:``), from the task's
  training records only (for ``facts`` these are also its evaluation questions, by design of
  a memorisation task; no answer appears).

Everything is one sample per line (:func:`loraport.zoo.corpus.write_lines`) and deterministic
for a given machine's files and seed.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ..errors import LoraportError
from ..zoo.tasks import Task

DOC_ROOT = Path("/usr/share/doc")
_COMMON = {"the", "and", "of", "to", "a", "in", "is", "for", "that", "it", "with", "as", "be", "this", "are", "on"}
_CODE = re.compile(r"[{}<>$#=|\\]|\.\w+\(|::|--|__|http|www\.|@")


def _doc_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        name = path.name.lower().removesuffix(".gz")
        if path.is_file() and (name.endswith((".txt", ".md")) or name.startswith(("readme", "news"))):
            files.append(path)
    return files


def _read(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError):
        return ""
    return data.decode("utf-8", errors="replace")


def _is_prose(text: str, min_chars: int, max_chars: int) -> bool:
    if not min_chars <= len(text) <= max_chars or _CODE.search(text):
        return False
    words = text.split()
    if len(words) < 10 or sum(c.isalpha() or c.isspace() for c in text) < 0.9 * len(text):
        return False
    return sum(w.lower() in _COMMON for w in words) >= 0.12 * len(words)


def doc_paragraphs(root: str | os.PathLike[str] = DOC_ROOT, min_chars: int = 80, max_chars: int = 600) -> list[str]:
    """Prose paragraphs of the documentation under ``root``, one line each, in file order, deduplicated."""
    base = Path(root)
    if not base.is_dir():
        raise LoraportError(f"{base}: no documentation directory to take English text from")
    seen: set[str] = set()
    out: list[str] = []
    for path in _doc_files(base):
        for block in re.split(r"\n\s*\n", _read(path)):
            # markdown headings, list bullets and indentation go; the words stay
            text = " ".join(line.strip().lstrip("*-+ ").strip() for line in block.splitlines())
            text = " ".join(text.split())
            if text not in seen and _is_prose(text, min_chars, max_chars):
                seen.add(text)
                out.append(text)
    return out


def generic_lines(count: int, seed: int = 0, skip: int = 0, root: str | os.PathLike[str] = DOC_ROOT) -> list[str]:
    """``count`` paragraphs of :func:`doc_paragraphs` in a seeded order, after the first ``skip`` of that order."""
    paragraphs = doc_paragraphs(root)
    random.Random(seed).shuffle(paragraphs)
    chosen = paragraphs[skip : skip + count]
    if len(chosen) < count:
        raise LoraportError(f"{root}: only {len(paragraphs)} prose paragraphs, need {skip + count}")
    return chosen


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if not parts & {"site-packages", "test", "tests", "idlelib", "lib2to3"}:
            yield path


def python_source(
    chars: int, seed: int = 0, root: str | os.PathLike[str] | None = None, skip_files: int = 0
) -> list[str]:
    """Standard-library ``.py`` files in a seeded order, after the first ``skip_files`` of that order,
    until ``chars`` characters (the last one cut). Held-out text: ``skip_files=len(train)``."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = list(_python_files(base))
    if not files:
        raise LoraportError(f"{base}: no Python sources found")
    random.Random(seed).shuffle(files)
    out: list[str] = []
    total = 0
    for path in files[skip_files:]:
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(text[: chars - total])
        total += len(out[-1])
        if total >= chars:
            break
    if total < chars:
        raise LoraportError(f"{base}: only {total} characters of Python sources after {skip_files} files, need {chars}")
    return out


def task_domain_lines(task: Task) -> list[str]:
    """The task's training questions in the evaluator's prompt form, without answers: ``Question: q Answer:``."""
    return [f"Question: {record['question']} Answer:" for record in task.train]
