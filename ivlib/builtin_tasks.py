"""Tasks whose data ivlib generates itself, so demos and tests run offline with no third-party text.

`review_sentiment` is built to be learnable but not trivial for a small model: besides plain
sentences it has negations ("was not great") and contrast clauses ("X was great, but Y was
awful") whose label follows the last clause. A 135M model gets the plain ones from one
demonstration and stumbles on the rest, which leaves room for a steering method to help.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

ITEMS = [
    "food",
    "service",
    "movie",
    "hotel room",
    "phone",
    "book",
    "concert",
    "staff",
    "plot",
    "ending",
    "battery",
    "screen",
    "music",
    "coffee",
    "price",
    "soup",
    "show",
    "game",
    "camera",
    "album",
    "seats",
    "view",
    "dessert",
    "driver",
    "lecture",
    "trip",
    "app",
]
POSITIVE = [
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "charming",
    "great",
    "fantastic",
    "lovely",
    "brilliant",
    "pleasant",
    "impressive",
    "enjoyable",
    "perfect",
    "amazing",
]
NEGATIVE = [
    "awful",
    "terrible",
    "dreadful",
    "boring",
    "disappointing",
    "horrible",
    "bland",
    "poor",
    "mediocre",
    "unpleasant",
    "annoying",
    "painful",
    "useless",
    "dull",
]
ADVERBS = ["", "", "really ", "quite ", "truly ", "rather ", "very "]
LABELS = ["negative", "positive"]


def _clause(rng: random.Random, item: str, positive: bool, allow_negation: bool) -> str:
    """A clause about `item` whose meaning (after any negation) has the given polarity."""
    negate = allow_negation and rng.random() < 0.5
    surface = positive != negate  # the adjective's own polarity
    adj = rng.choice(POSITIVE if surface else NEGATIVE)
    adv = rng.choice(ADVERBS)
    if negate:
        return f"the {item} was not {adv}{adj}"
    return f"the {item} was {adv}{adj}"


def _review(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    kind = rng.random()
    item, other = rng.sample(ITEMS, 2)
    if kind < 0.35:  # plain
        text = _clause(rng, item, bool(label), allow_negation=False)
        sentence = text[0].upper() + text[1:] + "."
    elif kind < 0.6:  # negated
        text = _clause(rng, item, bool(label), allow_negation=True)
        sentence = text[0].upper() + text[1:] + "."
    else:  # contrast: the last clause decides
        first = _clause(rng, item, not label, allow_negation=rng.random() < 0.3)
        last = _clause(rng, other, bool(label), allow_negation=rng.random() < 0.3)
        if rng.random() < 0.5:
            sentence = f"{first[0].upper() + first[1:]}, but {last}."
        else:
            sentence = f"Although {first}, {last}."
    return sentence, label


def review_sentiment(sizes: dict[str, int], seed: int = 1234) -> tuple[dict[str, dict[str, list[Any]]], list[str]]:
    """Deterministic splits of generated reviews: {split: {"text": [...], "label": [...]}}, names."""
    rng = random.Random(seed)
    splits: dict[str, dict[str, list[Any]]] = {}
    for split, n in sizes.items():
        rows = [_review(rng) for _ in range(n)]
        splits[split] = {"text": [t for t, _ in rows], "label": [y for _, y in rows]}
    return splits, LABELS


BUILTIN_TASKS: dict[str, Callable[[], tuple[dict[str, dict[str, list[Any]]], list[str]]]] = {
    "review_sentiment": lambda: review_sentiment({"train": 4000, "validation": 1000, "test": 2000}),
}


def vocabulary() -> list[str]:
    """Every word the built-in tasks use: the tiny models' tokenizer gives each one token."""
    words = set(LABELS) | set(POSITIVE) | set(NEGATIVE)
    words |= {w for item in ITEMS for w in item.split()}
    words |= {a.strip() for a in ADVERBS if a.strip()}
    words |= {"the", "The", "was", "not", "but", "Although", "bad", "good"}
    return sorted(words)
