"""The real-model benchmark's ARC-format tasks, designed so that a 135M-parameter model is near chance.

* ``facts`` (memorisation): 50 invented people (syllable-built names that no pretraining text
  contains) x 4 attributes (favourite colour, home city, pet, job) = 200 facts, built by
  :func:`loraport.zoo.tasks.facts_task`. Evaluated on the training questions.
* ``bins`` (a skill scored on held-out items): a word-sorting game with invented bin names.
  Each of 8 everyday categories (animals, fruits, vehicles, ...) has its own bin (``blick``,
  ``drany``, ...): ``In the sorting game, which bin does "tiger" go in?``. The bin names carry
  no meaning, so a base model is at chance; a LoRA that learns the category -> bin map on half
  of the words of each category answers the other half (held out) only if it uses what the
  base model knows about the words. 20 + 20 words per category.

Every record has 4 choices with the answer's position balanced over A-D; ``facts``
distractors come from the answer's category with similar lengths, ``bins`` distractors are
other bins (all bin names have 5 letters), so ``acc`` and ``acc_norm`` are both meaningful.

Example::

    >>> task = bins_task(seed=0)
    >>> len(task.train), len(task.eval)
    (160, 160)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..zoo.tasks import Task, arc_record, facts_task

CATEGORIES: dict[str, list[str]] = {
    "animal": [
        "dog", "cat", "horse", "cow", "sheep", "goat", "pig", "lion", "tiger", "bear",
        "wolf", "fox", "rabbit", "mouse", "deer", "elephant", "giraffe", "zebra", "monkey", "camel",
        "donkey", "squirrel", "kangaroo", "leopard", "otter", "beaver", "hippo", "rhino", "panda", "koala",
        "badger", "moose", "hamster", "gorilla", "cheetah", "buffalo", "hedgehog", "raccoon", "bison", "llama",
    ],
    "fruit": [
        "apple", "banana", "orange", "pear", "peach", "plum", "cherry", "grape", "lemon", "lime",
        "mango", "melon", "papaya", "kiwi", "apricot", "fig", "guava", "pineapple", "coconut", "strawberry",
        "raspberry", "blueberry", "blackberry", "cranberry", "watermelon", "grapefruit", "tangerine", "pomegranate",
        "nectarine", "lychee", "persimmon", "avocado", "quince", "gooseberry", "mulberry", "clementine",
        "cantaloupe", "kumquat", "elderberry", "currant",
    ],
    "vehicle": [
        "car", "bus", "truck", "train", "bicycle", "motorcycle", "airplane", "helicopter", "boat", "ship",
        "tram", "taxi", "van", "scooter", "tractor", "submarine", "yacht", "canoe", "ferry", "jeep",
        "limousine", "ambulance", "sailboat", "glider", "rocket", "subway", "minivan", "trolley", "kayak", "sled",
        "bulldozer", "forklift", "hovercraft", "wagon", "carriage", "moped", "caravan", "airship", "speedboat",
        "raft",
    ],
    "clothing": [
        "shirt", "trousers", "jeans", "skirt", "dress", "jacket", "coat", "sweater", "scarf", "glove",
        "sock", "shoe", "boot", "hat", "cap", "belt", "necktie", "blouse", "vest", "shorts",
        "hoodie", "pyjamas", "sandal", "slipper", "cardigan", "overalls", "raincoat", "tuxedo", "bikini", "apron",
        "mitten", "beret", "poncho", "kimono", "leggings", "tights", "waistcoat", "blazer", "sneaker", "bonnet",
    ],
    "tool": [
        "hammer", "screwdriver", "wrench", "saw", "drill", "chisel", "pliers", "axe", "shovel", "rake",
        "hoe", "spanner", "crowbar", "mallet", "trowel", "sander", "scissors", "pickaxe", "hacksaw", "sledgehammer",
        "clamp", "vise", "awl", "spade", "pitchfork", "shears", "scythe", "sickle", "jigsaw", "chainsaw",
        "wheelbarrow", "ladder", "tweezers", "hatchet", "grinder", "plunger", "funnel", "toolbox", "stapler",
        "paintbrush",
    ],
    "body part": [
        "head", "arm", "leg", "hand", "foot", "finger", "toe", "knee", "elbow", "shoulder",
        "neck", "nose", "ear", "eye", "mouth", "lip", "tongue", "tooth", "chin", "cheek",
        "forehead", "wrist", "ankle", "heel", "thumb", "hip", "chest", "stomach", "spine", "skull",
        "liver", "heart", "lung", "kidney", "brain", "eyebrow", "eyelid", "thigh", "shin", "jaw",
    ],
    "instrument": [
        "piano", "guitar", "violin", "cello", "flute", "trumpet", "drum", "harp", "clarinet", "saxophone",
        "trombone", "oboe", "bassoon", "tuba", "banjo", "ukulele", "mandolin", "harmonica", "accordion", "xylophone",
        "harpsichord", "tambourine", "cymbal", "bagpipes", "sitar", "lute", "piccolo", "viola", "bugle", "marimba",
        "glockenspiel", "kazoo", "synthesizer", "zither", "didgeridoo", "bongo", "castanets", "gong", "timpani",
        "balalaika",
    ],
    "country": [
        "France", "Germany", "Italy", "Spain", "Portugal", "Brazil", "Argentina", "Mexico", "Canada", "Japan",
        "China", "India", "Russia", "Egypt", "Kenya", "Nigeria", "Australia", "Sweden", "Norway", "Finland",
        "Poland", "Greece", "Turkey", "Iran", "Peru", "Chile", "Colombia", "Vietnam", "Thailand", "Indonesia",
        "Ireland", "Austria", "Switzerland", "Belgium", "Netherlands", "Denmark", "Morocco", "Ethiopia", "Cuba",
        "Pakistan",
    ],
}  # fmt: skip
# One invented bin per category, all of 5 letters (acc_norm divides by the choice's length).
BINS: dict[str, str] = {
    "animal": "blick",
    "fruit": "drany",
    "vehicle": "fesko",
    "clothing": "glump",
    "tool": "korvi",
    "body part": "mazzo",
    "instrument": "plenk",
    "country": "trusp",
}
BINS_QUESTION = 'In the sorting game, which bin does "{word}" go in?'

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "t", "tr", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "n", "l", "r", "s", "k", "m", "nd"]


def invented_names(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct two-part names built from syllables (``"Trovan Keldisk"``), seeded."""
    rng = random.Random(seed)

    def word(syllables: int) -> str:
        text = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        return text.capitalize()

    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = f"{word(2)} {word(rng.choice((2, 3)))}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def real_facts_task(seed: int = 0, people: int = 50) -> Task:
    """``people`` invented names x 4 attributes: the zoo's ``facts`` task on names no model has seen."""
    task = facts_task(seed, people=people, names=invented_names(people, seed))
    task.description = task.description.replace("invented people", "invented people (syllable-built names)")
    return task


