"""The teacher: the source base with the adapter, run once; its continuations and next-token distributions.

For every prompt (rendered through the source's chat template for conversations, verbatim
otherwise) the teacher writes its continuation to its natural end: an end token (EOS, or
the chat template's end of turn), a stop string (multiple-choice prompts stop at the first
newline), or the token cap; optionally ``K`` sampled continuations too. It then scores
``prompt + continuation``: at each *loss position* (``answer``: from the prompt's last token
on; ``all``: every position) it keeps the ``top_k`` probabilities of its next-token
distribution over the *support* (the whole vocabulary when the student shares the tokenizer,
else the tokens both vocabularies spell the same way, renormalised over them), the character
where each of its tokens ends (so that the student's positions can be aligned by character)
and, when asked, how much the adapter raises the log-probability of each next token over
the source base (token selection). The outputs are written to disk (:class:`TeacherOutputs`),
and the teacher is freed before the student is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..adapters import LoraAdapter, LoraModule, attach_adapter
from ..alignment import token_ends
from ..checkpoints import Checkpoint
from ..errors import TransferError
from ..generation import Generated, generate, left_padded, pad_id
from .heads import base_model, final_hidden, head_logits, head_rows
from .prompts import candidate_from, few_shot_text, prompt_template

OUTPUTS = "teacher.safetensors"
META = "teacher.json"
FORMAT = 2
PER_TEXT = ("ends", "positions", "top_ids", "top_logprobs")


@dataclass
class TeacherOutputs:
    """What the student learns from, one entry per text (``prompt + continuation``).

    Attributes:
        prompts / continuations: the texts; ``prompts`` as the teacher read them (rendered
            through its chat template for conversations).
        ends: per text, ``(L,)`` int: the character where each teacher token ends (-1: special).
        positions: per text, ``(P,)`` int: the teacher positions with a target.
        top_ids: per text, ``(P, K)`` int: support indices of the top ``K`` next tokens.
        top_logprobs: per text, ``(P, K)`` float: their log-probabilities (renormalised over the support).
        support: ``full`` (the student's vocabulary is the teacher's) or ``shared`` (indices into
            the shared vocabulary's list).
        effect: per text, the KL from the source base to the teacher at the prompt's end (how much
            the adapter changes the answer), when measured.
        sources: per text, the index of its prompt in ``items``.
        items: the distinct prompts (a plain prompt, or a conversation as JSON): the student renders
            them its own way.
        ended: per text, why the continuation ended: ``end`` (an end token: the student learns to end
            there too), ``stop`` (a stop string) or ``length`` (the token cap).
        greedy: per text, whether it is the greedy continuation (``False``: a sample).
        token_effect: per text, ``(P,)``: at each loss position, ``log p_teacher - log p_base`` of the
            token that follows (token selection), when measured.
        info: the teacher's settings and measurements (chat template, end tokens, generic text).
    """

    prompts: list[str]
    continuations: list[str]
    ends: list[torch.Tensor]
    positions: list[torch.Tensor]
    top_ids: list[torch.Tensor]
    top_logprobs: list[torch.Tensor]
    support: str
    effect: list[float] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    token_effect: list[torch.Tensor] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if not self.sources:
            self.sources = list(range(n))
        if not self.items:
            self.items = list(self.prompts)
        if not self.ended:
            self.ended = ["length"] * n
        if not self.greedy:
            self.greedy = [True] * n

    @property
    def prompt_chars(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def select(self, keep: Sequence[int]) -> TeacherOutputs:
        """The outputs of texts ``keep`` only (in that order)."""
        pick = list(keep)

        def sub(values: list[Any]) -> list[Any]:
            return [values[i] for i in pick] if values else []

        return TeacherOutputs(
            sub(self.prompts), sub(self.continuations), sub(self.ends), sub(self.positions), sub(self.top_ids),
            sub(self.top_logprobs), self.support, sub(self.effect), sub(self.sources), list(self.items),
            sub(self.ended), sub(self.greedy), sub(self.token_effect), dict(self.info),
        )  # fmt: skip

    def save(self, directory: Path, key: dict[str, Any]) -> None:
        """Write atomically into ``directory`` (tensors as safetensors, texts and ``key`` as JSON)."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            tensors: dict[str, torch.Tensor] = {}
            for i in range(len(self.prompts)):
                tensors[f"{i}.ends"] = self.ends[i].to(torch.int32).contiguous()
                tensors[f"{i}.positions"] = self.positions[i].to(torch.int32).contiguous()
                tensors[f"{i}.top_ids"] = self.top_ids[i].to(torch.int32).contiguous()
                tensors[f"{i}.top_logprobs"] = self.top_logprobs[i].float().contiguous()
                if self.token_effect:
                    tensors[f"{i}.token_effect"] = self.token_effect[i].float().contiguous()
            save_file(tensors, str(tmp / OUTPUTS))
            meta = {
                "format": FORMAT,
                "key": key,
                "prompts": self.prompts,
                "continuations": self.continuations,
                "support": self.support,
                "effect": self.effect,
                "sources": self.sources,
                "items": self.items,
                "ended": self.ended,
                "greedy": self.greedy,
                "info": self.info,
            }
            (tmp / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: Path, key: dict[str, Any]) -> TeacherOutputs | None:
        """The outputs cached in ``directory`` for ``key``, or ``None`` (absent, other key, unreadable)."""
        try:
            meta = json.loads((directory / META).read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT or meta.get("key") != key:
                return None
            tensors = load_file(str(directory / OUTPUTS))
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        n = len(meta["prompts"])
        measured = n > 0 and "0.token_effect" in tensors
        return cls(
            meta["prompts"],
            meta["continuations"],
            [tensors[f"{i}.ends"].long() for i in range(n)],
            [tensors[f"{i}.positions"].long() for i in range(n)],
            [tensors[f"{i}.top_ids"].long() for i in range(n)],
            [tensors[f"{i}.top_logprobs"] for i in range(n)],
            meta["support"],
            list(meta.get("effect", [])),
            list(meta["sources"]),
            list(meta["items"]),
            list(meta["ended"]),
            list(meta["greedy"]),
            [tensors[f"{i}.token_effect"] for i in range(n)] if measured else [],
            dict(meta.get("info", {})),
        )


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable digest of a JSON-able description of the inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def adapter_digest(modules: Mapping[str, LoraModule]) -> str:
    """A digest of an adapter's factors and scales (an in-memory adapter has no file to stamp)."""
    hasher = hashlib.sha256()
    for name, module in modules.items():
        hasher.update(f"{name}|{module.alpha}|{module.use_rslora}|{tuple(module.A.shape)}".encode())
        hasher.update(module.A.float().contiguous().numpy().tobytes())
        hasher.update(module.B.float().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:20]


def checkpoint_digest(ckpt: Checkpoint) -> str:
    """A digest of the checkpoint's tensor fingerprints (paths, sizes, times) and config."""
    hasher = hashlib.sha256(json.dumps(ckpt.config, sort_keys=True, default=str).encode())
    for key in sorted(ckpt.keys()):
        hasher.update(ckpt.fingerprint(key).encode())
    return hasher.hexdigest()[:20]


# -- running the teacher ----------------------------------------------------------------------


def load_teacher(src: Checkpoint, adapter: LoraAdapter, device: torch.device, dtype: torch.dtype) -> Any:
    """The source base with ``adapter`` attached by PEFT (so it can be switched off), in eval mode."""
    return attach_adapter(src.load_causal_lm(dtype), adapter).to(device).eval()


def distinct_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    greedy: Sequence[Generated],
    count: int,
    max_new_tokens: int,
    device: torch.device,
    seed: int,
    temperature: float,
    rounds: int = 4,
    **generation: Any,
) -> list[list[Generated]]:
    """Up to ``count`` sampled continuations per prompt, distinct from each other and from the greedy one.

    Each round samples once more for the prompts still short of ``count`` (seeded by the round).
    """
    found: list[list[Generated]] = [[] for _ in prompts]
    seen = [{g.text} for g in greedy]
    for round_index in range(rounds * count):
        short = [i for i in range(len(prompts)) if len(found[i]) < count]
        if not short:
            break
        outs = generate(
            model, tokenizer, [prompts[i] for i in short], max_new_tokens, device, sample=True,
            temperature=temperature, top_p=0.95, seed=seed * 7919 + round_index, **generation,
        )  # fmt: skip
        for i, out in zip(short, outs, strict=True):
            if out.text not in seen[i]:
                seen[i].add(out.text)
                found[i].append(out)
    return found


