"""Calibration text: reading it, tokenizing it, and aligning two tokenizers' positions.

Two models with different tokenizers see the same text as different token sequences; the
positions whose tokens end at the same character are aligned (:mod:`loraport.alignment`);
statistics are accumulated over aligned positions only. With one tokenizer every position
aligns with itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..alignment import AlignedSample, align_sample
from ..checkpoints import Checkpoint
from ..errors import LoraportError

UNKNOWN_LIMIT = 0.5


def read_calibration_lines(source: str | os.PathLike[str] | Sequence[str]) -> tuple[list[str], str]:
    """Samples from a text file (one per line, blank lines ignored) or a list of strings.

    Returns ``(samples, name)``; ``name`` is the file (or ``<list of N strings>``) for messages.

    Raises:
        LoraportError: missing file, binary content (NUL bytes or not UTF-8), no text.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise LoraportError(f"{name}: calibration file not found")
        data = path.read_bytes()
        if b"\x00" in data[: 1 << 20]:
            raise LoraportError(f"{name}: calibration file is binary (expected UTF-8 text, one sample per line)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LoraportError(
                f"{name}: calibration file is not UTF-8 text (byte {exc.start}); expected one sample per line"
            ) from None
        lines = [line.strip() for line in text.splitlines()]
    else:
        items = list(source)
        name = f"<list of {len(items)} strings>"
        if not all(isinstance(item, str) for item in items):
            raise LoraportError(f"calibration {name}: every item must be a string")
        lines = [item.strip() for item in items]
    samples = [line for line in lines if line]
    if not samples:
        raise LoraportError(f"{name}: no calibration text (expected one sample per line)")
    return samples, name


def tokenize_calibration(
    samples: Sequence[str], tokenizer: Any, max_samples: int, max_tokens: int, name: str
) -> list[list[int]]:
    """Token ids of the first ``max_samples`` samples, each cut to ``max_tokens``.

    Raises:
        LoraportError: when more than half of the tokens are the tokenizer's unknown token
            (text in another tokenizer's vocabulary), or when nothing is left.
    """
    chosen = list(samples[:max_samples])
    encoded = tokenizer(chosen, truncation=True, max_length=max_tokens)["input_ids"]
    ids = [list(row) for row in encoded if len(row) > 0]
    if not ids:
        raise LoraportError(f"{name}: the calibration text gives no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        total = sum(len(row) for row in ids)
        unknown = sum(row.count(unk) for row in ids)
        if unknown > UNKNOWN_LIMIT * total:
            raise LoraportError(
                f"{name}: {unknown / total:.0%} of the calibration tokens are unknown to the base models' "
                f"tokenizer (text for another tokenizer or language?)"
            )
    return ids


def base_tokenizers(src: Checkpoint, tgt: Checkpoint, purpose: str = "calibrated transfer") -> tuple[Any, Any]:
    """Both bases' tokenizers (an error naming the base that has none; ``purpose`` names the caller)."""
    tokenizers = []
    for ckpt in (src, tgt):
        try:
            tokenizers.append(ckpt.load_tokenizer())
        except LoraportError as exc:
            raise LoraportError(f"{purpose} needs each base model's tokenizer: {exc}") from None
    return tokenizers[0], tokenizers[1]


def shared_tokenizer(src: Checkpoint, tgt: Checkpoint, purpose: str = "calibrated transfer") -> Any:
    """The tokenizer of both bases; an error unless their vocabularies are identical.

    Teacher and student (or two models RegMean runs) must see the same token ids for the
    regression to compare like with like; ``purpose`` names the caller in errors.
    """
    tokenizers = base_tokenizers(src, tgt, purpose)
    vocab_s, vocab_t = (tok.get_vocab() for tok in tokenizers)
    if vocab_s != vocab_t:
        differ = len(set(vocab_s.items()) ^ set(vocab_t.items()))
        raise LoraportError(
            f"{purpose} needs the same tokenizer on both bases: {src.name} ({len(vocab_s)} tokens) and "
            f"{tgt.name} ({len(vocab_t)} tokens) differ in {differ} vocabulary entries"
        )
    return tokenizers[0]


def same_vocabulary(tokenizer_s: Any, tokenizer_t: Any) -> bool:
    """Whether two tokenizers map every token string to the same id."""
    return tokenizer_s is tokenizer_t or tokenizer_s.get_vocab() == tokenizer_t.get_vocab()


def align_calibration(
    samples: Sequence[str],
    tokenizer_s: Any,
    tokenizer_t: Any,
    max_samples: int,
    max_tokens: int,
    name: str,
    min_aligned: float = 0.2,
) -> tuple[list[AlignedSample], float]:
    """Aligned samples of the first ``max_samples`` lines and the share of target positions that aligned.

    Raises:
        LoraportError: when a tokenizer gives no offsets (a slow tokenizer), when nothing is
            left, or when fewer than ``min_aligned`` of the target's positions align (text the
            tokenizers split incompatibly).
    """
    if not getattr(tokenizer_s, "is_fast", True) or not getattr(tokenizer_t, "is_fast", True):
        raise LoraportError("aligning two tokenizers needs fast tokenizers (character offsets)")
    aligned = [align_sample(text, tokenizer_s, tokenizer_t, max_tokens) for text in samples[:max_samples]]
    aligned = [a for a in aligned if a.pairs]
    total = sum(a.target_tokens for a in aligned) or 0
    count = sum(len(a.pairs) for a in aligned)
    share = count / total if total else 0.0
    if not aligned or share < min_aligned:
        raise LoraportError(
            f"{name}: only {count} of {total} token positions ({share:.0%}) end at the same character in both "
            f"tokenizers (need {min_aligned:.0%}); use plain text both tokenizers split at word ends"
        )
    return aligned, share
