"""The zoo's ARC-format multiple-choice tasks (4 choices, JSONL).

* ``facts`` (memorisation): invented person -> attribute facts (favourite colour, home city,
  pet, job). The pretraining corpus never states them, so base models are near chance
  (0.25); a LoRA has to memorise them. Evaluated on the training questions.
* ``addition`` (a skill that generalises): ``What is a plus b?`` with numeric choices near
  the sum. The corpus never uses ``plus``; it does teach the number line (counting,
  successors, comparisons). Trained on a subset of the pairs, evaluated on held-out pairs.

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
from dataclasses import dataclass
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

    def qa_items(self) -> list[tuple[str, str]]:
        """``(question, correct answer text)`` of the training records (what a LoRA is trained on)."""
        return [(r["question"], answer_text(r)) for r in self.train]

    def write(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write ``train.jsonl`` and ``eval.jsonl`` under ``directory``; return the manifest entry."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "train.jsonl", self.train)
        write_jsonl(out / "eval.jsonl", self.eval)
        return {
            "kind": self.kind,
            "description": self.description,
            "train": str(out / "train.jsonl"),
            "eval": str(out / "eval.jsonl"),
            "n_train": len(self.train),
            "n_eval": len(self.eval),
            "eval_is_train": self.train == self.eval,
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


def facts_task(seed: int = 0, people: int = 50, names: Sequence[str] | None = None) -> Task:
    """``people`` x 4 relations memorised facts; evaluation = training questions.

    ``names``: who the facts are about (default: the zoo corpus's first names, :data:`PEOPLE`).
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
    return Task(
        "facts",
        "memorisation",
        out,
        out,
        f"{people} invented people x {len(RELATIONS)} attributes ({', '.join(RELATIONS)}), absent from the "
        "pretraining corpus; evaluated on the training questions",
    )


def addition_task(seed: int = 0, max_operand: int = 24, n_eval: int = 200, offsets: int = 4) -> Task:
    """``a plus b`` for ``0 <= a, b <= max_operand``; ``n_eval`` held-out pairs, the rest for training.

    Distractors are ``sum + d`` for distinct non-zero ``|d| <= offsets`` (kept >= 0), so a model
    needs the exact sum, not just its size.
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
    eval_records, train_records = records[:n_eval], records[n_eval:]
    return Task(
        "addition",
        "held-out skill",
        train_records,
        eval_records,
        f"a plus b for 0 <= a, b <= {max_operand}, distractors within +-{offsets} of the sum; "
        f"trained on {len(train_records)} pairs, evaluated on {len(eval_records)} held-out pairs",
    )


def default_tasks(seed: int = 0) -> list[Task]:
    return [facts_task(seed), addition_task(seed)]


def write_jsonl(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> Path:
    out = Path(path)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out