def text_ends(tokenizer: Any, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (default special tokens, as the evaluator encodes; none for chat-rendered
    text) and each token's end (-1: special)."""
    ids, ends = token_ends(tokenizer, text, add_special_tokens=add_special_tokens)
    return ids, [-1 if end is None else end for end in ends]


def loss_positions(ends: Sequence[int], prompt_chars: int, mode: str) -> list[int]:
    """Positions whose next-token distribution is a target: from the prompt's last token on (``answer``) or all."""
    last = len(ends) - 1
    if mode == "all":
        return [i for i, end in enumerate(ends) if end >= 0]
    return [i for i, end in enumerate(ends) if end >= prompt_chars or (end >= 0 and i == last)]


@dataclass
class Scored:
    """:func:`score_texts` per text: ``ends``, ``positions``, ``top_ids``, ``top_logprobs`` (see
    :class:`TeacherOutputs`), the prompt-end ``effect`` and the per-position ``token_effect`` (when measured)."""

    ends: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    top_ids: list[torch.Tensor] = field(default_factory=list)
    top_logprobs: list[torch.Tensor] = field(default_factory=list)
    effect: list[float] = field(default_factory=list)
    token_effect: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def score_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    support: torch.Tensor | None,
    positions_mode: str,
    top_k: int,
    device: torch.device,
    batch_size: int = 8,
    measure_effect: bool = False,
    *,
    add_special_tokens: bool = True,
    measure_tokens: bool = False,
    end_tokens: Sequence[int | None] | None = None,
) -> Scored:
    """The teacher's targets on each ``prompt + continuation`` (see :class:`TeacherOutputs`).

    ``support``: teacher ids of the shared vocabulary (``None``: all). ``measure_effect``: also the
    KL from the adapter-less model at each prompt's end; ``measure_tokens``: at each loss position
    ``log p_teacher - log p_base`` of the next token (``end_tokens[i]`` after the last one: the end
    token the teacher wrote, or ``None``). Both need a PEFT model (its adapter is switched off).
    """
    pad = pad_id(tokenizer)
    encoded = [text_ends(tokenizer, p + c, add_special_tokens) for p, c in zip(prompts, continuations, strict=True)]
    lm = base_model(model)
    rows_of_support = None if support is None else head_rows(lm, support)
    out = Scored()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = left_padded([e[0] for e in chunk], pad, device)
        positions_ids = (mask.cumsum(1) - 1).clamp(min=0)
        # The head only where a target is taken: a 262k-row head over every position of a batch costs more
        # than the rest of a small model (and hundreds of MB of logits).
        hidden = final_hidden(model, ids, mask, positions_ids)
        base_hidden = None
        if measure_effect or measure_tokens:
            with model.disable_adapter():
                base_hidden = final_hidden(model, ids, mask, positions_ids)
        width = ids.shape[1]
        for row, (token_ids, ends) in enumerate(chunk):
            index = start + row
            offset = width - len(token_ids)
            prompt_chars = len(prompts[index])
            chosen = loss_positions(ends, prompt_chars, positions_mode)
            at = [offset + i for i in chosen]
            logprobs = torch.log_softmax(head_logits(lm, hidden[row, at].float(), rows_of_support), dim=-1)
            k = min(top_k, logprobs.shape[-1])
            top = torch.topk(logprobs, k, dim=-1)
            out.ends.append(torch.tensor(ends, dtype=torch.long))
            out.positions.append(torch.tensor(chosen, dtype=torch.long))
            out.top_ids.append(top.indices.cpu())
            out.top_logprobs.append(top.values.cpu())
            if base_hidden is not None and measure_effect:
                end_at = offset + _prompt_end(ends, prompt_chars)
                p = torch.log_softmax(head_logits(lm, hidden[row, end_at][None].float())[0], dim=-1)
                q = torch.log_softmax(head_logits(lm, base_hidden[row, end_at][None].float())[0], dim=-1)
                out.effect.append(float(torch.sum(p.exp() * (p - q))))
            if base_hidden is not None and measure_tokens:
                end = end_tokens[index] if end_tokens is not None else None
                teacher_lp = torch.log_softmax(head_logits(lm, hidden[row, at].float()), dim=-1)
                base_lp = torch.log_softmax(head_logits(lm, base_hidden[row, at].float()), dim=-1)
                out.token_effect.append(_token_effect(teacher_lp, base_lp, token_ids, chosen, end))
    return out


