"""The teacher's pass, once per set of inputs: prompts read, continuations written, targets scored, cached.

:func:`run_teacher` loads the source base with the adapter, writes (optionally) synthetic
prompts, each prompt's greedy continuation to its natural end (and ``K`` sampled ones),
scores every ``prompt + continuation`` into the student's targets, measures the adapter's own
effect on generic text (its source's perplexity change, which the port's change is compared
with), and caches all of it on disk under a key of everything that decides it. The teacher is
freed before it returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters import LoraAdapter
from ..alignment import shared_vocabulary
from ..calibrate.text import same_vocabulary
from ..checkpoints import Checkpoint
from ..errors import TransferError
from ..generation import Generated, generate
from ..pairing import Pairing
from ..report import peak_rss_mb
from .generic import perplexity_change_stderr, pooled_nll, row_nlls, token_rows
from .options import DistillOptions
from .prompts import PromptSet
from .teacher import (
    TeacherOutputs,
    adapter_digest,
    checkpoint_digest,
    distinct_samples,
    load_teacher,
    score_texts,
    synthesize_prompts,
)
from .timing import release_memory
from .views import TeacherView

GENERIC_TOKENS = 48
MIN_SHARED_SHARE = 0.05  # of the smaller vocabulary: fewer shared tokens cannot compare two distributions


def _vocab_rows(config: dict[str, Any]) -> int | None:
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(value) if value else None


def support_ids(
    pairing: Pairing, tokenizer_s: Any, tokenizer_t: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """``(source ids, target ids, description)`` of the support the two distributions are compared over:
    ``None`` for the whole vocabulary (one tokenizer), else the tokens both vocabularies spell alike."""
    if same_vocabulary(tokenizer_s, tokenizer_t):
        return None, None, "the whole vocabulary (same tokenizer)"
    ids_s, ids_t = shared_vocabulary(
        tokenizer_s, tokenizer_t, _vocab_rows(pairing.src.config), _vocab_rows(pairing.tgt.config)
    )
    smaller = min(len(tokenizer_s.get_vocab()), len(tokenizer_t.get_vocab()))
    if len(ids_s) < MIN_SHARED_SHARE * smaller:
        raise TransferError(
            f"distill: the two tokenizers spell only {len(ids_s)} tokens the same way (need "
            f"{MIN_SHARED_SHARE:.0%} of the smaller vocabulary, {smaller}); their next-token distributions cannot "
            "be compared"
        )
    return ids_s, ids_t, f"{len(ids_s)} tokens both vocabularies spell the same way"


def kl_positions(option: str, support_s: torch.Tensor | None) -> str:
    """Where the KL is taken; ``auto``: every position with one tokenizer, the answer's across tokenizers.

    Measured (benchmarks/results/distill_zoo.md, real.md): with one tokenizer (the zoo) the KL at
    all positions beat the answer's in 11 of 12 target x task x seed cells (mean gain recovery
    0.74 vs 0.55); from SmolLM2 to Gemma-3 (bins) it scored 0.838 vs 0.875 (within noise) and
    cost the target's generic perplexity +46 % vs +25 %.
    """
    if option == "auto":
        return "all" if support_s is None else "answer"
    return option


def digest(items: Sequence[str]) -> str:
    """A short digest of a list of strings (cache keys)."""
    return hashlib.sha256("\x1e".join(items).encode()).hexdigest()[:20]


def teacher_key(
    src: Checkpoint,
    adapter: LoraAdapter,
    given: PromptSet,
    options: DistillOptions,
    view: TeacherView,
    positions: str,
    support: torch.Tensor | None,
    generic_lines: Sequence[str],
) -> dict[str, Any]:
    """Everything that decides the teacher's outputs."""
    return {
        "source": checkpoint_digest(src),
        "adapter": adapter_digest(adapter.modules),
        "prompts": digest(given.prompts),
        "kind": given.kind,
        "synthesize": options.synthesize,
        "synth_filter": options.synth_filter if options.synthesize else None,
        "synth_writer": options.synth_writer if options.synthesize else None,
        "seed": options.seed,
        "max_new_tokens": view.max_new_tokens,
        "stops": view.stops,
        "chat": view.template.digest if view.template is not None else None,
        "samples": [options.samples, options.temperature] if options.samples else None,
        "token_effect": options.tokens == "effect",
        "top_k": options.top_k,
        "positions": positions,
        "support": None if support is None else digest([str(i) for i in support.tolist()]),
        "generic": digest(list(generic_lines)),
    }


