"""Hard-negative captions for a toy-world prompt: captions that differ from it in one way a
compositional model must get right -- swapped colours, the opposite or reversed relation, another
count, one shape or colour changed, another background, or one object fewer or more. Used to train
the toy CLIPs (and any image-text matcher of the world) and to measure them: a model that picks the
true caption among these understands binding, relations and counts, not just a bag of words.

Every negative is checked against the scene the true prompt describes (``rule.matches`` on its
ground-truth objects) so that it is really false for that scene.
"""

from __future__ import annotations

import numpy as np

from .prompts import COUNT_WORDS, RELATIONS, Prompt
from .rule import matches
from .scenes import Scene
from .world import COLOURS, SHAPES

OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}


def _valid(category: str, background: str, objects, relation=None) -> Prompt | None:
    try:
        p = Prompt(category, background, tuple(objects), relation)
    except ValueError:
        return None
    if category in ("two_object", "colour_attr") and objects[0][1] == objects[1][1]:
        return None
    if category == "colour_attr" and objects[0][0] == objects[1][0]:
        return None
    if category == "position" and objects[0] == objects[1]:
        return None
    if category == "counting" and len(objects) not in COUNT_WORDS:
        return None
    return p


def candidates(prompt: Prompt) -> list[Prompt]:
    """Every hard negative of ``prompt`` (before checking against a scene), in a fixed order."""
    c, bg, objs, rel = prompt.category, prompt.background, list(prompt.objects), prompt.relation
    out: list[Prompt | None] = []
    # another background
    out += [_valid(c, b, objs, rel) for b in COLOURS if b != bg]
    # one colour changed / one shape changed (counting: the shared colour / shape)
    idx = [0] if c in ("single", "counting") else range(len(objs))
    for i in idx:
        col, shp = objs[i]
        for s in SHAPES:
            if s != shp:
                new = [(col, s) if (j == i or c == "counting") else o for j, o in enumerate(objs)]
                out.append(_valid(c, bg, new, rel))
        if col is not None:
            for k in COLOURS:
                if k not in (col, bg):
                    new = [(k, shp) if (j == i or c == "counting") else o for j, o in enumerate(objs)]
                    out.append(_valid(c, bg, new, rel))
    if c in ("colour_attr", "position"):  # swapped colours: the binding test
        (c1, s1), (c2, s2) = objs
        out.append(_valid(c, bg, [(c2, s1), (c1, s2)], rel))
    if c == "position":  # the opposite relation, and the subjects swapped
        out.append(_valid(c, bg, objs, OPPOSITE[rel]))
        out.append(_valid(c, bg, objs[::-1], rel))
        out += [_valid(c, bg, objs, r) for r in RELATIONS if r not in (rel, OPPOSITE[rel])]
    if c == "counting":  # another count, and one object only
        n = len(objs)
        out += [_valid(c, bg, [objs[0]] * m, None) for m in COUNT_WORDS if m != n]
        out.append(_valid("single", bg, [objs[0]], None))
    if c == "single":  # two of it
        out.append(_valid("counting", bg, objs * 2, None))
    if c in ("two_object", "colour_attr", "position"):  # one of the two objects alone
        for o in objs:
            if o[0] is not None:
                out.append(_valid("single", bg, [o], None))
    seen, unique = {prompt.text}, []
    for p in out:
        if p is not None and p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    return unique


def hard_negatives(prompt: Prompt, scene: Scene | None = None, k: int | None = None, generator=None) -> list[Prompt]:
    """Hard negatives of ``prompt`` that are false for ``scene`` (all of them, or ``k`` drawn at random
    with the binding / relation / count negatives always first)."""
    cands = candidates(prompt)
    if scene is not None:
        cands = [p for p in cands if not matches(p, scene.background, scene.objects)]
    if k is None or len(cands) <= k:
        return cands
    key = [p for p in cands if p.category == prompt.category and _structural(prompt, p)]
    rest = [p for p in cands if p not in key]
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    take = key[:k]
    if len(take) < k:
        pick = rng.choice(len(rest), size=k - len(take), replace=False)
        take += [rest[i] for i in sorted(pick)]
    return take


def _structural(true: Prompt, neg: Prompt) -> bool:
    """A negative with the same words in another structure: swapped colours, relation or count."""
    if neg.background != true.background:
        return False
    if true.category == "counting":
        return neg.n_objects != true.n_objects
    same_words = sorted(x for o in neg.objects for x in o if x) == sorted(x for o in true.objects for x in o if x)
    return same_words and (neg.objects != true.objects or neg.relation != true.relation)
