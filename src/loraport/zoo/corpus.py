"""The zoo's procedural corpus and its word-level tokenizer.

Generic English-like sentences from templates over a fixed vocabulary (people, places,
objects, colours, animals, numbers, simple relations), plus question/answer text in the
``Question: ...\\nAnswer: ...`` format so that base models know the evaluation format.
Everything is drawn from a seeded :class:`random.Random`: the same seed gives the same text.

The corpus holds a little consistent *world knowledge* (what colour an apple is, which
country a city is in, what comes after 7, which of two numbers is larger) and nothing about
the zoo's tasks (:mod:`loraport.zoo.tasks`): people's favourite colours, homes, pets and
jobs never appear, and neither does the word ``plus``.

Two *styles* share the vocabulary: ``"base"`` (pretraining) and ``"shifted"`` (another
template mix and other word frequencies, used to drift the derivatives of S).

Example::

    >>> gen = CorpusGenerator(seed=0)
    >>> len(gen.sentences(3))
    3
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PEOPLE = [
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack",
    "Kate", "Leo", "Mia", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Will", "Xena", "Yusuf", "Zoe", "Alba", "Bruno", "Cora", "Dario",
    "Elsa", "Finn", "Gina", "Hugo", "Ines", "Jonas", "Kira", "Luca", "Mara", "Nils",
    "Omar", "Pia", "Rafael", "Sofia", "Theo", "Ulla", "Victor", "Wanda", "Yara", "Zack",
    "Amir", "Bella", "Carl", "Dina", "Emil", "Fiona", "Gus", "Hana", "Ivan", "Julia",
]  # fmt: skip
CITY_COUNTRY = {
    "Paris": "France", "Lyon": "France", "Berlin": "Germany", "Munich": "Germany",
    "Rome": "Italy", "Milan": "Italy", "Madrid": "Spain", "Seville": "Spain",
    "Lisbon": "Portugal", "Porto": "Portugal", "Vienna": "Austria", "Oslo": "Norway",
    "Dublin": "Ireland", "Athens": "Greece", "Prague": "Czechia", "Warsaw": "Poland",
}  # fmt: skip
CITIES = list(CITY_COUNTRY)
PLACES = ["park", "market", "school", "library", "garden", "station", "beach", "museum", "river", "bakery", "forest",
          "harbour"]  # fmt: skip
OBJECT_COLOUR = {
    "apple": "red", "banana": "yellow", "lemon": "yellow", "grass": "green", "leaf": "green",
    "sky": "blue", "sea": "blue", "snow": "white", "milk": "white", "coal": "black", "night": "black",
    "carrot": "orange", "pumpkin": "orange", "plum": "purple", "grape": "purple", "cherry": "red",
    "chocolate": "brown", "bark": "brown", "rose": "pink", "flamingo": "pink",
}  # fmt: skip
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "pink", "grey", "gold"]
THINGS = ["ball", "book", "cup", "hat", "box", "chair", "lamp", "kite", "bag", "coat", "bike", "clock", "key",
          "pen", "shoe", "boat"]  # fmt: skip
FURNITURE = ["table", "shelf", "bed", "desk", "floor", "sofa"]
ANIMAL_SOUND = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "horse": "neighs", "sheep": "bleats",
    "lion": "roars", "owl": "hoots", "frog": "croaks", "bee": "buzzes", "snake": "hisses", "wolf": "howls",
}  # fmt: skip
ANIMALS = list(ANIMAL_SOUND)
JOBS = ["baker", "doctor", "farmer", "pilot", "teacher", "painter", "singer", "driver", "nurse", "tailor", "writer",
        "miner"]  # fmt: skip
FOODS = ["bread", "soup", "rice", "cheese", "pasta", "salad", "cake", "fish", "pie", "eggs"]
VERBS_MOVE = ["walked", "ran", "drove", "went", "cycled", "travelled"]
VERBS_OBJ = ["found", "bought", "lost", "painted", "carried", "sold", "borrowed", "cleaned"]
ADJECTIVES = ["big", "small", "old", "new", "happy", "quiet", "bright", "heavy", "soft", "cold", "warm", "tall"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = [str(i) for i in range(100)]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]

Template = Callable[[random.Random], str]


def _pick(rng: random.Random, items: list[str], weights: list[float] | None) -> str:
    return rng.choices(items, weights)[0] if weights else rng.choice(items)


class CorpusGenerator:
    """Seeded sentence generator.

    Args:
        seed: the random seed; same seed, same text.
        style: ``"base"`` or ``"shifted"`` (other template mix, Zipf-like word frequencies
            over a seed-independent permutation of each word list).
        qa_fraction: share of question/answer items among the generated lines.
    """

    def __init__(self, seed: int = 0, style: str = "base", qa_fraction: float | None = None) -> None:
        if style not in ("base", "shifted"):
            raise ValueError(f"style must be 'base' or 'shifted', got {style!r}")
        self.rng = random.Random(seed)
        self.style = style
        self.qa_fraction = qa_fraction if qa_fraction is not None else (0.25 if style == "base" else 0.15)
        self._weights: dict[int, list[float]] = {}
        statements: list[tuple[Template, float]] = [
            (self._movement, 3), (self._objects, 3), (self._colour_fact, 2), (self._counting, 1),
            (self._comparison, 1), (self._successor, 1), (self._animal, 2), (self._city, 2), (self._meal, 2),
            (self._schedule, 1), (self._dialogue, 1),
        ]  # fmt: skip
        questions: list[tuple[Template, float]] = [
            (self._qa_colour, 2), (self._qa_country, 2), (self._qa_after, 1), (self._qa_larger, 1),
            (self._qa_sound, 2), (self._qa_count, 1),
        ]  # fmt: skip
        if style == "shifted":
            # another mix: more numbers, animals and dialogue; fewer objects and movements
            shifted = {"_movement": 1, "_objects": 1, "_counting": 3, "_comparison": 3, "_animal": 4, "_dialogue": 4,
                       "_schedule": 3, "_meal": 4}  # fmt: skip
            statements = [(t, shifted.get(t.__name__, w)) for t, w in statements]
        self._statements, self._statement_weights = zip(*statements, strict=True)
        self._questions, self._question_weights = zip(*questions, strict=True)

    # -- word choice ------------------------------------------------------------------
    def w(self, items: list[str]) -> str:
        """A word from ``items``: uniform in the base style, Zipf-like in the shifted one."""
        if self.style == "base":
            return self.rng.choice(items)
        key = id(items)
        if key not in self._weights:
            order = list(range(len(items)))
            random.Random(len(items) * 7919).shuffle(order)  # fixed, seed-independent ranking
            self._weights[key] = [1.0 / (1 + order[i]) ** 0.8 for i in range(len(items))]
        return _pick(self.rng, items, self._weights[key])

    def number(self, hi: int = 99) -> int:
        return self.rng.randint(0, hi)

    # -- statements -------------------------------------------------------------------
    def _movement(self, rng: random.Random) -> str:
        who, other = self.w(PEOPLE), self.w(PEOPLE)
        return rng.choice([
            f"{who} {self.w(VERBS_MOVE)} to the {self.w(PLACES)} with {other} .",
            f"on {self.w(DAYS)} {who} {self.w(VERBS_MOVE)} to the {self.w(PLACES)} .",
            f"{who} and {other} {self.w(VERBS_MOVE)} home from the {self.w(PLACES)} .",
        ])  # fmt: skip

    def _objects(self, rng: random.Random) -> str:
        who = self.w(PEOPLE)
        return rng.choice([
            f"the {self.w(COLOURS)} {self.w(THINGS)} is on the {self.w(FURNITURE)} .",
            f"{who} {self.w(VERBS_OBJ)} a {self.w(ADJECTIVES)} {self.w(THINGS)} at the {self.w(PLACES)} .",
            f"{who} has {self.number(20)} {self.w(THINGS)} and {self.number(20)} {self.w(FURNITURE)} .",
            f"there is a {self.w(ADJECTIVES)} {self.w(COLOURS)} {self.w(THINGS)} under the {self.w(FURNITURE)} .",
        ])  # fmt: skip

    def _colour_fact(self, rng: random.Random) -> str:
        obj = self.w(list(OBJECT_COLOUR))
        return rng.choice([f"the {obj} is {OBJECT_COLOUR[obj]} .", f"a {OBJECT_COLOUR[obj]} {obj} ."])

    def _counting(self, rng: random.Random) -> str:
        start, length = self.number(90), rng.randint(3, 8)
        return "count : " + " ".join(str(i) for i in range(start, min(100, start + length))) + " ."

    def _comparison(self, rng: random.Random) -> str:
        a, b = rng.sample(range(100), 2)
        return f"{a} is more than {b} ." if a > b else f"{a} is less than {b} ."

    def _successor(self, rng: random.Random) -> str:
        n = self.number(98)
        return rng.choice([f"after {n} comes {n + 1} .", f"before {n + 1} comes {n} ."])

    def _animal(self, rng: random.Random) -> str:
        animal = self.w(ANIMALS)
        return rng.choice([
            f"the {animal} {ANIMAL_SOUND[animal]} .",
            f"{self.w(PEOPLE)} saw a {self.w(ADJECTIVES)} {animal} near the {self.w(PLACES)} .",
            f"the {animal} {ANIMAL_SOUND[animal]} at night in the {self.w(PLACES)} .",
        ])  # fmt: skip

    def _city(self, rng: random.Random) -> str:
        city = self.w(CITIES)
        return rng.choice([
            f"{city} is a city in {CITY_COUNTRY[city]} .",
            f"{self.w(PEOPLE)} visited {city} on {self.w(DAYS)} .",
            f"the {self.w(PLACES)} in {city} is {self.w(ADJECTIVES)} .",
        ])  # fmt: skip

    def _meal(self, rng: random.Random) -> str:
        return rng.choice([
            f"{self.w(PEOPLE)} ate {self.w(FOODS)} with {self.w(PEOPLE)} .",
            f"the {self.w(JOBS)} made {self.w(FOODS)} for {self.number(12)} people .",
        ])  # fmt: skip

    def _schedule(self, rng: random.Random) -> str:
        return f"on {self.w(DAYS)} the {self.w(JOBS)} met {self.w(PEOPLE)} at the {self.w(PLACES)} ."

    def _dialogue(self, rng: random.Random) -> str:
        who, other = self.w(PEOPLE), self.w(PEOPLE)
        return rng.choice([
            f"{who} said : the {self.w(THINGS)} is {self.w(ADJECTIVES)} .",
            f"{who} asked {other} : where is the {self.w(THINGS)} ? {other} said : on the {self.w(FURNITURE)} .",
        ])  # fmt: skip

    # -- question / answer ------------------------------------------------------------
    def _qa_colour(self, rng: random.Random) -> tuple[str, str]:
        obj = self.w(list(OBJECT_COLOUR))
        return f"What colour is the {obj}?", OBJECT_COLOUR[obj]

    def _qa_country(self, rng: random.Random) -> tuple[str, str]:
        city = self.w(CITIES)
        return f"In which country is {city}?", CITY_COUNTRY[city]

    def _qa_after(self, rng: random.Random) -> tuple[str, str]:
        n = self.number(98)
        return f"What number comes after {n}?", str(n + 1)

    def _qa_larger(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.sample(range(100), 2)
        return f"Which number is larger, {a} or {b}?", str(max(a, b))

    def _qa_sound(self, rng: random.Random) -> tuple[str, str]:
        animal = self.w(ANIMALS)
        return f"What does the {animal} do?", f"it {ANIMAL_SOUND[animal]}"

    def _qa_count(self, rng: random.Random) -> tuple[str, str]:
        who, thing, n = self.w(PEOPLE), self.w(THINGS), self.number(20)
        return f"{who} has {n} {thing}. How many {thing} does {who} have?", str(n)

    # -- output -----------------------------------------------------------------------
    def line(self) -> str:
        """One line: a statement, or a ``Question: q\\nAnswer: a`` item (with its newline)."""
        rng = self.rng
        if rng.random() < self.qa_fraction:
            question, answer = rng.choices(self._questions, self._question_weights)[0](rng)
            return qa_text(question, answer)
        return rng.choices(self._statements, self._statement_weights)[0](rng)

    def sentences(self, n: int) -> list[str]:
        return [self.line() for _ in range(n)]


def qa_text(question: str, answer: str) -> str:
    """A training text in the evaluation format: ``"Question: {q}\\nAnswer: {a}"``."""
    return f"Question: {question}\nAnswer: {answer}"


def vocabulary() -> list[str]:
    """Every word the corpus and the tasks use, in a fixed order (specials first)."""
    words: list[str] = []
    lists: Iterable[Iterable[str]] = (
        PEOPLE, CITIES, CITY_COUNTRY.values(), PLACES, OBJECT_COLOUR, COLOURS, THINGS, FURNITURE, ANIMALS,
        ANIMAL_SOUND.values(), JOBS, FOODS, VERBS_MOVE, VERBS_OBJ, ADJECTIVES, DAYS, NUMBERS,
    )  # fmt: skip
    for items in lists:
        words.extend(items)
    function_words = (
        "the a an and with to on at in of from for near under home is are was said asked saw ate made met has have "
        "there where how many does do it comes after before count more less than number larger or city visited "
        "people night what which who Question Answer What Which Where In How colour country favourite live lives "
        "pet job work works as plus see"
    )
    words.extend(function_words.split())
    words.extend(list(".,:;?!'"))
    seen: set[str] = set(SPECIAL_TOKENS)
    out = list(SPECIAL_TOKENS)
    for word in words:
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def build_tokenizer(words: list[str] | None = None) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: whitespace split, punctuation isolated, no BOS added.

    Because words and punctuation are split at whitespace and every punctuation mark is a
    token of its own, ``encode(context + " " + choice)`` always begins with ``encode(context)``
    (the property the evaluator and lm-eval rely on to split context from continuation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or vocabulary()
    vocab = {word: i for i, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=128,
        padding_side="right",
    )


def write_lines(path: str | os.PathLike[str], lines: Iterable[str]) -> Path:
    """One item per line; a QA item's newline becomes a space (the same tokens for this tokenizer)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
    return out