def _token_effect(
    teacher: torch.Tensor, base: torch.Tensor, token_ids: Sequence[int], chosen: Sequence[int], end: int | None
) -> torch.Tensor:
    """At each chosen position (row ``i`` of the ``(P, V)`` log-probabilities), ``log p_teacher - log p_base``
    of the token that follows (0 where none does)."""
    values = []
    for i, pos in enumerate(chosen):
        nxt = token_ids[pos + 1] if pos + 1 < len(token_ids) else end
        values.append(0.0 if nxt is None else float(teacher[i, nxt] - base[i, nxt]))
    return torch.tensor(values, dtype=torch.float32)


def _prompt_end(ends: Sequence[int], prompt_chars: int) -> int:
    """The position of the prompt's last token (the last token ending at or before the prompt's end)."""
    inside = [i for i, end in enumerate(ends) if 0 <= end <= prompt_chars]
    return inside[-1] if inside else 0


def synthesize_prompts(
    model: Any,
    tokenizer: Any,
    seeds: Sequence[str],
    count: int,
    device: torch.device,
    seed: int = 0,
    shots: int = 5,
    max_rounds: int = 8,
) -> tuple[list[str], dict[str, int]]:
    """Up to ``count`` new prompts the teacher writes in the style of ``seeds``, and counts of what was rejected.

    Each request shows the teacher ``shots`` seed prompts (a seeded sample, in random order),
    each followed by a blank line, and samples its continuation; the first paragraph becomes a
    candidate when it has the seeds' shared shape (:func:`~loraport.distill.prompts.prompt_template`)
    and is neither a seed nor already found.
    """
    prefix, suffix = prompt_template(seeds)
    longest = max(len(s) for s in seeds)
    max_tokens = max(len(tokenizer(s)["input_ids"]) for s in seeds) + 8
    rng = random.Random(seed)
    known = set(seeds)
    found: list[str] = []
    rejected = {"shape": 0, "duplicate": 0}
    for round_index in range(max_rounds):
        wanted = count - len(found)
        if wanted <= 0:
            break
        requests = []
        for _ in range(max(8, int(wanted * 1.5))):
            shown = rng.sample(list(seeds), min(shots, len(seeds)))
            requests.append(few_shot_text(shown) + prefix)
        texts = generate(
            model, tokenizer, requests, max_tokens, device, sample=True, seed=seed * 1000 + round_index * 100,
            top_p=0.95,
        )  # fmt: skip
        for text in texts:
            candidate = candidate_from(prefix + text.text, prefix, suffix, 2 * longest + 40)
            if candidate is None:
                rejected["shape"] += 1
            elif candidate in known:
                rejected["duplicate"] += 1
            else:
                known.add(candidate)
                found.append(candidate)
    return found[:count], rejected


def require_tokenizer(ckpt: Checkpoint, role: str) -> Any:
    """The base's fast tokenizer (distillation aligns by character offsets)."""
    tokenizer = ckpt.load_tokenizer()
    if not getattr(tokenizer, "is_fast", True):
        raise TransferError(f"distill: the {role} base {ckpt.name} has no fast tokenizer (character offsets needed)")
    return tokenizer


__all__ = [
    "Scored",
    "TeacherOutputs",
    "adapter_digest",
    "cache_key",
    "checkpoint_digest",
    "distinct_samples",
    "load_teacher",
    "loss_positions",
    "require_tokenizer",
    "score_texts",
    "synthesize_prompts",
    "text_ends",
]
