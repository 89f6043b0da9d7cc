"""Judging a port where harm shows: does it change the target's next-token predictions as the adapter
changes the source's?

On held-out lines, at the positions where both tokenizations end at the same character and over
the tokens both vocabularies spell alike, the adapter's *effect* on the source is
``delta_s = log p(S + adapter) - log p(S)`` and a port's effect on the target is
``delta_t = log p(T + port) - log p(T)``. The port's *effect error* is

``E = sum_p sum_v w_pv (c(delta_s) - c(delta_t))^2 / sum_p sum_v w_pv c(delta_s)^2``

over the teacher's top ``K`` tokens ``v`` at each position ``p``, weighted by the teacher's
probabilities ``w`` (renormalised over those tokens) and centred per position (``c``: minus its
``w``-mean, so that the renormalisation of either distribution does not count). ``E = 1`` is
what leaving the port out scores; a port with ``E >= 1`` moves the target's predictions no
closer to the adapter's effect than nothing does, and calibrated (mapped) transfer leaves it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import LoraAdapter, attach_adapter
from ..alignment import AlignedSample, right_pad, shared_vocabulary
from ..checkpoints import Checkpoint
from ..pairing import Pairing
from .shared import Part

TOP_K = 64
BATCH = 8


@dataclass
class EffectProbe:
    """The adapter's effect on the source at the held-out aligned positions (top ``K`` teacher tokens).

    Attributes:
        target_rows / target_positions: the held-out lines in target tokens and, per line, the
            aligned target positions (in the order of the rows of ``delta``).
        support_t: target ids of the shared tokens (``None``: one tokenizer, every id).
        top: ``(P, K)`` support indices of the teacher's top tokens; ``weight`` their renormalised
            probabilities; ``delta`` the centred effect there.
    """

    target_rows: list[list[int]]
    target_positions: list[list[int]]
    support_t: torch.Tensor | None
    top: torch.Tensor
    weight: torch.Tensor
    delta: torch.Tensor

    def error(self, logprobs_port: torch.Tensor, logprobs_base: torch.Tensor) -> float:
        """``E`` of a port whose target log-probabilities over the support are ``logprobs_port`` ``(P, S)``."""
        delta_t = (logprobs_port - logprobs_base).gather(1, self.top).double()
        delta_t = delta_t - torch.sum(self.weight * delta_t, 1, keepdim=True)
        residual = torch.sum(self.weight * (self.delta - delta_t) ** 2)
        return float(residual / torch.sum(self.weight * self.delta**2).clamp(min=1e-30))


@torch.no_grad()
def support_logprobs(
    model: Any,
    rows: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    support: torch.Tensor | None,
    device: torch.device,
    pad: int = 0,
) -> torch.Tensor:
    """``(P, S)`` log-probabilities over the support at ``positions`` of each row (rows in order)."""
    out = []
    for start in range(0, len(rows), BATCH):
        ids, mask = right_pad(rows[start : start + BATCH], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, chosen in enumerate(positions[start : start + BATCH]):
            picked = logits[i, list(chosen)].float()
            if support is not None:
                picked = picked[:, support.to(picked.device)]
            out.append(torch.log_softmax(picked, dim=-1).cpu())
    return torch.cat(out)


def _vocab_rows(ckpt: Checkpoint) -> int | None:
    value = ckpt.config.get("vocab_size") or (ckpt.config.get("text_config") or {}).get("vocab_size")
    return int(value) if value else None


def source_effect(
    src: Checkpoint,
    tgt: Checkpoint,
    adapter: LoraAdapter,
    samples: Sequence[AlignedSample],
    tokenizer_s: Any,
    tokenizer_t: Any,
    device: torch.device,
) -> EffectProbe:
    """The adapter's effect on the source's predictions at the aligned positions of ``samples``.

    Loads the source model once (the adapter attached, then switched off), and frees it.
    """
    same = tokenizer_s is tokenizer_t or tokenizer_s.get_vocab() == tokenizer_t.get_vocab()
    support_s = support_t = None
    if not same:
        support_s, support_t = shared_vocabulary(tokenizer_s, tokenizer_t, _vocab_rows(src), _vocab_rows(tgt))
    rows_s = [s.source_ids for s in samples]
    positions_s = [[i for i, _ in s.pairs] for s in samples]
    pad_s = tokenizer_s.pad_token_id or 0
    model = attach_adapter(src.load_causal_lm(torch.float32), adapter).to(device).eval()
    teacher = support_logprobs(model, rows_s, positions_s, support_s, device, pad_s)
    with model.disable_adapter():
        base = support_logprobs(model, rows_s, positions_s, support_s, device, pad_s)
    del model
    top = torch.topk(teacher, min(TOP_K, teacher.shape[1]), dim=1)
    weight = torch.softmax(top.values.double(), dim=1)
    delta = (top.values - base.gather(1, top.indices)).double()
    delta = delta - torch.sum(weight * delta, 1, keepdim=True)
    return EffectProbe(
        [s.target_ids for s in samples], [[j for _, j in s.pairs] for s in samples], support_t, top.indices, weight,
        delta,
    )  # fmt: skip


def _apply(model: torch.nn.Module, parts: Sequence[Part], sign: float, transposed: bool) -> None:
    """Add (``sign`` 1) or remove (-1) the ported updates of ``parts`` in ``model``'s weights."""
    with torch.no_grad():
        for unit, _, B, A in parts:
            weight = model.get_submodule(unit.target.module).weight
            dW = (sign * unit.source_module.scale) * (B.double() @ A.double())
            weight += (dW.mT if transposed else dW).to(weight)


