"""The task's inputs for distillation: reading prompt files, splitting, and the shape of synthetic prompts.

Four file kinds, told apart by their first non-blank line:

- JSONL with a ``prompt`` field: each prompt used verbatim (or, with ``--chat``, as the user's
  turn of a conversation);
- JSONL with a ``messages`` field: an OpenAI-style conversation (``[{"role", "content"}, ...]``,
  ending with the user's turn), rendered through each model's chat template;
- ARC JSONL (``question``; choices and answers, if present, are ignored): each question
  through the evaluator's template ``Question: {question}\\nAnswer:``;
- plain text: one prompt a line.

Labels are never read. Duplicates are dropped (first kept).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..chat import Message, as_conversation, check_messages
from ..errors import LoraportError
from ..evaluate import PROMPT

MIN_PROMPTS = 2


@dataclass
class PromptSet:
    """Prompts read from one source: ``prompts`` (distinct, in file order; for ``messages`` each
    conversation as JSON, its identity), ``name`` for messages, ``kind`` (``prompt``, ``messages``,
    ``arc`` or ``text``), how many duplicates were dropped and, for ``messages``, the conversations."""

    prompts: list[str]
    name: str
    kind: str
    duplicates: int = 0
    conversations: list[list[Message]] | None = None

    def as_conversations(self) -> list[list[Message]]:
        """Every prompt as a conversation: the ``messages`` as given, a plain prompt as the user's turn."""
        if self.conversations is not None:
            return self.conversations
        return [as_conversation(p) for p in self.prompts]


def _decode(path: Path) -> str:
    if not path.is_file():
        raise LoraportError(f"{path}: prompts file not found")
    data = path.read_bytes()
    if b"\x00" in data[: 1 << 20]:
        raise LoraportError(f"{path}: prompts file is binary (expected JSONL or UTF-8 text, one prompt per line)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoraportError(f"{path}: prompts file is not UTF-8 text (byte {exc.start})") from None


def _from_json(record: object, where: str) -> tuple[str, str]:
    """``(prompt, kind)`` of one JSONL record (a conversation as its JSON)."""
    if not isinstance(record, dict):
        raise LoraportError(f"{where}: expected a JSON object with a 'prompt', 'messages' or 'question' field")
    if "messages" in record:
        return json.dumps(check_messages(record["messages"], where), ensure_ascii=False), "messages"
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise LoraportError(f"{where}: 'prompt' must be a non-empty string")
        return prompt, "prompt"
    if "question" in record:
        question = record["question"]
        if not isinstance(question, str) or not question.strip():
            raise LoraportError(f"{where}: 'question' must be a non-empty string")
        return PROMPT.format(question=question), "arc"
    raise LoraportError(
        f"{where}: no 'prompt', 'messages' or 'question' field (keys: {', '.join(sorted(record)) or 'none'})"
    )


def read_prompts(source: str | os.PathLike[str] | Sequence[str]) -> PromptSet:
    """The prompts of a file (JSONL with ``prompt`` or ``messages``, ARC JSONL or plain text) or of a list of
    strings.

    Raises:
        LoraportError: a missing, binary or non-UTF-8 file, a JSONL line that is not an object
            with ``prompt``, ``messages`` or ``question``, a bad conversation, mixed kinds, or
            fewer than two distinct prompts.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        name = str(path)
        lines = [(number, line) for number, line in enumerate(_decode(path).splitlines(), 1) if line.strip()]
        if not lines:
            raise LoraportError(f"{name}: no prompts (expected JSONL or one prompt per line)")
        if lines[0][1].lstrip().startswith("{"):
            found = []
            for number, line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LoraportError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
                found.append(_from_json(record, f"{name} line {number}"))
            kinds = {kind for _, kind in found}
            if len(kinds) > 1:
                raise LoraportError(f"{name}: mixes {' and '.join(sorted(kinds))} records; use one kind per file")
            items, kind = [prompt for prompt, _ in found], kinds.pop()
        else:
            items, kind = [line.strip() for _, line in lines], "text"
    else:
        items = list(source)
        name, kind = f"<list of {len(items)} prompts>", "prompt"
        if not all(isinstance(item, str) and item.strip() for item in items):
            raise LoraportError(f"prompts {name}: every item must be a non-empty string")
    distinct = list(dict.fromkeys(items))
    if len(distinct) < MIN_PROMPTS:
        raise LoraportError(f"{name}: {len(distinct)} distinct prompt(s); distillation needs at least {MIN_PROMPTS}")
    conversations = [json.loads(item) for item in distinct] if kind == "messages" else None
    return PromptSet(distinct, name, kind, len(items) - len(distinct), conversations)


def split_heldout(prompts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, heldout)``: a seeded ``fraction`` of the prompts (at least one, leaving one to train on)."""
    count = min(len(prompts) - 1, max(1, round(fraction * len(prompts))))
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]


def _common_prefix(items: Sequence[str]) -> str:
    return os.path.commonprefix(list(items))  # noqa: RUF071 - character by character is meant


def prompt_template(prompts: Sequence[str]) -> tuple[str, str]:
    """The prefix and suffix every prompt shares (``("", "")`` when none): the shape synthetic prompts must have."""
    prefix = _common_prefix(prompts)
    suffix = _common_prefix([p[::-1] for p in prompts])[::-1]
    shortest = min(len(p) for p in prompts)
    if len(prefix) + len(suffix) > shortest:  # they overlap: keep the prefix, trim the suffix
        suffix = suffix[len(prefix) + len(suffix) - shortest :]
    return prefix, suffix


def few_shot_text(examples: Sequence[str]) -> str:
    """The text the teacher continues to write a new prompt: the examples, each followed by a blank line."""
    return "".join(example + "\n\n" for example in examples)


def candidate_from(generated: str, prefix: str, suffix: str, max_chars: int) -> str | None:
    """The first new prompt in the teacher's continuation of :func:`few_shot_text`, if it has the given shape.

    The continuation is cut at the first blank line; it must start with ``prefix``, contain
    ``suffix`` after it (the prompt ends there), hold something between them, and be at most
    ``max_chars`` long.
    """
    text = generated.split("\n\n", 1)[0].strip("\n")
    if not text.startswith(prefix):
        return None
    if suffix:
        end = text.find(suffix, len(prefix))
        if end < 0:
            return None
        text = text[: end + len(suffix)]
    middle = text[len(prefix) : len(text) - len(suffix)]
    if not middle.strip() or len(text) > max_chars or "\n\n" in text:
        return None
    return text


__all__ = [
    "MIN_PROMPTS",
    "PromptSet",
    "candidate_from",
    "few_shot_text",
    "prompt_template",
    "read_prompts",
    "split_heldout",
]
