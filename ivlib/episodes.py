"""Seeded n-way k-shot episodes.

Queries and demonstrations come from two separate random streams keyed by (seed, split, purpose):
the queries depend only on those, so zero-shot, ICL and every steered method are scored on the
very same queries, and changing the shot count changes the demonstrations, not the questions.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import UsageError
from .settings import Setting
from .tasks import Split

# The order of each evaluation prompt's demonstrations. A protocol setting rather than a method's:
# every method's prompts are built here. "class" is the IV release's 1-shot evaluation order (it
# shuffles only above one shot, and its ICL baseline always); extraction episodes stay shuffled.
DEMO_ORDERS = ("shuffled", "class")
DEMO_ORDER = Setting(
    "demo_order",
    str,
    "shuffled",
    "order of the demonstrations in evaluation and selection prompts: shuffled, or sorted by class "
    "(the IV release's 1-shot prompts); fitting episodes stay shuffled",
    choices=DEMO_ORDERS,
)


DEMO_DRAWS = ("per-class", "any")  # --shot of each class, or --shot in all regardless of class
DEMO_SOURCES = ("split", "train")  # episodic demonstrations from the evaluated split, or from train
QUERY_DRAWS = ("random", "each")  # queries at random with replacement, or every row in turn


@dataclass(frozen=True)
class Drawing:
    """How an evaluation's episodes are drawn (the protocol's `demo_draw`, `demo_source`, `queries`);
    the default is the IV paper's, and StaICC's is `Drawing(False, True, True)`."""

    per_class: bool = True  # False: `shot` demonstrations in all, whatever their classes
    from_train: bool = False  # demonstrations from train, not from the split the queries come from
    each_query: bool = False  # queries 0, 1, ..., N - 1, 0, 1, ... instead of random draws


PAPER = Drawing()


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # class index, or the correct option's index for multiple choice
    options: tuple[str, ...] | None = None  # multiple choice: the answers to choose from
    index: int | None = None  # the example's row in its split (what a samples log records), if known
    answer: str | None = None  # open vocabulary: its answer (label is then 0: "the answer")


@dataclass(frozen=True)
class Episode:
    demos: tuple[Example, ...]  # shuffled (or by class: `in_order`), `shot` per class
    query: Example

    def query_only(self) -> Episode:
        return Episode((), self.query)


def _rng(seed: int, stream: str, part: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), part])


def check_shots(
    split: Split, split_name: str, n_classes: int, shot: int, label_words: list[str], flag: str, per_class: bool = True
) -> None:
    """A query must stay distinct from its demonstrations, so each class needs shot + 1 examples (shot + 1
    in all where demonstrations are drawn regardless of class)."""
    if shot < 0:
        raise UsageError(f"{flag} {shot} is negative; accepted: 0 or more")
    if split.options is not None or split.answers is not None or not per_class:  # `shot` in all, not per class
        if len(split.texts) < shot + 1:
            raise UsageError(
                f"{flag} {shot} is too large for split '{split_name}' ({len(split.texts)} examples); "
                f"accepted: at most {len(split.texts) - 1}"
            )
        return
    counts = split.class_counts(n_classes)
    smallest = int(counts.argmin())
    if shot > 0 and counts[smallest] < shot + 1:
        raise UsageError(
            f"{flag} {shot} is too large for split '{split_name}': class '{label_words[smallest]}' has "
            f"{counts[smallest]} examples; accepted: at most {max(int(counts[smallest]) - 1, 0)}"
        )


def sample_episodes(
    split: Split,
    n_classes: int,
    shot: int,
    n: int,
    seed: int,
    stream: str,
    drawing: Drawing = PAPER,
    train: Split | None = None,
) -> list[Episode]:
    """`n` episodes with `shot` demos per class (or in all: `drawing`); demos never include the query's
    example or text. The queries depend only on (seed, stream) and `drawing.each_query`, never on the
    shot or the demonstrations' draw, so every method of a run answers the same ones."""
    if n <= 0:
        raise UsageError(f"episode count {n} must be positive")
    if drawing.each_query:
        queries = np.arange(n) % len(split.labels)
    else:
        queries = _rng(seed, stream, 0).integers(0, len(split.labels), size=n)
    if drawing.from_train and shot > 0:
        if train is None:
            raise ValueError("demonstrations from train need the train split")
        return _from_pool(split, train, n_classes, shot, queries, _rng(seed, stream, 2000 + shot), drawing)
    if split.options is not None or split.answers is not None or not drawing.per_class:
        return _pooled_episodes(split, shot, queries, _rng(seed, stream, 1000 + shot))
    return _per_class_episodes(split, n_classes, shot, queries, _rng(seed, stream, 1000 + shot))


def _per_class_episodes(
    split: Split, n_classes: int, shot: int, queries: np.ndarray, rng: np.random.Generator
) -> list[Episode]:
    """Each query with `shot` other examples of each class of its own split, shuffled together."""
    labels, texts = split.labels, split.texts
    if shot == 0:
        return [Episode((), Example(texts[q], int(labels[q]), index=int(q))) for q in queries]
    pools = [np.flatnonzero(labels == c) for c in range(n_classes)]
    episodes = []
    for q in queries:
        q_text = texts[q]
        chosen: list[int] = []
        keep = lambda i, q=q, q_text=q_text: i != q and texts[i] != q_text  # noqa: E731
        for pool in pools:
            chosen.extend(_distinct(pool, shot, rng, keep, "examples in a class"))
        order = rng.permutation(len(chosen))
        demos = tuple(Example(texts[chosen[i]], int(labels[chosen[i]]), index=chosen[i]) for i in order)
        episodes.append(Episode(demos, Example(q_text, int(labels[q]), index=int(q))))
    return episodes


