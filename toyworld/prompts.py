"""Toy world v3 prompts: the five categories of ``shared/TOYWORLD.md`` (GenEval in the toy world).

A :class:`Prompt` is what a prompt asks for -- its category, background, the objects it names
(colour or ``None``, shape) and, for ``position``, the relation of the first object to the second.
``Prompt.text`` writes it in the benchmark grammar ("an" before a vowel); :func:`parse_prompt` reads
any prompt of that grammar back ("a" or "an" accepted). :func:`prompt_set` gives the fixed
``tuning`` and ``benchmark`` sets (disjoint, from their own seeds): settings are chosen on the first,
figures are reported on the second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .world import COLOURS, SHAPES

CATEGORIES: tuple[str, ...] = ("single", "two_object", "counting", "colour_attr", "position")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# the fixed seeds of the two prompt sets; a prompt of one set never appears in the other
SET_SEEDS = {"tuning": 7, "benchmark": 2026}
TUNING_MAX = 48  # prompts per category the tuning set can hold (all excluded from the benchmark set)


@dataclass(frozen=True)
class Prompt:
    """What a world prompt asks for. ``objects`` lists (colour or None, shape) per object, repeated for
    ``counting``; for ``position`` the relation holds of ``objects[0]`` relative to ``objects[1]``."""

    category: str
    background: str
    objects: tuple[tuple[str | None, str], ...]
    relation: str | None = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; choose from {CATEGORIES}")
        for colour, shape in self.objects:
            if shape not in SHAPES:
                raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
            if colour is not None and colour not in COLOURS:
                raise ValueError(f"unknown colour {colour!r}; choose from {COLOURS}")
            if colour == self.background:
                raise ValueError(f"an object's colour ({colour}) equals the background's")
        if self.background not in COLOURS:
            raise ValueError(f"unknown background {self.background!r}; choose from {COLOURS}")
        if (self.relation is not None) != (self.category == "position") or (
            self.relation is not None and self.relation not in RELATIONS
        ):
            raise ValueError(f"relation {self.relation!r} does not fit category {self.category!r}")

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    @property
    def text(self) -> str:
        bg = f"on a {self.background} background"
        o = self.objects
        if self.category == "single":
            body = f"a {o[0][0]} {o[0][1]}"
        elif self.category == "two_object":
            body = f"a {o[0][1]} and a {o[1][1]}"
        elif self.category == "counting":
            body = f"{COUNT_WORDS[len(o)]} {o[0][0]} {PLURALS[o[0][1]]}"
        elif self.category == "colour_attr":
            body = f"a {o[0][0]} {o[0][1]} and a {o[1][0]} {o[1][1]}"
        else:
            body = f"a {o[0][0]} {o[0][1]} {self.relation} a {o[1][0]} {o[1][1]}"
        return articles(f"{body} {bg}")

    def __str__(self) -> str:
        return self.text


def articles(text: str) -> str:
    """"a" becomes "an" before a vowel."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_P = "|".join(PLURALS.values())
_A = r"(?:a|an)"
_BG = rf" on {_A} (?P<bg>{_C}) background"
_GRAMMAR = {
    "single": re.compile(rf"{_A} (?P<c1>{_C}) (?P<s1>{_S}){_BG}"),
    "two_object": re.compile(rf"{_A} (?P<s1>{_S}) and {_A} (?P<s2>{_S}){_BG}"),
    "counting": re.compile(rf"(?P<n>two|three) (?P<c1>{_C}) (?P<p>{_P}){_BG}"),
    "colour_attr": re.compile(rf"{_A} (?P<c1>{_C}) (?P<s1>{_S}) and {_A} (?P<c2>{_C}) (?P<s2>{_S}){_BG}"),
    "position": re.compile(
        rf"{_A} (?P<c1>{_C}) (?P<s1>{_S}) (?P<rel>{'|'.join(RELATIONS)}) {_A} (?P<c2>{_C}) (?P<s2>{_S}){_BG}"
    ),
}