def leave_out_harm(
    pairing: Pairing,
    adapter: LoraAdapter,
    parts: list[Part],
    samples: Sequence[AlignedSample],
    tokenizers: tuple[Any, Any],
    device: torch.device,
) -> tuple[list[Part], dict[str, Any], str | None]:
    """The parts to keep, the check's numbers and a warning (or ``None``).

    The port's effect error ``E`` is measured with every part, then without each target
    layer's parts; the layers whose removal lowers ``E`` are left out. When ``E`` of what is left
    is still ``>= 1`` (no closer to the adapter's effect than nothing), every part is left out.
    Records of left-out parts are marked skipped with the reason.
    """
    tokenizer_s, tokenizer_t = tokenizers
    probe = source_effect(pairing.src, pairing.tgt, adapter, samples, tokenizer_s, tokenizer_t, device)
    lm = pairing.tgt.load_causal_lm(torch.float32).to(device).eval()
    pad = tokenizer_t.pad_token_id or 0
    transposed = pairing.arch_t.transposed

    def predictions() -> torch.Tensor:
        return support_logprobs(lm, probe.target_rows, probe.target_positions, probe.support_t, device, pad)

    base = predictions()
    by_layer: dict[int, list[Part]] = {}
    for part in parts:
        by_layer.setdefault(part[0].target.layer, []).append(part)
    _apply(lm, parts, 1.0, transposed)
    whole = probe.error(predictions(), base)
    without: dict[int, float] = {}
    for layer, group in by_layer.items():
        _apply(lm, group, -1.0, transposed)
        without[layer] = probe.error(predictions(), base)
        _apply(lm, group, 1.0, transposed)
    dropped = sorted(layer for layer, value in without.items() if value < whole)
    for layer in dropped:
        _apply(lm, by_layer[layer], -1.0, transposed)
    kept_error = probe.error(predictions(), base) if dropped else whole
    failed = kept_error >= 1.0 - 1e-6 or len(dropped) == len(by_layer)  # no better than nothing, or nothing left
    if failed:
        dropped = sorted(by_layer)
    for layer in dropped:
        for _, record, _, _ in by_layer[layer]:
            record.decision = "skipped"
            record.reason = (
                f"no-harm: the port changes the target's held-out next-token predictions no closer to the adapter's "
                f"effect than leaving it out (effect error {kept_error:.2f}); across model families use --method "
                "distill"
                if failed
                else f"no-harm: leaving this layer's writers out brings the target's held-out predictions closer to "
                f"the adapter's effect (effect error {without[layer]:.2f} < {whole:.2f})"
            )
    stats = {
        "lines": len(samples),
        "positions": int(probe.top.shape[0]),
        "error_all_layers": whole,
        "error_without_layer": {str(k): v for k, v in sorted(without.items())},
        "layers_left_out": dropped,
        "error_written": None if failed else kept_error,
    }
    if not failed:
        return [part for part in parts if part[0].target.layer not in dropped], stats, None
    warning = (
        f"WARNING: the calibrated (mapped) port does not reproduce the adapter's effect on held-out text (effect "
        f"error {kept_error:.2f} >= 1, no better than nothing): nothing is kept; across model families use "
        "--method distill with --prompts (the task's inputs)"
    )
    return [], stats, warning


__all__ = ["EffectProbe", "leave_out_harm", "source_effect", "support_logprobs"]
