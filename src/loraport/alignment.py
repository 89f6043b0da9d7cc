"""Two tokenizations of one text: the positions that line up, and the tokens both vocabularies share.

Two models with different tokenizers see the same text as different token sequences. A
source position and a target position are *aligned* when their tokens' character spans end
at the same offset (word ends, punctuation), read from the fast tokenizers' offset mappings:
both models then predict the text that follows the same character. Tokens that both
vocabularies spell the same way (:func:`shared_vocabulary`) make the two predictions
comparable. Calibrated transfer (``mapped``) and distillation across tokenizers build on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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


def token_ends(
    tokenizer: Any, text: str, max_tokens: int | None = None, add_special_tokens: bool = True
) -> tuple[list[int], list[int | None]]:
    """Token ids (the tokenizer's default special tokens unless ``add_special_tokens`` is false, as for
    chat-rendered text that carries its own; cut to ``max_tokens`` if given) and, per position, the
    character offset where the token ends (``None``: a special token the text does not spell)."""
    cut = {} if max_tokens is None else {"truncation": True, "max_length": max_tokens}
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens, **cut)
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
    ids_s, ends_s = token_ends(tokenizer_s, text, max_tokens)
    ids_t, ends_t = token_ends(tokenizer_t, text, max_tokens)
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


def token_text(token: str) -> str:
    """A vocabulary entry as text: byte-level BPE's ``Ġ``/``Ċ`` and sentencepiece's ``▁`` as space / newline."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")


def token_texts(tokenizer: Any, rows: int | None = None) -> dict[str, int]:
    """The vocabulary by token text (:func:`token_text`): ids below ``rows`` (the output head's rows) if
    given; of two entries spelled alike, the one listed last."""
    return {token_text(token): index for token, index in tokenizer.get_vocab().items() if rows is None or index < rows}


def shared_vocabulary(
    tokenizer_s: Any, tokenizer_t: Any, rows_s: int | None = None, rows_t: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``(ids_s, ids_t)`` of the tokens both vocabularies spell the same way, sorted by text.

    ``rows_s`` / ``rows_t``: ids at or above these (beyond the output head) are left out.
    Special tokens (``<s>``, ``<eos>``, ...) take part only when spelled alike.
    """
    texts_s, texts_t = token_texts(tokenizer_s, rows_s), token_texts(tokenizer_t, rows_t)
    shared = sorted(set(texts_s) & set(texts_t))
    ids_s = torch.tensor([texts_s[text] for text in shared], dtype=torch.long)
    ids_t = torch.tensor([texts_t[text] for text in shared], dtype=torch.long)
    return ids_s, ids_t


def right_pad(rows: Any, pad: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one right-padded batch: ``(ids, attention mask)``, on ``device``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


__all__ = [
    "AlignedSample",
    "align_sample",
    "right_pad",
    "shared_vocabulary",
    "token_ends",
    "token_text",
    "token_texts",
]
