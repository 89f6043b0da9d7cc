"""The zoo's ARC-format multiple-choice tasks (4 choices, JSONL).

* ``facts`` (memorisation): invented person -> attribute facts (favourite colour, home city,
  pet, job). The pretraining corpus never states them, so base models are near chance
  (0.25); a LoRA has to memorise them. Evaluated on the training questions.
* ``addition`` (a skill that generalises): ``What is a plus b?`` with numeric choices near
  the sum. The corpus never uses ``plus``; it does teach the number line (counting,
  successors, comparisons). Trained on a subset of the pairs, evaluated on held-out pairs.
* ``smaller`` (a skill that generalises, :func:`smaller_task`): ``Which number is less, a or
  b?``. The corpus asks only for the *larger* of two numbers, so base models pick the larger
  one (S: 0.08, below chance); trained on some pairs, evaluated on held-out pairs. Not part of
  the zoo build; the fusion benchmark uses it as a third task.

Each task can set aside a ``dev`` split (``n_dev``), never used for training nor for the
reported evaluation, to choose hyperparameters on (the fusion benchmark's scaling
coefficients). For the memorised ``facts`` the dev questions are trained facts too (the task
*is* the trained facts) but disjoint from the evaluated ones.

Distractors come from the answer's own category with similar character lengths, and the
answer's position is balanced over A-D, so ``acc_norm`` and ``acc`` are both meaningful.

Record schema (ARC / lm-eval ``arc_challenge``)::

    {"id": "facts-0001", "question": "...", "choices": {"text": [4 strings], "label": ["A", "B", "C", "D"]},
     "answerKey": "C"}
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .corpus import ANIMALS, CITIES, COLOURS, JOBS, PEOPLE

LABELS = ["A", "B", "C", "D"]

# relation -> (question template, answer category)
RELATIONS: dict[str, tuple[str, list[str]]] = {
    "colour": ("What is the favourite colour of {who}?", COLOURS),
    "city": ("In which city does {who} live?", CITIES),
    "pet": ("What pet does {who} have?", ANIMALS),
    "job": ("What is the job of {who}?", JOBS),
}


@dataclass
class Task:
    """A task: training records, evaluation records, and what it measures."""

    name: str
    kind: str  # "memorisation" or "held-out skill"
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    description: str
    dev: list[dict[str, Any]] = field(default_factory=list)

    def qa_items(self) -> list[tuple[str, str]]:
        """``(question, correct answer text)`` of the training records (what a LoRA is trained on)."""
        return [(r["question"], answer_text(r)) for r in self.train]

    def write(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write ``train.jsonl`` and ``eval.jsonl`` under ``directory``; return the manifest entry."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "train.jsonl", self.train)
        write_jsonl(out / "eval.jsonl", self.eval)
        extra = {"dev": str(write_jsonl(out / "dev.jsonl", self.dev)), "n_dev": len(self.dev)} if self.dev else {}
        return {
            "kind": self.kind,
            "description": self.description,
            "train": str(out / "train.jsonl"),
            "eval": str(out / "eval.jsonl"),
            "n_train": len(self.train),
            "n_eval": len(self.eval),
            "eval_is_train": self.train == self.eval,
            **extra,
        }


def answer_text(record: dict[str, Any]) -> str:
    """The text of the correct choice of an ARC record."""
    return record["choices"]["text"][record["choices"]["label"].index(record["answerKey"])]


def arc_record(rid: str, question: str, answer: str, distractors: list[str], position: int) -> dict[str, Any]:
    texts = list(distractors)
    texts.insert(position, answer)
    return {
        "id": rid,
        "question": question,
        "choices": {"text": texts, "label": list(LABELS)},
        "answerKey": LABELS[position],
    }


def similar_length(rng: random.Random, answer: str, category: list[str], k: int = 3, pool: int = 6) -> list[str]:
    """``k`` other words of ``category`` drawn from the ``pool`` closest in character length."""
    others = [w for w in category if w != answer]
    rng.shuffle(others)
    others.sort(key=lambda w: abs(len(w) - len(answer)))
    return rng.sample(others[:pool], k)


def facts_task(seed: int = 0, people: int = 50, n_dev: int = 0, names: Sequence[str] | None = None) -> Task:
    """``people`` x 4 relations memorised facts; evaluation = training questions.

    ``n_dev > 0``: the first ``n_dev`` questions (trained, like all) form the dev split and
    the evaluation keeps the others. ``names``: who the facts are about (default: the zoo
    corpus's first names, :data:`PEOPLE`).
    """
    rng = random.Random(seed)
    who = rng.sample(list(names) if names is not None else PEOPLE, people)
    records = []
    for template, category in RELATIONS.values():
        # balanced answers: every category value used about equally often
        answers = [category[i % len(category)] for i in range(people)]
        rng.shuffle(answers)
        for person, answer in zip(who, answers, strict=True):
            records.append((template.format(who=person), answer, similar_length(rng, answer, category)))
    rng.shuffle(records)
    positions = [i % 4 for i in range(len(records))]
    rng.shuffle(positions)
    out = [
        arc_record(f"facts-{i:04d}", q, a, d, pos)
        for i, ((q, a, d), pos) in enumerate(zip(records, positions, strict=True))
    ]
    dev = out[:n_dev]
    return Task(
        "facts",
        "memorisation",
        out,
        out[n_dev:] if n_dev else out,
        f"{people} invented people x {len(RELATIONS)} attributes ({', '.join(RELATIONS)}), absent from the "
        "pretraining corpus; evaluated on the training questions"
        + (f" ({n_dev} of them set aside as the dev split)" if n_dev else ""),
        dev,
    )


def addition_task(seed: int = 0, max_operand: int = 24, n_eval: int = 200, offsets: int = 4, n_dev: int = 0) -> Task:
    """``a plus b`` for ``0 <= a, b <= max_operand``; ``n_eval`` held-out pairs, the rest for training.

    Distractors are ``sum + d`` for distinct non-zero ``|d| <= offsets`` (kept >= 0), so a model
    needs the exact sum, not just its size. ``n_dev`` further held-out pairs form the dev split.
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(pairs)
    records = []
    for i, (a, b) in enumerate(pairs):
        total = a + b
        deltas = [d for d in range(-offsets, offsets + 1) if d and total + d >= 0]
        distractors = [str(total + d) for d in rng.sample(deltas, 3)]
        records.append(arc_record(f"addition-{i:04d}", f"What is {a} plus {b}?", str(total), distractors, i % 4))
    eval_records, dev, train_records = records[:n_eval], records[n_eval : n_eval + n_dev], records[n_eval + n_dev :]
    return Task(
        "addition",
        "held-out skill",
        train_records,
        eval_records,
        f"a plus b for 0 <= a, b <= {max_operand}, distractors within +-{offsets} of the sum; "
        f"trained on {len(train_records)} pairs, evaluated on {len(eval_records)} held-out pairs"
        + (f" ({len(dev)} more held out as the dev split)" if n_dev else ""),
        dev,
    )


def smaller_task(seed: int = 0, n_train: int = 600, n_dev: int = 100, n_eval: int = 200, top: int = 99) -> Task:
    """``Which number is less, a or b?`` for distinct ``0 <= a, b <= top``; splits of disjoint pairs.

    Choices: the smaller number, the larger one, and two numbers that are not in the question
    with the smaller one's digit count (so ``acc_norm`` stays meaningful). A model that answers
    with the larger number (what the corpus's ``Which number is larger`` questions teach)
    scores near 0.
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(top + 1) for b in range(a + 1, top + 1)]
    chosen = rng.sample(pairs, n_train + n_dev + n_eval)
    records = []
    for i, (low, high) in enumerate(chosen):
        a, b = (low, high) if rng.random() < 0.5 else (high, low)
        width = len(str(low))
        others = [x for x in range(top + 1) if x not in (a, b) and len(str(x)) == width] or [
            x for x in range(top + 1) if x not in (a, b)
        ]
        distractors = [str(high), *(str(x) for x in rng.sample(others, 2))]
        rng.shuffle(distractors)
        question = f"Which number is less, {a} or {b}?"
        records.append(arc_record(f"smaller-{i:04d}", question, str(low), distractors, i % 4))
    eval_records = records[:n_eval]
    dev = records[n_eval : n_eval + n_dev]
    train_records = records[n_eval + n_dev :]
    return Task(
        "smaller",
        "held-out skill",
        train_records,
        eval_records,
        f"the smaller of two distinct numbers 0-{top}; trained on {len(train_records)} pairs, evaluated on "
        f"{len(eval_records)} held-out pairs ({len(dev)} more held out as the dev split)",
        dev,
    )


def default_tasks(seed: int = 0) -> list[Task]:
    return [facts_task(seed), addition_task(seed)]


def write_jsonl(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> Path:
    out = Path(path)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out
