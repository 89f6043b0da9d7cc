"""The output head applied only where a loss or a target is taken (a 262k-row head costs more than a small model).

Shared by the teacher (its targets at the loss positions) and the student (its loss there).
"""

from __future__ import annotations

from typing import Any

import torch


def head_logits(lm: Any, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The output head on final hidden states ``(N, d)``: ``(N, V)`` logits, or with ``weight`` (some of
    the head's rows, :func:`head_rows`) those rows' logits only; the model's final logit soft-capping
    applied, as its forward pass does. The head's bias, if any, must be folded in by the caller."""
    head = lm.get_output_embeddings()
    logits = hidden @ (head.weight if weight is None else weight).mT.to(hidden.dtype)
    bias = getattr(head, "bias", None)
    if bias is not None and weight is None:
        logits = logits + bias.to(hidden.dtype)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


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


__all__ = ["base_model", "final_hidden", "head_logits", "head_rows"]