def run_teacher(
    src: Checkpoint,
    adapter: LoraAdapter,
    given: PromptSet,
    options: DistillOptions,
    view: TeacherView,
    tokenizer: Any,
    positions: str,
    support: torch.Tensor | None,
    generic_lines: Sequence[str],
    directory: Path,
    key: dict[str, Any],
    device: torch.device,
    progress: bool,
    phase: Callable[[str], Any],
) -> tuple[TeacherOutputs, dict[str, Any]]:
    """The teacher's outputs for ``given`` (from the cache in ``directory`` when ``key`` matches) and what
    the report says of them. ``phase(name)`` is a context manager that times a step."""
    cached = TeacherOutputs.load(directory, key)
    if cached is not None:
        return cached, {"cached": str(directory), "texts": len(cached.prompts), **_summary(cached)}
    started = time.perf_counter()
    with phase("teacher: load"):
        teacher = load_teacher(src, adapter, device, torch.float32)
    synth: dict[str, Any] = {}
    candidates: list[str] = []
    if options.synthesize:
        with phase("teacher: synthesize prompts"):
            wanted = options.synthesize * (2 if options.synth_filter == "effect" else 1)
            writer = teacher.disable_adapter() if options.synth_writer == "base" else contextlib.nullcontext()
            with writer:
                candidates, rejected = synthesize_prompts(
                    teacher, tokenizer, given.prompts, wanted, device, options.seed
                )
        synth = {"asked": options.synthesize, "writer": options.synth_writer, "written": len(candidates),
                 "rejected": rejected}  # fmt: skip
    items = [view.item(p, given, i) for i, p in enumerate(given.prompts)] + [view.item(c) for c in candidates]
    texts = [view.render(item) for item in items]
    generation = {"end_ids": view.end_ids, "stops": view.stops, "add_special_tokens": view.add_special_tokens}
    with phase("teacher: generate"):
        greedy = generate(teacher, tokenizer, texts, view.max_new_tokens, device, progress=progress,
                          desc="teacher writes", **generation)  # fmt: skip
    sources, outs, is_greedy = list(range(len(texts))), list(greedy), [True] * len(texts)
    if options.samples:
        with phase("teacher: sample"):
            sampled = distinct_samples(teacher, tokenizer, texts, greedy, options.samples, view.max_new_tokens,
                                       device, options.seed, options.temperature, **generation)  # fmt: skip
        for i, found in enumerate(sampled):
            sources += [i] * len(found)
            outs += found
            is_greedy += [False] * len(found)
    measure = options.synthesize > 0 and options.synth_filter == "effect"
    with phase("teacher: score"):
        scored = score_texts(
            teacher, tokenizer, [texts[s] for s in sources], [o.text for o in outs], support, positions,
            options.top_k, device, measure_effect=measure, add_special_tokens=view.add_special_tokens,
            measure_tokens=options.tokens == "effect", end_tokens=[_end_token(o, view) for o in outs],
        )  # fmt: skip
    with phase("teacher: generic text"):
        rows = token_rows(tokenizer, list(generic_lines), GENERIC_TOKENS)
        with teacher.disable_adapter():
            base_rows = row_nlls(teacher, rows, device)
        adapter_rows = row_nlls(teacher, rows, device)
        base_nll, adapter_nll = pooled_nll(base_rows), pooled_nll(adapter_rows)
    keep = list(range(len(outs)))
    if measure:  # of the synthetic prompts, those where the adapter changes the answer most
        given_count = len(given.prompts)
        synthetic = [i for i in keep if sources[i] >= given_count and is_greedy[i]]
        ranked = sorted(synthetic, key=lambda i: -scored.effect[i])
        chosen = set(ranked[: options.synthesize])
        keep = [i for i in keep if sources[i] < given_count or sources[i] in {sources[j] for j in chosen}]
        synth["kept_by_effect"] = len(chosen)
    if synth:
        synth["kept"] = len({sources[i] for i in keep}) - len(given.prompts)
    outputs = TeacherOutputs(
        [texts[sources[i]] for i in keep],
        [outs[i].text for i in keep],
        [scored.ends[i] for i in keep],
        [scored.positions[i] for i in keep],
        [scored.top_ids[i] for i in keep],
        [scored.top_logprobs[i] for i in keep],
        "full" if support is None else "shared",
        [scored.effect[i] for i in keep] if measure else [],
        [sources[i] for i in keep],
        items,
        [outs[i].ended for i in keep],
        [is_greedy[i] for i in keep],
        [scored.token_effect[i] for i in keep] if scored.token_effect else [],
        {
            "chat_template": view.describe(),
            "end_ids": view.end_ids,
            "max_new_tokens": view.max_new_tokens,
            "multiple_choice": view.multiple_choice,
            "stops": view.stops,
            "generic": {
                "lines": len(rows),
                "base_nll": base_nll,
                "adapter_nll": adapter_nll,
                "change_stderr": perplexity_change_stderr(base_rows, adapter_rows),
            },
            "synthesized": synth,
            "tokens_written": [outs[i].tokens for i in keep],
        },
    )
    del teacher
    release_memory()
    outputs.save(directory, key)
    info = {
        "texts": len(outputs.prompts),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak_rss_mb()),
        **_summary(outputs),
    }
    return outputs, info


def _end_token(out: Generated, view: TeacherView) -> int | None:
    return view.end_ids[0] if out.ended == "end" and view.end_ids else None


def _summary(outputs: TeacherOutputs) -> dict[str, Any]:
    """How the teacher's greedy continuations ended, how long they are, how many are empty."""
    greedy = [i for i in range(len(outputs.prompts)) if outputs.greedy[i]]
    ended = Counter(outputs.ended[i] for i in greedy)
    tokens = [outputs.info.get("tokens_written", [0] * len(outputs.prompts))[i] for i in greedy]
    return {
        "chat_template": outputs.info.get("chat_template"),
        "ended": {"end": ended.get("end", 0), "stop": ended.get("stop", 0), "length": ended.get("length", 0)},
        "empty_continuations": sum(1 for i in greedy if not outputs.continuations[i].strip()),
        "ended_at_once": sum(
            1 for i in greedy if not outputs.continuations[i].strip() and outputs.ended[i] != "length"
        ),
        "mean_tokens": round(sum(tokens) / len(tokens), 1) if tokens else 0.0,
        "max_new_tokens": outputs.info.get("max_new_tokens"),
        "multiple_choice": outputs.info.get("multiple_choice", False),
        "samples": len(outputs.prompts) - len(greedy),
    }


__all__ = ["GENERIC_TOKENS", "digest", "kl_positions", "run_teacher", "support_ids", "teacher_key"]
