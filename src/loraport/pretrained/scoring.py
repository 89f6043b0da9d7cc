"""ARC scoring with the context run once per question: the evaluator's numbers, about 2x faster.

:func:`loraport.evaluate.choice_scores` runs ``context + choice`` once per choice. Here the
questions are grouped by the token length of their context, each group's contexts run once
(with the model's KV cache), the cache is repeated once per choice and only the choices'
tokens run on top of it. Causal attention makes the result the same (tokens after a
continuation's end are padding that nothing before them sees); requests are encoded by
:func:`~loraport.evaluate.encode_pair`, so the numbers are the evaluator's to round-off
(tested). Used by the fusion benchmark, which scores hundreds of merged models.

Example::

    >>> scores = shared_context_scores(model, tokenizer, records)   # doctest: +SKIP
    >>> correct(records, scores)[:3]                                 # doctest: +SKIP
    [1.0, 0.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LoraportError
from ..evaluate import arc_requests, encode_pair


def _requests(tokenizer: Any, examples: list[dict]) -> list[tuple[list[int], list[list[int]]]]:
    out = []
    for k, example in enumerate(examples):
        context, continuations, _ = arc_requests(example)
        pairs = [encode_pair(tokenizer, context, c) for c in continuations]
        if any(p[0] != pairs[0][0] for p in pairs) or any(not p[1] for p in pairs):
            raise LoraportError(f"example {k}: choices change the context's tokens; use loraport.evaluate")
        out.append((pairs[0][0], [p[1] for p in pairs]))
    return out


@torch.no_grad()
def shared_context_scores(model: Any, tokenizer: Any, examples: list[dict], batch_size: int = 32) -> list[list[float]]:
    """Per question, the summed log-likelihood of each choice (as :func:`loraport.evaluate.choice_scores`)."""
    model.eval()
    requests = _requests(tokenizer, examples)
    scores: list[list[float]] = [[] for _ in examples]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (context, choices) in enumerate(requests):
        groups.setdefault((len(context), len(choices)), []).append(i)
    for (_, k), members in sorted(groups.items()):
        for start in range(0, len(members), batch_size):
            part = members[start : start + batch_size]
            out = model(input_ids=torch.tensor([requests[i][0] for i in part]), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            choices = [c for i in part for c in requests[i][1]]
            totals = [float(first[j // k, c[0]]) for j, c in enumerate(choices)]
            width = max(len(c) for c in choices)
            if width > 1:
                cache = out.past_key_values
                cache.batch_repeat_interleave(k)
                ids = torch.zeros(len(choices), width - 1, dtype=torch.long)
                for j, c in enumerate(choices):
                    ids[j, : len(c) - 1] = torch.tensor(c[:-1])
                logits = model(input_ids=ids, past_key_values=cache).logits
                for j, c in enumerate(choices):
                    if len(c) > 1:
                        window = torch.log_softmax(logits[j, : len(c) - 1].float(), dim=-1)
                        totals[j] += float(window.gather(1, torch.tensor(c[1:])[:, None]).sum())
            for n, i in enumerate(part):
                scores[i] = totals[n * k : (n + 1) * k]
    return scores


def correct(examples: list[dict], scores: list[list[float]]) -> list[float]:
    """1.0 where the highest-scoring choice (first of ties) is the answer, per question (``acc``)."""
    out = []
    for example, row in zip(examples, scores, strict=True):
        gold = example["choices"]["label"].index(example["answerKey"])
        best = max(range(len(row)), key=lambda i: (row[i], -i))
        out.append(1.0 if best == gold else 0.0)
    return out


__all__ = ["correct", "shared_context_scores"]
