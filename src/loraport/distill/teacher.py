"""The teacher: the source base with the adapter, run once; its continuations and next-token distributions.

For every prompt the teacher writes a greedy continuation (cut at the first newline) and then
scores ``prompt + continuation``: at each *loss position* (``answer``: from the prompt's last
token on; ``all``: every position) it keeps the ``top_k`` probabilities of its next-token
distribution over the *support* (the whole vocabulary when the student shares the tokenizer,
else the tokens both vocabularies spell the same way, renormalised over them) and the
character where each of its tokens ends, so that the student's positions can be aligned by
character. The outputs are written to disk (:class:`TeacherOutputs`), and the teacher is freed
before the student is loaded.
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
from .prompts import candidate_from, few_shot_text, prompt_template

OUTPUTS = "teacher.safetensors"
META = "teacher.json"
FORMAT = 1


@dataclass
class TeacherOutputs:
    """What the student learns from, one entry per text (``prompt + continuation``).

    Attributes:
        prompts / continuations: the texts; ``prompt_chars[i] = len(prompts[i])``.
        ends: per text, ``(L,)`` int: the character where each teacher token ends (-1: special).
        positions: per text, ``(P,)`` int: the teacher positions with a target.
        top_ids: per text, ``(P, K)`` int: support indices of the top ``K`` next tokens.
        top_logprobs: per text, ``(P, K)`` float: their log-probabilities (renormalised over the support).
        support: ``full`` (the student's vocabulary is the teacher's) or ``shared`` (indices into
            the shared vocabulary's list).
        effect: per text, the KL from the source base to the teacher at the prompt's end (how much
            the adapter changes the answer), when measured.
    """

    prompts: list[str]
    continuations: list[str]
    ends: list[torch.Tensor]
    positions: list[torch.Tensor]
    top_ids: list[torch.Tensor]
    top_logprobs: list[torch.Tensor]
    support: str
    effect: list[float] = field(default_factory=list)

    @property
    def prompt_chars(self) -> list[int]:
        return [len(p) for p in self.prompts]

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
            save_file(tensors, str(tmp / OUTPUTS))
            meta = {
                "format": FORMAT,
                "key": key,
                "prompts": self.prompts,
                "continuations": self.continuations,
                "support": self.support,
                "effect": self.effect,
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
        return cls(
            meta["prompts"],
            meta["continuations"],
            [tensors[f"{i}.ends"].long() for i in range(n)],
            [tensors[f"{i}.positions"].long() for i in range(n)],
            [tensors[f"{i}.top_ids"].long() for i in range(n)],
            [tensors[f"{i}.top_logprobs"] for i in range(n)],
            meta["support"],
            list(meta.get("effect", [])),
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


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def _left_padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 16,
    sample: bool = False,
    seed: int = 0,
    stop_at_newline: bool = True,
) -> list[str]:
    """The model's continuation of each text (greedy, or sampled at temperature 1 with a seeded generator)."""
    pad = _pad_id(tokenizer)
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        ids, mask = _left_padded([tokenizer(t)["input_ids"] for t in chunk], pad, device)
        if sample:
            torch.manual_seed(seed + start)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=1.0 if sample else None,
            top_p=0.95 if sample else None,
            top_k=None,
            pad_token_id=pad,
        )
        for row, prompt_row, row_mask in zip(generated[:, ids.shape[1] :], ids, mask, strict=True):
            text = _continuation_text(tokenizer, prompt_row[row_mask.bool()].tolist(), row.tolist())
            out.append(text.split("\n", 1)[0] if stop_at_newline else text)
    return out


def _continuation_text(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add after the prompt: decoded in context (a sentencepiece or word-level
    tokenizer drops the leading space of tokens decoded alone)."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def text_ends(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (default special tokens, as the evaluator encodes) and each token's end (-1: special)."""
    ids, ends = token_ends(tokenizer, text)
    return ids, [-1 if end is None else end for end in ends]


def loss_positions(ends: Sequence[int], prompt_chars: int, mode: str) -> list[int]:
    """Positions whose next-token distribution is a target: from the prompt's last token on (``answer``) or all."""
    last = len(ends) - 1
    if mode == "all":
        return [i for i, end in enumerate(ends) if end >= 0]
    return [i for i, end in enumerate(ends) if end >= prompt_chars or (end >= 0 and i == last)]


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
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[float]]:
    """``(ends, positions, top_ids, top_logprobs, effect)`` of each ``prompt + continuation`` (see
    :class:`TeacherOutputs`). ``support``: teacher ids of the shared vocabulary (``None``: all).
    ``measure_effect``: also the KL from the adapter-less model at each prompt's end (needs a PEFT model)."""
    pad = _pad_id(tokenizer)
    encoded = [text_ends(tokenizer, p + c) for p, c in zip(prompts, continuations, strict=True)]
    all_ends, all_pos, all_ids, all_lp, effect = [], [], [], [], []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = _left_padded([e[0] for e in chunk], pad, device)
        positions_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_ids).logits.float()
        base_logits = None
        if measure_effect:
            with model.disable_adapter():
                base_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_ids).logits.float()
        width = ids.shape[1]
        for row, (token_ids, ends) in enumerate(chunk):
            offset = width - len(token_ids)
            prompt_chars = len(prompts[start + row])
            chosen = loss_positions(ends, prompt_chars, positions_mode)
            rows = logits[row, [offset + i for i in chosen]]
            if support is not None:
                rows = rows[:, support.to(rows.device)]
            logprobs = torch.log_softmax(rows, dim=-1)
            k = min(top_k, logprobs.shape[-1])
            top = torch.topk(logprobs, k, dim=-1)
            all_ends.append(torch.tensor(ends, dtype=torch.long))
            all_pos.append(torch.tensor(chosen, dtype=torch.long))
            all_ids.append(top.indices.cpu())
            all_lp.append(top.values.cpu())
            if base_logits is not None:
                at = offset + _prompt_end(ends, prompt_chars)
                p = torch.log_softmax(logits[row, at], dim=-1)
                q = torch.log_softmax(base_logits[row, at], dim=-1)
                effect.append(float(torch.sum(p.exp() * (p - q))))
    return all_ends, all_pos, all_ids, all_lp, effect


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
            stop_at_newline=False,
        )  # fmt: skip
        for text in texts:
            candidate = candidate_from(prefix + text, prefix, suffix, 2 * longest + 40)
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
    "TeacherOutputs",
    "adapter_digest",
    "cache_key",
    "checkpoint_digest",
    "generate",
    "load_teacher",
    "loss_positions",
    "require_tokenizer",
    "score_texts",
    "synthesize_prompts",
    "text_ends",
]
