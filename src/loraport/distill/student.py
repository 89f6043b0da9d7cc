"""The student: the target base with a new LoRA, its targets from the teacher, its loss and its agreement.

The teacher's outputs are mapped onto the student's tokenization of the same texts: a teacher
position and a student position are aligned when their tokens end at the same character
(:mod:`loraport.alignment`); there the student's next-token distribution over the support
(its whole vocabulary, or the shared tokens renormalised) is pulled toward the teacher's by a
KL divergence computed on the teacher's top ``K`` plus one tail bucket. The sequence-level part
is the student's negative log-likelihood of the teacher's continuation in its own tokens.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import LoraModule, lora_scale
from ..alignment import right_pad
from ..lowrank import balanced_factors
from .heads import base_model, by_pieces, final_hidden, head_logits, head_rows
from .teacher import TeacherOutputs, text_ends

PEFT_PREFIX = "base_model.model."


@dataclass
class StudentSample:
    """One text as the student sees it.

    Attributes:
        ids: student token ids of ``prompt + continuation`` (+ the student's end token when the
            teacher ended its turn there).
        kl_positions: ``(P,)`` student positions with a teacher distribution.
        kl_ids: ``(P, K)`` support indices of the teacher's top tokens; ``kl_logprobs``: theirs.
        seq_positions: ``(C,)`` positions predicting the continuation's tokens ``seq_ids``.
    """

    ids: list[int]
    kl_positions: torch.Tensor
    kl_ids: torch.Tensor
    kl_logprobs: torch.Tensor
    seq_positions: torch.Tensor
    seq_ids: torch.Tensor


@dataclass
class StudentView:
    """How the student reads the teacher's texts.

    Attributes:
        prompts: the student's rendering of each of the teacher's ``items`` (its own chat template,
            or the plain prompt as the teacher read it).
        add_special_tokens: encode with the tokenizer's default special tokens (``False`` for
            chat-rendered text, which carries its own).
        end_id: the student's end token (end of turn, or EOS), learned where the teacher ended its
            turn; ``None``: never.
        keep_end_kl: keep the teacher's distribution at the position that predicts its end token
            (only meaningful when both models share the vocabulary and the end token).
        select_share: token selection: the share of the continuation's targets kept, those where the
            adapter raises the next token's log-probability most over the source base (1: all).
    """

    prompts: list[str]
    add_special_tokens: bool = True
    end_id: int | None = None
    keep_end_kl: bool = True
    select_share: float = 1.0


def _selected(effect: torch.Tensor, answer_rows: list[int], share: float) -> set[int]:
    """The rows (of ``answer_rows``) with the largest effect: ``ceil(share * n)`` of them (ties: earlier)."""
    if share >= 1.0 or not answer_rows:
        return set(answer_rows)
    count = max(1, math.ceil(share * len(answer_rows)))
    ranked = sorted(answer_rows, key=lambda r: (-float(effect[r]), r))
    return set(ranked[:count])


def student_samples(
    tokenizer: Any, teacher: TeacherOutputs, indices: Sequence[int] | None = None, view: StudentView | None = None
) -> list[StudentSample]:
    """The teacher's targets on the student's tokens for texts ``indices`` (default: all).

    The continuation is the same text on both sides; the prompts may differ (each model's chat
    template). A teacher position maps to the student position whose token ends at the same
    character of the continuation (or of the prompt, when both read the same prompt text). With
    token selection only the chosen continuation targets (and the end token) remain.
    """
    view = view or StudentView(list(teacher.items))
    chosen = range(len(teacher.prompts)) if indices is None else indices
    samples = []
    for i in chosen:
        teacher_prompt, continuation = teacher.prompts[i], teacher.continuations[i]
        prompt = view.prompts[teacher.sources[i]]
        shift, same_prompt = len(prompt) - len(teacher_prompt), prompt == teacher_prompt
        ids, ends = text_ends(tokenizer, prompt + continuation, view.add_special_tokens)
        ended = teacher.ended[i] == "end" and view.end_id is not None
        last_at: dict[int, int] = {}
        for j, end in enumerate(ends):
            if end >= 0:
                last_at[end] = j
        teacher_ends = teacher.ends[i]
        text_end = len(teacher_prompt) + len(continuation)
        effect = teacher.token_effect[i] if teacher.token_effect else None
        positions_i = teacher.positions[i].tolist()
        answer_rows = [row for row, pos in enumerate(positions_i) if int(teacher_ends[pos]) >= len(teacher_prompt)]
        kept = _selected(effect, answer_rows, view.select_share) if effect is not None else set(answer_rows)
        rows, positions = [], []
        for row, pos in enumerate(teacher.positions[i].tolist()):
            end = int(teacher_ends[pos])
            if end >= len(teacher_prompt):
                if row not in kept:
                    continue
                if ended and end == text_end and not view.keep_end_kl:
                    continue  # it predicts the teacher's end token, which the support does not hold
                j = last_at.get(end + shift)
            elif same_prompt:
                j = last_at.get(end)
            else:
                continue
            if j is not None and j < len(ids):
                rows.append(row)
                positions.append(j)
        seq_pos, seq_ids = [], []
        spans = _kept_spans(teacher, i, kept, shift) if effect is not None and view.select_share < 1.0 else None
        for j in range(1, len(ids)):
            in_answer = ends[j] > len(prompt) and ends[j - 1] >= len(prompt)
            if in_answer and (spans is None or any(ends[j - 1] < stop and ends[j] > begin for begin, stop in spans)):
                seq_pos.append(j - 1)
                seq_ids.append(ids[j])
        if ended:
            if ids:
                seq_pos.append(len(ids) - 1)
                seq_ids.append(int(view.end_id))  # type: ignore[arg-type]
            ids = [*ids, int(view.end_id)]  # type: ignore[arg-type]
        samples.append(
            StudentSample(
                ids,
                torch.tensor(positions, dtype=torch.long),
                teacher.top_ids[i][rows],
                teacher.top_logprobs[i][rows],
                torch.tensor(seq_pos, dtype=torch.long),
                torch.tensor(seq_ids, dtype=torch.long),
            )
        )
    return samples


def _kept_spans(teacher: TeacherOutputs, i: int, kept: set[int], shift: int) -> list[tuple[int, int]]:
    """Character spans (in the student's text) of the continuation tokens token selection keeps: the token
    after a kept teacher position spans from that position's end to the next one's. A student token
    is learned when it overlaps one of them (the two tokenizers cut the text differently)."""
    ends = teacher.ends[i]
    positions = teacher.positions[i].tolist()
    spans = []
    for row in kept:
        pos = positions[row]
        if pos + 1 < len(ends) and int(ends[pos + 1]) >= 0 and int(ends[pos]) >= 0:
            spans.append((int(ends[pos]) + shift, int(ends[pos + 1]) + shift))
    return spans


# -- the PEFT student -------------------------------------------------------------------------


# ``--distill-layers auto`` takes the upper half only of a target this deep. Measured: on Gemma-3-270M
# (18 layers) the upper half ported facts / bins better than every layer (0.920 / 0.938 against 0.905 /
# 0.781, benchmarks/results/real.md); on the zoo's X (6 layers, the demo's 150 steps, seeds 0-2) worse
# (gain recovery 0.33 / 0.21 / 0.17 against 0.65 / 0.12 / 0.50).
MIN_UPPER_LAYERS = 12


def upper_half_only(layers: str, started: bool, depth: int) -> bool:
    """Whether the student adapts only the upper half of a target of ``depth`` layers: for ``layers="upper"``,
    and for ``auto`` when the student does not start from a port or merge (``started`` false) and the target
    has at least :data:`MIN_UPPER_LAYERS` layers (a start port's lower layers would otherwise be dropped)."""
    return layers == "upper" or (layers == "auto" and not started and depth >= MIN_UPPER_LAYERS)


def student_layers(pairings: Sequence[Any], layers: str, started: bool) -> list[str]:
    """The target modules the student adapts: every module the ``pairings`` map an adapter to, only those of
    the upper half of the target's layers where :func:`upper_half_only` says so (the backward pass then
    stops there)."""
    names: list[str] = []
    for pairing in pairings:
        lowest = pairing.layers_t // 2 if upper_half_only(layers, started, pairing.layers_t) else 0
        for unit in pairing.units:
            if unit.target.module not in names and unit.target.layer >= lowest:
                names.append(unit.target.module)
    return names


def build_student(
    model: Any,
    modules: Sequence[str],
    rank: int,
    alpha: float,
    use_rslora: bool,
    init: dict[str, LoraModule],
    seed: int,
    fan_in_fan_out: bool = False,
) -> tuple[Any, dict[str, str]]:
    """Wrap ``model`` in a PEFT LoRA of ``rank`` on ``modules``, set to the start port ``init`` where it has one.

    A start module of lower rank fills the first rows / columns (the rest: PEFT's random ``A``,
    zero ``B``: no change); one of higher rank is cut to ``rank`` by its SVD. Returns the model
    and notes per module (e.g. what was cut).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # PEFT's initialisation of A
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(modules),
        lora_dropout=0.0,
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        student = get_peft_model(model, config)
    return student, set_factors(student, init, rank, lora_scale(alpha, rank, use_rslora))


def set_factors(student: Any, modules: dict[str, LoraModule], rank: int, scale: float) -> dict[str, str]:
    """Set the student's LoRA to ``modules`` (every other module's update to zero); notes per module.

    A module of lower rank fills the first rows / columns (the rest of ``A`` as it was, ``B``
    zero: no change); one of higher rank is cut to ``rank`` by its SVD.
    """
    notes: dict[str, str] = {}
    layers = lora_layers(student)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.zero_()
    for name, start in modules.items():
        layer = layers.get(name)
        if layer is None:
            continue
        A_w, B_w = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        factors = balanced_factors(
            (start.B.double() * math.sqrt(start.scale / scale)), start.A.double() * math.sqrt(start.scale / scale)
        )
        B0, A0 = factors.B, factors.A
        if B0.shape[1] > rank:
            cut = balanced_factors(B0, A0, max_rank=rank)
            notes[name] = f"start port of rank {B0.shape[1]} cut to {rank}"
            B0, A0 = cut.B, cut.A
        r0 = B0.shape[1]
        with torch.no_grad():
            A_w[:r0] = A0.to(A_w)
            B_w[:, :r0] = B0.to(B_w)
    return notes


def lora_layers(student: Any) -> dict[str, Any]:
    """The student's LoRA layers by module name (as the adapter names them)."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in student.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


def lora_parameters(student: Any) -> dict[str, torch.Tensor]:
    """The trainable factors by stable name (``<module>.A`` / ``<module>.B``)."""
    params: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(student).items():
        params[f"{name}.A"] = layer.lora_A["default"].weight
        params[f"{name}.B"] = layer.lora_B["default"].weight
    return params


def student_modules(student: Any, alpha: float, use_rslora: bool) -> dict[str, LoraModule]:
    """The student's LoRA as :class:`~loraport.adapters.LoraModule` s (float32 copies)."""
    return {
        name: LoraModule(
            name,
            layer.lora_A["default"].weight.detach().float().cpu().clone(),
            layer.lora_B["default"].weight.detach().float().cpu().clone(),
            alpha,
            use_rslora,
        )
        for name, layer in lora_layers(student).items()
    }


# -- loss and agreement -------------------------------------------------------------------------


@dataclass
class BatchStats:
    """Sums over a batch: ``seq_nll`` over ``seq_tokens``, ``kl`` over ``kl_positions``, greedy ``agreed``."""

    seq_nll: float = 0.0
    seq_tokens: int = 0
    kl: float = 0.0
    kl_positions: int = 0
    agreed: int = 0

    def add(self, other: BatchStats) -> None:
        self.seq_nll += other.seq_nll
        self.seq_tokens += other.seq_tokens
        self.kl += other.kl
        self.kl_positions += other.kl_positions
        self.agreed += other.agreed

    @property
    def agreement(self) -> float:
        return self.agreed / self.seq_tokens if self.seq_tokens else 0.0

    @property
    def mean_kl(self) -> float:
        return self.kl / self.kl_positions if self.kl_positions else 0.0

    @property
    def agreement_stderr(self) -> float:
        a, n = self.agreement, self.seq_tokens
        return math.sqrt(max(a * (1 - a), 1e-12) / n) if n else 0.0


def sparse_kl(student_logprobs: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per position over the teacher's top ``K`` plus one tail bucket.

    Args:
        student_logprobs: ``(P, S)`` log-probabilities over the support.
        top_ids / top_logprobs: ``(P, K)`` the teacher's top support indices and log-probabilities.
    Returns:
        ``(P,)``.
    """
    p = top_logprobs.exp()
    q_log = student_logprobs.gather(1, top_ids)
    head = torch.sum(p * (top_logprobs - q_log), dim=1)
    p_tail = (1 - p.sum(1)).clamp(min=0)
    q_tail = (1 - q_log.exp().sum(1)).clamp(min=1e-12)
    tail = torch.where(p_tail > 1e-9, p_tail * (torch.log(p_tail.clamp(min=1e-12)) - torch.log(q_tail)), 0.0)
    return head + tail


def _left_pad(samples: Sequence[StudentSample], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, width - len(s.ids) :] = torch.tensor(s.ids, dtype=torch.long)
        mask[i, width - len(s.ids) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def batch_loss(
    student: Any,
    samples: Sequence[StudentSample],
    pad: int,
    support: torch.Tensor | None,
    weights: tuple[float, float],
    device: torch.device,
    autocast: torch.dtype | None = None,
    totals: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, BatchStats]:
    """The weighted loss ``w_seq * mean NLL + w_kl * mean KL`` of a batch, and its :class:`BatchStats`.

    ``totals``: the (continuation tokens, KL positions) of the whole batch this is a part of: the
    sums are divided by those, so the parts' losses add up to the whole batch's.

    The batch is left-padded; the output head is applied at the target positions only, over the
    whole vocabulary where the continuation's likelihood is taken and over the support where the
    KL is (a large vocabulary's head costs more than the rest of a small model: 262k rows on
    Gemma-3-270M, of which two tokenizers share about a tenth). ``support``: the head's rows of
    the shared vocabulary (:func:`head_rows`), ``None`` for the whole vocabulary.
    """
    ids, mask, positions = _left_pad(samples, pad, device)
    width = ids.shape[1]
    lm = base_model(student)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        hidden = final_hidden(student, ids, mask, positions)
    flat = hidden.float().reshape(-1, hidden.shape[-1])
    stats = BatchStats()

    def where(attribute: str) -> torch.Tensor:
        return torch.cat([
            getattr(s, attribute) + row * width + width - len(s.ids) for row, s in enumerate(samples)
        ]).to(device)  # fmt: skip

    loss = flat.new_zeros(())
    w_seq, w_kl = weights
    seq_index = where("seq_positions")
    if seq_index.numel():
        targets = torch.cat([s.seq_ids for s in samples]).to(device)

        def seq_piece(rows: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = head_logits(lm, rows)
            nll = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
            return nll, logits.detach().argmax(-1) == wanted

        nll, agreed = by_pieces(seq_piece, flat[seq_index], targets)
        stats.agreed = int(agreed.sum())
        stats.seq_tokens = int(targets.numel())
        stats.seq_nll = float(nll.detach().sum())
        if w_seq > 0:
            loss = loss + w_seq * (nll.mean() if totals is None else nll.sum() / totals[0])
    kl_index = where("kl_positions")
    if kl_index.numel():
        top_ids = torch.cat([s.kl_ids for s in samples]).to(device)
        top_logprobs = torch.cat([s.kl_logprobs for s in samples]).to(device)

        kl = kl_in_pieces(lm, flat[kl_index], top_ids, top_logprobs, support)
        stats.kl = float(kl.detach().sum())
        stats.kl_positions = int(kl.numel())
        if w_kl > 0:
            loss = loss + w_kl * (kl.mean() if totals is None else kl.sum() / totals[1])
    return loss, stats


@torch.no_grad()
def evaluate_samples(
    student: Any,
    samples: Sequence[StudentSample],
    pad: int,
    support: torch.Tensor | None,
    device: torch.device,
    batch_size: int = 16,
    autocast: torch.dtype | None = None,
) -> BatchStats:
    """Agreement (the teacher's continuation tokens the student predicts greedily) and mean KL, summed."""
    total = BatchStats()
    for start in range(0, len(samples), batch_size):
        _, stats = batch_loss(student, samples[start : start + batch_size], pad, support, (0.0, 0.0), device, autocast)
        total.add(stats)
    return total


@dataclass
class KeepSample:
    """A line of generic text and the target base's own top-``K`` next-token distributions on it."""

    ids: list[int]
    top_ids: torch.Tensor  # (L - 1, K) vocabulary ids
    top_logprobs: torch.Tensor  # (L - 1, K)


@torch.no_grad()
def keep_samples(
    student: Any,
    rows: Sequence[Sequence[int]],
    pad: int,
    top_k: int,
    device: torch.device,
    support: torch.Tensor | None = None,
) -> list[KeepSample]:
    """The target base's predictions (the student with its LoRA switched off) on generic token rows, over the
    support (``support``: its head rows, :func:`head_rows`; ``None``: the whole vocabulary)."""
    lm = base_model(student)
    out = []
    with student.disable_adapter():
        for start in range(0, len(rows), 8):
            chunk = [list(r) for r in rows[start : start + 8]]
            ids, mask = right_pad(chunk, pad, device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            hidden = final_hidden(student, ids, mask, positions)
            for i, row in enumerate(chunk):
                logits = head_logits(lm, hidden[i, : len(row) - 1].float(), support)
                top = torch.topk(torch.log_softmax(logits, dim=-1), min(top_k, logits.shape[-1]), dim=-1)
                out.append(KeepSample(row, top.indices.cpu(), top.values.cpu()))
    return out


def keep_loss(
    student: Any,
    samples: Sequence[KeepSample],
    pad: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
    support: torch.Tensor | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """Mean KL from the target base's own predictions to the student's on generic text (over the support);
    with ``total`` the sum divided by that many positions (of the lines this is a part of)."""
    ids, mask = right_pad([s.ids for s in samples], pad, device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        hidden = final_hidden(student, ids, mask, positions)
    rows = torch.cat([hidden[i, : len(s.ids) - 1] for i, s in enumerate(samples)]).float()
    top_ids = torch.cat([s.top_ids for s in samples]).to(device)
    top_logprobs = torch.cat([s.top_logprobs for s in samples]).to(device)
    kl = kl_in_pieces(base_model(student), rows, top_ids, top_logprobs, support)
    return kl.mean() if total is None else kl.sum() / total


def kl_in_pieces(
    lm: Any, rows: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, support: torch.Tensor | None
) -> torch.Tensor:
    """Per-position KL from the top-``K`` targets to the head's distribution (over ``support``) on hidden
    ``rows``, the head applied a few positions at a time (:func:`~.heads.by_pieces`)."""

    def piece(hidden: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor]:
        return (sparse_kl(torch.log_softmax(head_logits(lm, hidden, support), dim=-1), ids, logprobs),)

    return by_pieces(piece, rows, top_ids, top_logprobs)[0]


__all__ = [
    "BatchStats",
    "KeepSample",
    "StudentSample",
    "StudentView",
    "base_model",
    "batch_loss",
    "build_student",
    "evaluate_samples",
    "final_hidden",
    "head_logits",
    "head_rows",
    "keep_loss",
    "keep_samples",
    "lora_layers",
    "lora_parameters",
    "set_factors",
    "sparse_kl",
    "student_layers",
    "student_modules",
    "student_samples",
    "upper_half_only",
]