def _distinct(
    rows: np.ndarray, shot: int, rng: np.random.Generator, keep: Callable[[int], bool], what: str
) -> list[int]:
    """`shot` of `rows` at random that `keep` admits (none sharing the query's row or text): a few more
    drawn than needed, and a scan of all of them in random order in the rare case too few pass."""
    picks = rows[rng.choice(len(rows), size=min(len(rows), shot + 3), replace=False)]
    good = [int(i) for i in picks if keep(int(i))][:shot]
    if len(good) < shot:  # rare: many duplicates of the query's text
        good = [int(i) for i in rng.permutation(rows) if keep(int(i))][:shot]
    if len(good) < shot:
        raise UsageError(f"not enough distinct {what} for {shot} shots")
    return good


def in_order(episodes: list[Episode], order: str) -> list[Episode]:
    """The same episodes with their demonstrations in `order` (a DEMO_ORDERS value).

    Applied after sampling, so both orders draw the same demonstrations and queries (the random
    streams are untouched): a paired comparison of the order alone. "class" sorts stably by label,
    so within a class the drawn order is kept.
    """
    if DEMO_ORDER.check(order) == "shuffled":
        return episodes
    return [Episode(tuple(sorted(e.demos, key=lambda d: d.label)), e.query) for e in episodes]


def example_at(split: Split, i: int) -> Example:
    """Row `i` of a split as an example: its class, or its options (multiple choice) or answer (open)."""
    options = None if split.options is None else tuple(split.options[i])
    answer = None if split.answers is None else split.answers[i]
    return Example(split.texts[i], int(split.labels[i]), options, index=i, answer=answer)


def _pooled_episodes(split: Split, shot: int, queries: np.ndarray, rng: np.random.Generator) -> list[Episode]:
    """Multiple-choice and open-vocabulary tasks have no classes to draw per: `shot` random other
    questions (or inputs) from the whole split, none with the query's text."""

    def example(i: int) -> Example:
        return example_at(split, i)

    rows = np.arange(len(split.texts))
    episodes = []
    for q in queries:
        keep = lambda i, q=q: i != q and split.texts[i] != split.texts[q]  # noqa: E731
        good = _distinct(rows, shot, rng, keep, "questions")
        episodes.append(Episode(tuple(example(i) for i in good), example(int(q))))
    return episodes


def _from_pool(
    split: Split,
    pool: Split,
    n_classes: int,
    shot: int,
    queries: np.ndarray,
    rng: np.random.Generator,
    drawing: Drawing,
) -> list[Episode]:
    """Each query of `split` with demonstrations from another split, `pool` (train): `shot` per class,
    or `shot` distinct rows in all (StaICC's draw from its demonstration set). A demonstration never
    has the query's text; the splits' rows are different examples, so indices are not compared."""
    if drawing.per_class:
        groups = [np.flatnonzero(pool.labels == c) for c in range(n_classes)]
    else:
        groups = [np.arange(len(pool.texts))]  # one group: the draw is already in random order
    episodes = []
    for q in queries:
        q_text = split.texts[q]
        chosen: list[int] = []
        keep = lambda i, q_text=q_text: pool.texts[i] != q_text  # noqa: E731
        for rows in groups:
            chosen.extend(_distinct(rows, shot, rng, keep, "examples in train"))
        order = rng.permutation(len(chosen)) if drawing.per_class else np.arange(len(chosen))
        demos = tuple(example_at(pool, chosen[i]) for i in order)
        episodes.append(Episode(demos, example_at(split, int(q))))
    return episodes


FIXED_STREAM = "train/fixed"  # one demonstration set per seed and shot, whatever split is evaluated


def fixed_demos(
    train: Split, n_classes: int, shot: int, seed: int, avoid: set[str], label_words: list[str]
) -> tuple[Example, ...]:
    """One demonstration set for a whole evaluation (`--demos fixed`): `shot` per class from train
    (multiple choice: `shot` questions in all), shuffled, seeded by the run's seed alone.

    Texts in `avoid` (every evaluation split's texts) are never drawn, so no query of any -n, split
    or selection stream can meet itself among the demonstrations: the query stream stays the
    episodic one, and leak-freedom holds without skipping any query.
    """
    rng = _rng(seed, FIXED_STREAM, shot)
    usable = np.array([t not in avoid for t in train.texts], dtype=bool)
    if train.options is not None or train.answers is not None:
        pool = np.flatnonzero(usable)
        if len(pool) < shot:
            raise UsageError(
                f"--demos fixed --shot {shot}: train has {len(pool)} questions not found in validation or test; "
                f"accepted: --shot {len(pool)} or fewer"
            )
        chosen = [int(i) for i in rng.choice(pool, size=shot, replace=False)]
    else:
        chosen = []
        for c in range(n_classes):
            pool = np.flatnonzero((train.labels == c) & usable)
            if len(pool) < shot:
                raise UsageError(
                    f"--demos fixed --shot {shot}: class '{label_words[c]}' has {len(pool)} train examples not "
                    f"found in validation or test; accepted: --shot {len(pool)} or fewer"
                )
            chosen.extend(int(i) for i in rng.choice(pool, size=shot, replace=False))
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return tuple(example_at(train, i) for i in chosen)


def with_demos(episodes: list[Episode], demos: tuple[Example, ...]) -> list[Episode]:
    """The same queries, each with the one fixed demonstration set."""
    return [Episode(demos, e.query) for e in episodes]
