"""Generic English text wherever Python runs: paragraphs of the standard library's module docstrings.

Distillation reports what a port costs elsewhere as the target's perplexity change on generic
text; without ``--calibration`` it uses these paragraphs (read from the running interpreter's
own standard library, so nothing is shipped or downloaded).
"""

from __future__ import annotations

import ast
import functools
import math
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..alignment import right_pad
from ..calibrate.text import read_calibration_lines
from .heads import base_model, by_pieces, final_hidden, head_logits

MIN_CHARS, MAX_CHARS = 120, 600


def stdlib_paragraphs(count: int, seed: int = 0) -> list[str]:
    """Up to ``count`` prose paragraphs (one line each) from standard-library module docstrings, seeded order."""
    found = list(_stdlib_prose())
    random.Random(seed).shuffle(found)
    return found[:count]


@functools.cache
def _stdlib_prose() -> tuple[str, ...]:
    """Every prose paragraph of the standard library's module docstrings, in file order: parsing the library
    takes about a second, and a distilled port asks for its paragraphs more than once (the kept, measured and
    watched lines)."""
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
    return tuple(found)


def generic_lines(text: str | None, count: int, seed: int) -> tuple[list[str], list[str], str]:
    """Lines of generic text: ``(keep lines, perplexity lines, name)``, disjoint.

    ``text`` (``--calibration``), else paragraphs of the standard library's docstrings: the first
    ``count`` measure the perplexity change (of a port on its target, of the adapter on its source),
    the next ``4 * count`` are kept (the student keeps the target's predictions on them).
    """
    if text is not None:
        lines, name = read_calibration_lines(text)
        half = len(lines) // 2
        measured = lines[half:][:count] if len(lines) > 1 else lines
        return lines[:half][: 4 * count], measured, name
    lines = stdlib_paragraphs(5 * count, seed)
    return lines[count:], lines[:count], "standard-library docstrings"


def watch_lines(text: str | None, count: int, seed: int) -> tuple[list[str], list[str]]:
    """``(keep lines, watch lines)``: the keep lines of :func:`generic_lines` and up to ``count // 2`` more lines
    of generic text apart from both of its sets, which watch the student's perplexity change while it trains
    (:class:`~loraport.distill.train.KeepBound`), so the lines the change is reported on steer nothing.

    Standard-library paragraphs: the next ones after :func:`generic_lines`'s (its sets stay as they were).
    ``--calibration`` text: its keep half's lines beyond those kept, else the last quarter of the kept ones.
    """
    keep, _, _ = generic_lines(text, count, seed)
    wanted = max(1, count // 2)
    if text is None:
        return keep, stdlib_paragraphs(5 * count + wanted, seed)[5 * count :]
    lines, _ = read_calibration_lines(text)
    spare = lines[: len(lines) // 2][len(keep) :]
    if spare:
        return keep, spare[:wanted]
    moved = min(wanted, len(keep) // 4)
    return (keep[: len(keep) - moved], keep[len(keep) - moved :]) if moved else (keep, [])


@torch.no_grad()
def row_nlls(
    model: Any, rows: Sequence[Sequence[int]], device: torch.device, batch_size: int = 4
) -> list[tuple[float, int]]:
    """Each token row's summed next-token negative log-likelihood (nats) and the tokens it scores, a few rows
    per forward pass.

    The output head is applied a few positions at a time (:func:`~.heads.by_pieces`): the whole
    logits of 4 rows x 128 tokens over Gemma-3's 262k-row head are 0.5 GB in float32, and this
    check raised a distilled port's peak RSS by 0.3 GB at its end (benchmarks/results/real.md).
    """
    lm = base_model(model)
    out: list[tuple[float, int]] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = right_pad(rows[start : start + batch_size], 0, device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = final_hidden(model, ids, mask, positions)[:, :-1]
        scored = mask[:, 1:] == 1
        (nll,) = by_pieces(
            lambda h, wanted: (torch.nn.functional.cross_entropy(head_logits(lm, h), wanted, reduction="none"),),
            hidden[scored].float(),
            ids[:, 1:][scored],
        )
        counts = scored.sum(1).tolist()
        out += [(float(part.sum()), int(n)) for part, n in zip(nll.split(counts), counts, strict=True)]
    return out


def mean_nll(model: Any, rows: Sequence[Sequence[int]], device: torch.device, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of the token rows (nats per token): :func:`row_nlls` pooled."""
    return pooled_nll(row_nlls(model, rows, device, batch_size))


def pooled_nll(rows: Sequence[tuple[float, int]]) -> float:
    """The mean NLL per token of :func:`row_nlls`'s rows."""
    return sum(total for total, _ in rows) / max(sum(n for _, n in rows), 1)


def perplexity_change_stderr(before: Sequence[tuple[float, int]], after: Sequence[tuple[float, int]]) -> float | None:
    """The standard error of the perplexity change ``exp(nll_after - nll_before) - 1`` over the lines (the same
    lines scored twice: :func:`row_nlls`), by the ratio estimator's variance and the delta method;
    ``None`` with fewer than two lines.

    The change on 32 lines is a sample: on the generation benchmark's capitals port onto Gemma-3 the
    reported 32 standard-library paragraphs gave +19 % where all 130 the port never trained on gave
    +13 % (benchmarks/results/generic_noise.md).
    """
    if len(before) < 2 or len(before) != len(after):
        return None
    tokens = sum(n for _, n in before)
    diffs = [(a - b, n) for (b, n), (a, _) in zip(before, after, strict=True)]
    mean = sum(d for d, _ in diffs) / tokens
    k = len(diffs)
    variance = k / (k - 1) * sum((d - mean * n) ** 2 for d, n in diffs) / tokens**2
    return math.exp(mean) * math.sqrt(variance)


def token_rows(tokenizer: Any, lines: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each line's token ids (default special tokens), cut to ``max_tokens``; lines of one token left out."""
    rows = tokenizer(list(lines), truncation=True, max_length=max_tokens)["input_ids"] if lines else []
    return [list(r) for r in rows if len(r) > 1]


__all__ = [
    "generic_lines",
    "mean_nll",
    "perplexity_change_stderr",
    "pooled_nll",
    "row_nlls",
    "stdlib_paragraphs",
    "token_rows",
    "watch_lines",
]