def parse_prompt(text: str) -> Prompt:
    """The :class:`Prompt` a benchmark-grammar prompt asks for; ``ValueError`` if it is not one."""
    t = " ".join(text.strip().lower().split()).rstrip(".")
    for category, pattern in _GRAMMAR.items():
        m = pattern.fullmatch(t)
        if not m:
            continue
        g = m.groupdict()
        if category == "counting":
            shape = next(s for s, p in PLURALS.items() if p == g["p"])
            n = 2 if g["n"] == "two" else 3
            return Prompt(category, g["bg"], ((g["c1"], shape),) * n)
        if category == "two_object":
            return Prompt(category, g["bg"], ((None, g["s1"]), (None, g["s2"])))
        objects = ((g["c1"], g["s1"]),) + (((g["c2"], g["s2"]),) if g.get("c2") else ())
        return Prompt(category, g["bg"], objects, g.get("rel"))
    raise ValueError(f"{text!r} is not a toy-world prompt; write e.g. "
                     f"'a red circle to the left of a blue square on a white background' (see shared/TOYWORLD.md)")


def is_world_prompt(text: str) -> bool:
    try:
        parse_prompt(text)
    except ValueError:
        return False
    return True


def _rng(seed_or_generator) -> np.random.Generator:
    if isinstance(seed_or_generator, np.random.Generator):
        return seed_or_generator
    return np.random.default_rng(seed_or_generator)


def random_prompt(category: str, generator=None) -> Prompt:
    """A uniformly random prompt of ``category`` under the grammar's constraints."""
    rng = _rng(generator)
    bg = COLOURS[rng.integers(len(COLOURS))]
    others = [c for c in COLOURS if c != bg]

    def colour() -> str:
        return others[rng.integers(len(others))]

    def shape() -> str:
        return SHAPES[rng.integers(len(SHAPES))]

    if category == "single":
        return Prompt(category, bg, ((colour(), shape()),))
    if category == "counting":
        return Prompt(category, bg, ((colour(), shape()),) * int(rng.integers(2, 4)))
    s1, s2 = rng.choice(len(SHAPES), 2, replace=False)
    s1, s2 = SHAPES[s1], SHAPES[s2]
    if category == "two_object":
        return Prompt(category, bg, ((None, s1), (None, s2)))
    if category == "colour_attr":
        c1, c2 = rng.choice(len(others), 2, replace=False)
        return Prompt(category, bg, ((others[c1], s1), (others[c2], s2)))
    if category == "position":
        # (c1, s1) != (c2, s2): the shapes may repeat when the colours differ
        while True:
            a, b = (colour(), shape()), (colour(), shape())
            if a != b:
                return Prompt(category, bg, (a, b), RELATIONS[rng.integers(len(RELATIONS))])
    raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")


def prompt_set(name: str, per_category: int = 8) -> list[Prompt]:
    """The fixed ``tuning`` or ``benchmark`` prompt set: ``per_category`` distinct prompts of each
    category, in category order. The two sets never share a prompt."""
    if name not in SET_SEEDS:
        raise ValueError(f"unknown prompt set {name!r}; choose from {sorted(SET_SEEDS)}")
    if name == "tuning" and per_category > TUNING_MAX:
        raise ValueError(f"the tuning set holds at most {TUNING_MAX} prompts per category")
    taken: set[str] = set()
    if name == "benchmark":  # the benchmark set excludes every prompt the tuning set could hold
        taken = {p.text for p in _draw_set(SET_SEEDS["tuning"], TUNING_MAX, set())}
    return _draw_set(SET_SEEDS[name], per_category, taken)


def _draw_set(seed: int, per_category: int, exclude: set[str]) -> list[Prompt]:
    out: list[Prompt] = []
    for k, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, k])  # one stream per category: a smaller set is a prefix of a larger one
        seen: set[str] = set()
        while len(seen) < per_category:
            p = random_prompt(category, rng)
            if p.text in seen or p.text in exclude:
                continue
            seen.add(p.text)
            out.append(p)
    return out
