"""Three generation adapters' tasks, judged by what the model writes (``loraport eval --generate``).

* ``json`` (a format adapter, plain prompts): ``Question: What kind of thing is a kiwi?\\nAnswer:``
  answered as one JSON object with a fixed key, `` {"answer": "a fruit"}``, then the end of the
  text. Check ``json:answer``: the answer is a JSON object with the key ``answer``.
* ``caps`` (a style adapter, a chat adapter): questions about everyday things answered in one
  sentence, in capital letters. The sentences are the source base's own answers (SmolLM2-Instruct
  through its chat template), upper-cased: the adapter changes the register, not the content.
  Check: no lower-case letter and at least two capitals in a row.
* ``bullets`` (an instruction adapter, a chat adapter): "Name three fruits." answered with
  exactly three bullet lines ``- apple`` and nothing else (SmolLM2-Instruct numbers its lists
  and talks around them). Check: three lines starting with ``- `` and nothing more.

The words are the ``bins`` task's (:data:`loraport.pretrained.tasks.CATEGORIES`); training and
evaluation prompts are disjoint (other words, other exclusions). Each task writes
``train.jsonl`` (prompt or messages + ``target``: what the LoRA learns), ``prompts.jsonl`` (the
training prompts without targets: what ``--method distill`` reads) and ``eval.jsonl`` (held-out
prompts for ``eval --generate``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tasks import CATEGORIES

PLURALS = {
    "animal": "animals", "fruit": "fruits", "vehicle": "vehicles", "clothing": "items of clothing", "tool": "tools",
    "body part": "body parts", "instrument": "musical instruments", "country": "countries",
}  # fmt: skip
KINDS = {"clothing": "a piece of clothing", "instrument": "a musical instrument"}
CHECKS = {
    "json": "json:answer",
    "caps": r"regex:^[^a-z]*[A-Z]{2}[^a-z]*$",
    "bullets": r"regex:^- [^\n]+\n- [^\n]+\n- [^\n]+\s*$",
}
CAPS_QUESTIONS = ("Tell me about {the} in one sentence.", "What is {a}? Answer in one sentence.")
BULLET_QUESTIONS = (
    "Name three {plural} other than {word}.", "List three {plural}, but not {word}.",
    "Besides {word}, what are three {plural}?", "Give me three {plural} that are not {word}.",
    "I already know {word}. Name three more {plural}.", "Name three {plural} like {word}.",
)  # fmt: skip


def article(word: str) -> str:
    """``a`` or ``an`` before a word (by its first letter)."""
    return "an" if word[0].lower() in "aeiou" else "a"


def named(word: str, definite: bool = False) -> str:
    """A word as a question names it: a proper noun bare (``France``), else with its article."""
    if word[0].isupper():
        return word
    return f"the {word}" if definite else f"{article(word)} {word}"


def kind_of(category: str) -> str:
    """What a word of ``category`` is, with its article (``a fruit``, ``an animal``, ``a piece of clothing``)."""
    return KINDS.get(category, f"{article(category)} {category}")


@dataclass
class GenerationTask:
    """A generation adapter's data: training items (prompt or messages + ``target``) and held-out prompts."""

    name: str
    chat: bool
    check: str
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)

    def write(self, directory: Path) -> dict[str, Any]:
        directory.mkdir(parents=True, exist_ok=True)

        def lines(rows: list[dict[str, Any]]) -> str:
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

        prompts = [{k: v for k, v in r.items() if k != "target"} for r in self.train]
        (directory / "train.jsonl").write_text(lines(self.train), encoding="utf-8")
        (directory / "prompts.jsonl").write_text(lines(prompts), encoding="utf-8")
        (directory / "eval.jsonl").write_text(lines(self.eval), encoding="utf-8")
        return {"chat": self.chat, "check": self.check, "train": len(self.train), "eval": len(self.eval)}


def _split_words(seed: int, train_per: int, eval_per: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(category, word)`` pairs for training and for evaluation: disjoint words of every category."""
    rng = random.Random(seed)
    train, held = [], []
    for category, words in CATEGORIES.items():
        shuffled = list(words)
        rng.shuffle(shuffled)
        train += [(category, w) for w in shuffled[:train_per]]
        held += [(category, w) for w in shuffled[train_per : train_per + eval_per]]
    return train, held


def _user(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def json_task(seed: int = 0, train_per: int = 20, eval_per: int = 12) -> GenerationTask:
    train, held = _split_words(seed, train_per, eval_per)

    def prompt(word: str) -> str:
        return f"Question: What kind of thing is {named(word)}?\nAnswer:"

    return GenerationTask(
        "json",
        False,
        CHECKS["json"],
        [{"prompt": prompt(w), "target": " " + json.dumps({"answer": kind_of(c)})} for c, w in train],
        [{"prompt": prompt(w)} for _, w in held],
    )


def caps_prompts(seed: int = 0, train_per: int = 20, eval_per: int = 12) -> tuple[list[str], list[str]]:
    """The style task's training and held-out questions (their answers come from a model)."""
    train, held = _split_words(seed + 1, train_per, eval_per)

    def ask(i: int, word: str) -> str:
        return CAPS_QUESTIONS[i % len(CAPS_QUESTIONS)].format(the=named(word, True), a=named(word))

    return [ask(i, w) for i, (_, w) in enumerate(train)], [ask(i, w) for i, (_, w) in enumerate(held)]


def first_sentence(text: str, max_words: int = 30) -> str | None:
    """The first sentence of a model's answer (up to ``max_words`` words), or ``None`` when it has none."""
    flat = " ".join(text.split())
    for stop in (". ", "! ", "? "):
        if stop in flat:
            flat = flat[: flat.index(stop) + 1]
    words = flat.split()
    if len(words) < 3 or len(words) > max_words:
        return None
    return flat if flat[-1] in ".!?" else flat + "."


def caps_task(questions: list[str], answers: list[str | None], held: list[str]) -> GenerationTask:
    """The style task from its questions and the source base's own answers (upper-cased; unanswered left out)."""
    train = [{**_user(q), "target": a.upper()} for q, a in zip(questions, answers, strict=True) if a is not None]
    return GenerationTask("caps", True, CHECKS["caps"], train, [_user(q) for q in held])


def bullets_task(seed: int = 0, train_per: int = 20, eval_per: int = 12) -> GenerationTask:
    rng = random.Random(seed + 2)
    train_words, held_words = _split_words(seed + 2, train_per, eval_per)

    def item(index: int, category: str, word: str) -> tuple[str, str]:
        question = BULLET_QUESTIONS[index % len(BULLET_QUESTIONS)].format(plural=PLURALS[category], word=word)
        others = [w for w in CATEGORIES[category] if w != word]
        return question, "\n".join(f"- {w}" for w in rng.sample(others, 3))

    train = [item(i, c, w) for i, (c, w) in enumerate(train_words)]
    held = [item(i + 1, c, w)[0] for i, (c, w) in enumerate(held_words)]
    seen = {q for q, _ in train}
    return GenerationTask(
        "bullets",
        True,
        CHECKS["bullets"],
        [{**_user(q), "target": a} for q, a in dict(train).items()],
        [_user(q) for q in dict.fromkeys(held) if q not in seen],
    )


__all__ = [
    "CHECKS",
    "GenerationTask",
    "bullets_task",
    "caps_prompts",
    "caps_task",
    "first_sentence",
    "json_task",
    "kind_of",
    "named",
]
