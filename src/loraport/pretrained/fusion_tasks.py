"""Two more ARC-format tasks for the real fusion benchmark, and dev splits of the real benchmark's two.

* ``smallest`` (a held-out skill): ``Which is the smallest number: 47, 82, 15, 63?`` with the
  four numbers as the choices. Every set of four distinct two-digit numbers is drawn once, so
  the training, dev and evaluation sets never share a question.
* ``json`` (an output-format adapter): ``What is the opposite of "hot"?`` answered as
  ``{"answer": "cold"}``. The choices are the right word and a wrong one, each plain and in
  that JSON form: a base model answers plainly (near 0), an adapter that learned the format
  scores what the base knows about antonyms. Split by word pair (both directions of a pair
  in one split), so the evaluated words are never trained on.
* :func:`with_dev`: ``facts`` and ``bins`` as the real benchmark wrote them, with a dev split
  taken out of the evaluation records (for ``facts`` these are trained questions, as all of
  its questions are; for ``bins`` held-out words), the rest being what is reported.

Every record has 4 choices with the answer's position balanced over A-D.

Example::

    >>> task = smallest_task(seed=0)
    >>> len(task.train), len(task.dev), len(task.eval)
    (320, 48, 160)
    >>> json_task(seed=0).train[0]["choices"]["text"][0][:1] in '{abcdefghijklmnopqrstuvwxyz'
    True
"""

from __future__ import annotations

import json
import random
from typing import Any

from ..zoo.tasks import Task, arc_record

# Common antonym pairs (both directions are asked).
ANTONYMS: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("old", "young"), ("tall", "short"), ("rich", "poor"),
    ("hard", "soft"), ("wet", "dry"), ("full", "empty"), ("early", "late"), ("strong", "weak"),
    ("thick", "thin"), ("clean", "dirty"), ("loud", "quiet"), ("good", "bad"), ("high", "low"),
    ("near", "far"), ("first", "last"), ("inside", "outside"), ("true", "false"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("give", "take"), ("begin", "end"), ("day", "night"),
    ("left", "right"), ("love", "hate"), ("black", "white"), ("north", "south"), ("east", "west"),
    ("top", "bottom"), ("front", "back"), ("above", "below"), ("before", "after"), ("safe", "dangerous"),
    ("easy", "difficult"), ("cheap", "expensive"), ("wide", "narrow"), ("deep", "shallow"), ("sweet", "sour"),
    ("smooth", "rough"), ("sharp", "blunt"), ("brave", "cowardly"), ("friend", "enemy"), ("arrive", "leave"),
    ("remember", "forget"), ("accept", "refuse"), ("asleep", "awake"), ("alive", "dead"), ("always", "never"),
    ("increase", "decrease"), ("maximum", "minimum"), ("major", "minor"), ("odd", "even"), ("positive", "negative"),
    ("public", "private"), ("question", "answer"), ("raise", "lower"), ("sunrise", "sunset"), ("tight", "loose"),
    ("war", "peace"), ("winter", "summer"), ("polite", "rude"), ("noisy", "silent"), ("generous", "selfish"),
    ("ancient", "modern"), ("huge", "tiny"), ("entrance", "exit"), ("import", "export"), ("attack", "defend"),
    ("borrow", "lend"), ("plus", "minus"), ("future", "past"), ("guilty", "innocent"), ("hero", "villain"),
    ("freeze", "melt"), ("forward", "backward"), ("success", "failure"), ("birth", "death"), ("sick", "healthy"),
    ("fat", "slim"), ("calm", "angry"), ("teacher", "student"), ("king", "queen"), ("boy", "girl"),
    ("laugh", "cry"), ("sink", "float"), ("whisper", "shout"), ("visible", "invisible"), ("possible", "impossible"),
    ("correct", "incorrect"), ("fresh", "stale"), ("wild", "tame"), ("mountain", "valley"), ("same", "different"),
    ("guest", "host"), ("dull", "bright"), ("solid", "liquid"), ("inhale", "exhale"), ("depart", "return"),
    ("floor", "ceiling"), ("ask", "tell"), ("come", "go"), ("add", "subtract"),
]  # fmt: skip
JSON_QUESTION = 'What is the opposite of "{word}"?'
SMALLEST_QUESTION = "Which is the smallest number: {numbers}?"


