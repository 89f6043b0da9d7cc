"""What a model writes: generation to a natural end, and scoring generated answers with a check.

:func:`generate` writes each prompt's continuation until the model ends its turn (an end token:
EOS, or the chat template's end of turn), a stop string appears, or ``max_new_tokens`` runs
out, and says which of the three ended it. The distillation teacher and the generation
evaluator both use it.

The evaluator (:func:`evaluate_generation`, ``loraport eval --generate``) reads JSONL lines with
a ``prompt`` (a string, used verbatim, or through the chat template with ``chat=True``) or
``messages`` (an OpenAI-style conversation, always through the chat template), generates
greedily and checks each answer:

- ``exact``: the answer, stripped, equals the line's ``field`` (default ``answer``), stripped;
- ``contains``: the answer contains the line's ``field``;
- ``regex:PATTERN``: ``re.search(PATTERN, answer)`` finds a match;
- ``json``: the answer is valid JSON (equal to the line's ``field`` when the line has one);
  ``json:KEY``: a JSON object with key ``KEY`` (whose value equals the line's ``field`` when
  the line has one);
- a check file: a Python file defining ``check(prompt, answer)`` (or ``check(prompt, answer,
  record)``) that returns a bool; ``prompt`` is the line's prompt string or its messages.

The rate is the share of answers that pass, with its standard error (sample standard
deviation / sqrt(n), as :mod:`loraport.evaluate`); every answer can be written to a JSONL.

Example::

    >>> result = evaluate_generation_path("smollm2", "chat.jsonl", adapter="caps-lora",
    ...                                   check="regex:^[^a-z]+$")    # doctest: +SKIP
    >>> print(result.summary())                                        # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .chat import ChatFormat, as_conversation, check_messages
from .errors import LoraportError

DEFAULT_MAX_NEW_TOKENS = 128
CHECK_KINDS = ("exact", "contains", "regex:PATTERN", "json", "json:KEY")


# -- generation -------------------------------------------------------------------------------


@dataclass
class Generated:
    """One continuation: its ``text`` (decoded in context, cut before a stop string), why it ended
    (``end``: the model wrote an end token; ``stop``: a stop string; ``length``: ``max_new_tokens``)
    and how many tokens the model wrote (the end token included)."""

    text: str
    ended: str
    tokens: int


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def left_padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Token-id rows as one left-padded batch ``(ids, mask)`` (generation appends on the right)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def continuation_text(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text new tokens add after a prompt: decoded in context (a sentencepiece or word-level tokenizer
    drops the leading space of tokens decoded alone)."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


class _StopStrings:
    """A ``transformers`` stopping criterion: a row is done once its new text contains a stop string."""

    def __init__(self, tokenizer: Any, prompt_width: int, stops: Sequence[str]) -> None:
        self.tokenizer, self.prompt_width, self.stops = tokenizer, prompt_width, list(stops)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, self.prompt_width :].tolist(), skip_special_tokens=True)
            done[row] = any(stop in text for stop in self.stops)
        return done


def _finish(tokenizer: Any, prompt_ids: list[int], new_ids: list[int], end_ids: set[int], pad: int,
            stops: Sequence[str]) -> Generated:  # fmt: skip
    ended, count = "length", len(new_ids)
    for i, token in enumerate(new_ids):
        if token in end_ids:
            new_ids, ended, count = new_ids[:i], "end", i + 1
            break
    else:
        while new_ids and new_ids[-1] == pad and pad not in end_ids:  # a row padded after a stop string
            new_ids = new_ids[:-1]
    text = continuation_text(tokenizer, prompt_ids, new_ids)
    cuts = [text.find(stop) for stop in stops if stop and stop in text]
    if cuts:
        text, ended = text[: min(cuts)], "stop"
    return Generated(text, ended, count)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    device: torch.device | str = "cpu",
    *,
    end_ids: Sequence[int] | None = None,
    stops: Sequence[str] = (),
    add_special_tokens: bool = True,
    batch_size: int = 16,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generating",
) -> list[Generated]:
    """Each prompt's continuation, greedy or sampled (seeded: the same seed gives the same texts).

    Prompts are encoded with ``add_special_tokens`` (``False`` for chat-rendered text, which carries
    its own), batched by length and left-padded. A row ends at its first ``end_ids`` token
    (default: the tokenizer's EOS), at a stop string, or after ``max_new_tokens``.
    """
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    if max_new_tokens < 1:
        raise LoraportError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad = pad_id(tokenizer)
    ends = [int(i) for i in (end_ids if end_ids is not None else [tokenizer.eos_token_id]) if i is not None]
    encoded = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    out: list[Generated | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_padded([encoded[i] for i in chunk], pad, device)
        criteria = StoppingCriteriaList([_StopStrings(tokenizer, ids.shape[1], stops)]) if stops else None
        if sample:
            torch.manual_seed(seed * 1_000_003 + start)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=ends or None,
            stopping_criteria=criteria,
        )
        for row, i in enumerate(chunk):
            new_ids = generated[row, ids.shape[1] :].tolist()
            out[i] = _finish(tokenizer, encoded[i], new_ids, set(ends), pad, stops)
        bar.update(len(chunk))
    bar.close()
    return [g for g in out if g is not None]


# -- prompts and checks -------------------------------------------------------------------------


@dataclass
class GenerationItem:
    """One line of a generation set: its ``prompt`` (a string) or ``messages``, and the whole record."""

    record: dict[str, Any]
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def shown(self) -> str | list[dict[str, str]]:
        """What a check function receives as the prompt."""
        return self.messages if self.messages is not None else (self.prompt or "")


def read_generation_set(path: str | os.PathLike[str], limit: int | None = None) -> list[GenerationItem]:
    """Lines of a JSONL with ``prompt`` (a string) or ``messages`` (a conversation), one kind per file."""
    file = Path(path)
    if not file.is_file():
        raise LoraportError(f"{file}: no such data file (expected JSONL with 'prompt' or 'messages')")
    if limit is not None and limit < 1:
        raise LoraportError(f"limit must be >= 1, got {limit}")
    items: list[GenerationItem] = []
    kinds: set[str] = set()
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if limit is not None and len(items) >= limit:
            break
        if not line.strip():
            continue
        where = f"{file} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoraportError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise LoraportError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
        if "messages" in record:
            items.append(GenerationItem(record, messages=check_messages(record["messages"], where)))
            kinds.add("messages")
        elif "prompt" in record:
            if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                raise LoraportError(f"{where}: 'prompt' must be a non-empty string")
            items.append(GenerationItem(record, prompt=record["prompt"]))
            kinds.add("prompt")
        else:
            keys = ", ".join(sorted(record)) or "none"
            raise LoraportError(f"{where}: no 'prompt' or 'messages' field (keys: {keys})")
    if len(kinds) > 1:
        raise LoraportError(f"{file}: mixes 'prompt' and 'messages' lines; use one kind per file")
    if not items:
        raise LoraportError(f"{file}: no prompts found (expected JSONL with 'prompt' or 'messages')")
    return items


Check = Callable[[GenerationItem, str], bool]


def _field_value(item: GenerationItem, name: str, kind: str) -> Any:
    if name not in item.record:
        raise LoraportError(f"--check {kind} compares with each line's '{name}' field, which a line lacks "
                            f"(keys: {', '.join(sorted(item.record))}); pass --field NAME")  # fmt: skip
    return item.record[name]


def _parse_json(answer: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(answer.strip())
    except (json.JSONDecodeError, ValueError):
        return False, None


def make_check(spec: str | None, field_name: str = "answer", check_file: str | os.PathLike[str] | None = None) -> Check:
    """The check ``spec`` names (see the module docstring), or the ``check`` function of ``check_file``."""
    if check_file is not None:
        if spec is not None:
            raise LoraportError("pass either --check or --check-file, not both")
        return _file_check(Path(check_file))
    if spec is None:
        raise LoraportError(f"a generation check is needed: --check {'|'.join(CHECK_KINDS)} or --check-file FILE")
    if spec == "exact":
        return lambda item, answer: answer.strip() == str(_field_value(item, field_name, spec)).strip()
    if spec == "contains":
        return lambda item, answer: str(_field_value(item, field_name, spec)).strip() in answer
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:") :])
        except re.error as exc:
            raise LoraportError(f"--check {spec!r}: not a valid regular expression ({exc})") from None
        return lambda item, answer: pattern.search(answer) is not None
    if spec == "json" or spec.startswith("json:"):
        key = spec[len("json:") :] if spec.startswith("json:") else None
        if key == "":
            raise LoraportError("--check json:KEY needs a key name after 'json:'")

        def json_check(item: GenerationItem, answer: str) -> bool:
            ok, value = _parse_json(answer)
            if not ok:
                return False
            if key is not None:
                if not isinstance(value, dict) or key not in value:
                    return False
                value = value[key]
            return field_name not in item.record or value == item.record[field_name]

        return json_check
    raise LoraportError(f"--check {spec!r}: expected one of {', '.join(CHECK_KINDS)}")


def _file_check(path: Path) -> Check:
    if not path.is_file():
        raise LoraportError(f"{path}: check file not found")
    spec = importlib.util.spec_from_file_location(f"loraport_check_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise LoraportError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise LoraportError(f"{path}: the check file fails to load ({type(exc).__name__}: {exc})") from None
    function = getattr(module, "check", None)
    if not callable(function):
        raise LoraportError(f"{path}: defines no function check(prompt, answer)")
    try:
        takes_record = len(inspect.signature(function).parameters) >= 3
    except (TypeError, ValueError):
        takes_record = False

    def file_check(item: GenerationItem, answer: str) -> bool:
        try:
            result = function(item.shown, answer, item.record) if takes_record else function(item.shown, answer)
        except Exception as exc:
            raise LoraportError(f"{path}: check() raised {type(exc).__name__}: {exc}") from None
        return bool(result)

    return file_check


# -- the evaluator ------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """The share of generated answers that pass the check; stderr: sample std / sqrt(n) (None when n < 2)."""

    rate: float
    n: int
    passed: int
    stderr: float | None
    seconds: float
    chat: str | None = None
    answers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_answers: bool = False) -> dict[str, Any]:
        values = {k: getattr(self, k) for k in ("rate", "n", "passed", "stderr", "seconds", "chat")}
        if with_answers:
            values["answers"] = self.answers
        return values

    def summary(self) -> str:
        err = f" (+/- {self.stderr:.4f})" if self.stderr is not None else ""
        via = f"  chat: {self.chat}" if self.chat else ""
        return f"rate {self.rate:.4f}{err}  passed {self.passed}/{self.n}  {self.seconds:.1f}s{via}"


def rendered_prompts(items: Sequence[GenerationItem], chat: ChatFormat | None) -> tuple[list[str], bool]:
    """Each item's prompt as the model reads it, and whether the text carries its own special tokens.

    ``messages`` lines need ``chat``; ``prompt`` lines go through it when it is given (``--chat``).
    """
    if chat is None:
        if any(item.messages is not None for item in items):
            raise LoraportError("'messages' lines need a chat template: the model's own, or --chat-template FILE")
        return [item.prompt or "" for item in items], True
    texts = [
        chat.render(item.messages if item.messages is not None else as_conversation(item.prompt or ""), "prompt")
        for item in items
    ]
    return texts, False


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    items: Sequence[GenerationItem],
    check: Check,
    *,
    chat: ChatFormat | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stops: Sequence[str] = (),
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> GenerationResult:
    """Generate greedily for every item (to the end of the turn) and check each answer."""
    if not items:
        raise LoraportError("no prompts to evaluate")
    started = time.perf_counter()
    texts, specials = rendered_prompts(items, chat)
    end_ids = chat.end_of_turn_ids() if chat is not None else None
    model.eval()
    outputs = generate(
        model, tokenizer, texts, max_new_tokens, device, end_ids=end_ids, stops=stops, add_special_tokens=specials,
        batch_size=batch_size, progress=progress, desc="generating answers",
    )  # fmt: skip
    answers, results = [], []
    for index, (item, out) in enumerate(zip(items, outputs, strict=True)):
        passed = check(item, out.text)
        results.append(1.0 if passed else 0.0)
        row: dict[str, Any] = {"index": index}
        row.update({"messages": item.messages} if item.messages is not None else {"prompt": item.prompt})
        row.update({"answer": out.text, "passed": passed, "ended": out.ended, "tokens": out.tokens})
        answers.append(row)
    n = len(results)
    rate = sum(results) / n
    stderr = math.sqrt(sum((v - rate) ** 2 for v in results) / (n - 1)) / math.sqrt(n) if n > 1 else None
    return GenerationResult(rate, n, int(sum(results)), stderr, time.perf_counter() - started,
                            chat.describe() if chat is not None else None, answers)  # fmt: skip


def evaluate_generation_path(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | None = None,
    *,
    check: str | None = None,
    field_name: str = "answer",
    check_file: str | os.PathLike[str] | None = None,
    chat: bool = False,
    chat_template: str | os.PathLike[str] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stops: Sequence[str] = (),
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    answers: str | os.PathLike[str] | None = None,
) -> GenerationResult:
    """Load a model (+ adapter) and score its generated answers on a JSONL of prompts or conversations.

    ``chat`` (or a ``chat_template`` file, or ``messages`` lines) renders prompts through the chat
    template; ``answers``: write every answer to this JSONL. ``seconds`` covers loading too.
    """
    from .evaluate import load_model, load_tokenizer, open_model
    from .io import atomic_write_text

    started = time.perf_counter()
    items = read_generation_set(data, limit)
    test = make_check(check, field_name, check_file)
    checkpoint = open_model(model)
    tokenizer = load_tokenizer(checkpoint)
    wants_chat = chat or chat_template is not None or items[0].messages is not None
    fmt = ChatFormat.for_tokenizer(tokenizer, chat_template, "model", "--chat-template") if wants_chat else None
    lm = load_model(checkpoint, adapter, dtype).to(device)
    result = evaluate_generation(
        lm, tokenizer, items, test, chat=fmt, max_new_tokens=max_new_tokens, stops=stops, batch_size=batch_size,
        device=device, progress=progress,
    )  # fmt: skip
    result.seconds = time.perf_counter() - started
    if answers is not None:
        atomic_write_text(answers, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.answers))
    return result


__all__ = [
    "CHECK_KINDS",
    "DEFAULT_MAX_NEW_TOKENS",
    "Check",
    "Generated",
    "GenerationItem",
    "GenerationResult",
    "continuation_text",
    "evaluate_generation",
    "evaluate_generation_path",
    "generate",
    "left_padded",
    "make_check",
    "pad_id",
    "read_generation_set",
    "rendered_prompts",
]
