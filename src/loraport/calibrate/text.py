"""Calibration text: reading it, tokenizing it, and aligning two tokenizers' positions.

Two models with different tokenizers see the same text as different token sequences. A
source position and a target position are *aligned* when their tokens' character spans end
at the same offset (word ends, punctuation), read from the fast tokenizers' offset mappings;
statistics are accumulated over aligned positions only. With one tokenizer every position
aligns with itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class AlignedSample:
    """One calibration sample tokenized by both models, with its aligned positions.

    ``source_ids`` / ``target_ids``: token ids; ``pairs``: ``(i_s, i_t)`` position pairs whose
    tokens end at the same character; ``target_tokens``: positions of the target's non-special
    tokens (the denominator of the aligned share).
    """

    source_ids: list[int]
    target_ids: list[int]
    pairs: list[tuple[int, int]]
    target_tokens: int
    source_tokens: int


def _ends(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], list[int | None]]:
    """Token ids and, per position, the character offset where the token ends (``None``: special token)."""
    encoded = tokenizer(text, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    ends: list[int | None] = []
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, (start, end) in zip(ids, encoded["offset_mapping"], strict=True):
        ends.append(None if (token_id in specials and start == end) or end <= 0 else int(end))
    return ids, ends


def align_sample(text: str, tokenizer_s: Any, tokenizer_t: Any, max_tokens: int) -> AlignedSample:
    """Tokenize ``text`` with both tokenizers and pair the positions whose tokens end at the same character.

    When several tokens end at one character (a byte-level BPE splitting a multi-byte
    character), the last of them represents it on each side.
    """
    ids_s, ends_s = _ends(tokenizer_s, text, max_tokens)
    ids_t, ends_t = _ends(tokenizer_t, text, max_tokens)
    last_s: dict[int, int] = {}
    for i, end in enumerate(ends_s):
        if end is not None:
            last_s[end] = i
    last_t: dict[int, int] = {}
    for i, end in enumerate(ends_t):
        if end is not None:
            last_t[end] = i
    pairs = sorted((last_s[end], i_t) for end, i_t in last_t.items() if end in last_s)
    return AlignedSample(ids_s, ids_t, pairs, len(last_t), len(last_s))


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