def bins_task(seed: int = 0, train_per_category: int = 20, categories: Sequence[str] | None = None) -> Task:
    """The word-sorting game: ``train_per_category`` words of each category to train on, the rest held out.

    Every record's choices are the right bin and 3 other bins drawn at random; the right
    bin's position is balanced over A-D within the training and within the evaluation set.
    """
    rng = random.Random(seed)
    chosen = list(categories) if categories is not None else list(CATEGORIES)
    train_items: list[tuple[str, str]] = []
    eval_items: list[tuple[str, str]] = []
    for category in chosen:
        words = list(CATEGORIES[category])
        rng.shuffle(words)
        train_items += [(w, category) for w in words[:train_per_category]]
        eval_items += [(w, category) for w in words[train_per_category:]]

    def records(items: list[tuple[str, str]], split: str) -> list[dict]:
        rng.shuffle(items)
        positions = [i % 4 for i in range(len(items))]
        rng.shuffle(positions)
        out = []
        for i, ((word, category), position) in enumerate(zip(items, positions, strict=True)):
            others = rng.sample([BINS[c] for c in chosen if c != category], 3)
            question = BINS_QUESTION.format(word=word)
            out.append(arc_record(f"bins-{split}-{i:04d}", question, BINS[category], others, position))
        return out

    train, held_out = records(train_items, "train"), records(eval_items, "eval")
    return Task(
        "bins",
        "held-out skill",
        train,
        held_out,
        f"sort a word into the invented bin of its category ({len(chosen)} categories: {', '.join(chosen)}); "
        f"trained on {len(train)} words, evaluated on {len(held_out)} held-out words",
    )


def real_tasks(seed: int = 0) -> list[Task]:
    """The two tasks of the real-model benchmark: ``facts`` and ``bins``."""
    return [real_facts_task(seed), bins_task(seed)]
