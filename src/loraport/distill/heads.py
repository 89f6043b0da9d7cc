"""The output head applied only where a loss or a target is taken (a 262k-row head costs more than a small model).

Shared by the teacher (its targets at the loss positions) and the student (its loss there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

# Positions per piece of the output head. A chat answer's loss over Gemma-3's 262k-row head,
# batch 16 x ~100 answer tokens, is 1,600 x 262k float32 logits (1.7 GB) kept with their
# softmax and gradient for the backward pass: one caps port peaked at 17 GB RSS. In pieces under
# activation checkpointing only the pieces' hidden states are kept; each piece's logits are
# made again in the backward pass (one more head matmul). Measured on that shape (Gemma-3-270M
# student, rank-16 LoRA everywhere, bf16 autocast, 45k-token KL support; one step, 1 thread on
# a loaded machine): whole head 8.9 GB peak, 54 s; pieces of 256: 4.8 GB, 44 s; of 64: 4.5 GB,
# 43 s; the same loss to 6 digits.
HEAD_CHUNK = 64


def head_logits(lm: Any, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The output head on final hidden states ``(N, d)``: ``(N, V)`` logits, or with ``weight`` (some of
    the head's rows, :func:`head_rows`) those rows' logits only, in the type of ``hidden`` (a head held
    in a narrower type multiplies in that type); the model's final logit soft-capping applied, as its
    forward pass does. The head's bias, if any, must be folded in by the caller."""
    head = lm.get_output_embeddings()
    rows = head.weight if weight is None else weight
    if rows.dtype.itemsize < hidden.dtype.itemsize:
        # A head held in bfloat16 multiplies in bfloat16 (a float32 copy of Gemma-3's head would be
        # 0.67 GB on every call); the logits come back in the hidden states' type.
        logits = (hidden.to(rows.dtype) @ rows.mT).to(hidden.dtype)
    else:
        logits = hidden @ rows.mT.to(hidden.dtype)
    bias = getattr(head, "bias", None)
    if bias is not None and weight is None:
        logits = logits + bias.to(hidden.dtype)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def by_pieces(
    fn: Callable[..., tuple[torch.Tensor, ...]], hidden: torch.Tensor, *per_position: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``fn(hidden_piece, *pieces)`` over ``HEAD_CHUNK`` positions at a time, its per-position outputs
    concatenated; with gradients each piece runs under activation checkpointing (its logits are not kept)."""
    outputs = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        pieces = [hidden[start : start + HEAD_CHUNK]] + [t[start : start + HEAD_CHUNK] for t in per_position]
        if torch.is_grad_enabled() and hidden.requires_grad:
            outputs.append(checkpoint(fn, *pieces, use_reentrant=False))
        else:
            outputs.append(fn(*pieces))
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def head_rows(lm: Any, rows: torch.Tensor) -> torch.Tensor:
    """The head's weight rows ``rows`` (a copy made once: the support's rows of a large vocabulary)."""
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("an output head with a bias is not supported for a restricted support")
    return head.weight.detach()[rows.to(head.weight.device)].clone()


def base_model(student: Any) -> Any:
    """The ``transformers`` model under a PEFT wrapper (itself otherwise)."""
    return student.get_base_model() if hasattr(student, "get_base_model") else student


def final_hidden(student: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states ``(B, L, d)``: the output head is applied only where needed."""
    return (
        base_model(student).get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    )


__all__ = ["HEAD_CHUNK", "base_model", "by_pieces", "final_hidden", "head_logits", "head_rows"]