def as_json(word: str) -> str:
    """The adapter's answer format: ``{"answer": "cold"}``."""
    return json.dumps({"answer": word})


def _positions(rng: random.Random, count: int) -> list[int]:
    positions = [i % 4 for i in range(count)]
    rng.shuffle(positions)
    return positions


def smallest_task(seed: int = 0, n_train: int = 320, n_dev: int = 48, n_eval: int = 160) -> Task:
    """The smallest of four distinct two-digit numbers; disjoint sets for training, dev and evaluation."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    sets: list[list[int]] = []
    while len(sets) < n_train + n_dev + n_eval:
        numbers = rng.sample(range(10, 100), 4)
        key = tuple(sorted(numbers))
        if key not in seen:
            seen.add(key)
            sets.append(numbers)

    def records(chunk: list[list[int]], split: str) -> list[dict[str, Any]]:
        out = []
        for i, (numbers, position) in enumerate(zip(chunk, _positions(rng, len(chunk)), strict=True)):
            answer = min(numbers)
            others = [str(n) for n in numbers if n != answer]
            rng.shuffle(others)
            question = SMALLEST_QUESTION.format(numbers=", ".join(map(str, numbers)))
            out.append(arc_record(f"smallest-{split}-{i:04d}", question, str(answer), others, position))
        return out

    train = records(sets[:n_train], "train")
    dev = records(sets[n_train : n_train + n_dev], "dev")
    held_out = records(sets[n_train + n_dev :], "eval")
    return Task(
        "smallest",
        "held-out skill",
        train,
        held_out,
        f"the smallest of four distinct two-digit numbers (the choices); trained on {len(train)} sets, "
        f"evaluated on {len(held_out)} held-out sets ({len(dev)} more held out as the dev split)",
        dev,
    )


def json_task(seed: int = 0, n_dev_pairs: int = 12, n_eval_pairs: int = 40) -> Task:
    """Antonyms answered as ``{"answer": word}``; split by word pair, both directions asked."""
    rng = random.Random(seed)
    pairs = list(dict.fromkeys(ANTONYMS))
    rng.shuffle(pairs)
    vocabulary = sorted({w for pair in pairs for w in pair})
    eval_pairs, dev_pairs = pairs[:n_eval_pairs], pairs[n_eval_pairs : n_eval_pairs + n_dev_pairs]
    train_pairs = pairs[n_eval_pairs + n_dev_pairs :]

    def records(chosen: list[tuple[str, str]], split: str) -> list[dict[str, Any]]:
        items = [(a, b) for a, b in chosen] + [(b, a) for a, b in chosen]
        rng.shuffle(items)
        out = []
        for i, ((word, answer), position) in enumerate(zip(items, _positions(rng, len(items)), strict=True)):
            wrong = rng.choice([w for w in vocabulary if w not in (word, answer)])
            distractors = [answer, as_json(wrong), wrong]
            rng.shuffle(distractors)
            question = JSON_QUESTION.format(word=word)
            out.append(arc_record(f"json-{split}-{i:04d}", question, as_json(answer), distractors, position))
        return out

    train, dev, held_out = records(train_pairs, "train"), records(dev_pairs, "dev"), records(eval_pairs, "eval")
    return Task(
        "json",
        "output format",
        train,
        held_out,
        'antonyms answered in JSON ({"answer": "cold"}), the plain word and a wrong word (plain and in JSON) as '
        f"distractors; trained on {len(train)} questions ({len(train_pairs)} word pairs, both ways), evaluated "
        f"on {len(held_out)} of {len(eval_pairs)} held-out pairs ({len(dev)} more held out as the dev split)",
        dev,
    )


def with_dev(task: Task, n_dev: int) -> Task:
    """``task`` with its first ``n_dev`` evaluation records moved to the dev split (the rest are reported)."""
    return Task(task.name, task.kind, task.train, task.eval[n_dev:], task.description, task.eval[:n_dev])


__all__ = ["ANTONYMS", "as_json", "json_task", "smallest_task", "with_dev"]
