"""Toy world v3 scenes: 1-3 filled shapes on a uniform background (``shared/TOYWORLD.md``).

An object is drawn as its shape's *template filling a pixel box* (``template_mask``): the same
template the judging rule (``toyworld.rule``) fits to the regions it finds, so a clean drawing is
read back exactly. Boxes are square, in pixel edges ``(x0, y0, x1, y1)`` with ``x1``/``y1``
exclusive; their side is 22-75% of the canvas for a lone object and 22-45% when there are several;
any two boxes are at least ``GAP`` background pixels apart (so the shapes are too) and every box lies
inside the canvas. Every pixel is one palette colour (no anti-aliasing).

:func:`scene_for` draws a scene that a :class:`~toyworld.prompts.Prompt` describes (for ``position``
the relation holds by the judging rule's test); :func:`sample_scenes` draws a training batch over the
five categories with captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .prompts import CATEGORIES, RELATIONS, Prompt, random_prompt
from .world import COLOURS, PALETTE, RESOLUTION, SHAPES, TEMPLATES, caption, template_attributes

GAP = 3  # background pixels between any two objects' boxes
MIN_SIDE, MAX_SIDE_LONE, MAX_SIDE_SEVERAL = 0.22, 0.75, 0.45


@dataclass(frozen=True)
class SceneObject:
    """One object: its colour, shape and pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive)."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]


def template_mask(shape: str, box, height: int = RESOLUTION, width: int | None = None) -> np.ndarray:
    """Boolean ``[H, W]`` mask of ``shape``'s template drawn to fill ``box`` (pixel edges; may be
    non-square: a circle becomes an ellipse). A pixel belongs to the shape where its centre does.
    Triangle: apex up; cross: arms one third of the box's side."""
    width = height if width is None else width
    x0, y0, x1, y1 = (float(v) for v in box)
    hw, hh = (x1 - x0) / 2, (y1 - y0) / 2
    if hw <= 0 or hh <= 0:
        return np.zeros((height, width), dtype=bool)
    u = ((np.arange(width) + 0.5) - (x0 + x1) / 2)[None, :] / hw
    v = ((np.arange(height) + 0.5) - (y0 + y1) / 2)[:, None] / hh
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return (au <= 1) & (av <= 1)
    if shape == "triangle":
        return (av <= 1) & (au <= (v + 1) / 2)
    if shape == "cross":
        return ((au <= 1) & (av <= 1 / 3)) | ((au <= 1 / 3) & (av <= 1))
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def object_mask(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """Boolean ``[H, W]``: the pixels of any of the scene's objects."""
    m = np.zeros((resolution, resolution), dtype=bool)
    for o in scene.objects:
        m |= template_mask(o.shape, o.box, resolution)
    return m


def draw_scene(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as a uint8 ``[H, W, 3]`` image."""
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.background]
    for o in scene.objects:
        img[template_mask(o.shape, o.box, resolution)] = PALETTE[o.colour]
    return img


def relation_score(box_a, box_b) -> tuple[float, float] | None:
    """GenEval's relative-position test on two boxes: the offset of A's centre from B's, each component
    shrunk toward 0 by 0.1 x (the two widths, resp. heights) without passing 0, divided by the length
    of the original offset. ``None`` where the centres coincide."""
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    dx = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    dy = (ay0 + ay1) / 2 - (by0 + by1) / 2
    norm = float(np.hypot(dx, dy))
    if norm == 0:
        return None
    mx = 0.1 * ((ax1 - ax0) + (bx1 - bx0))
    my = 0.1 * ((ay1 - ay0) + (by1 - by0))
    rx = np.sign(dx) * max(abs(dx) - mx, 0.0)
    ry = np.sign(dy) * max(abs(dy) - my, 0.0)
    return float(rx / norm), float(ry / norm)


def relation_holds(box_a, box_b, relation: str) -> bool:
    """Whether "A {relation} B" holds by the judging rule (y grows downwards)."""
    r = relation_score(box_a, box_b)
    if r is None:
        return False
    x, y = r
    return {"to the left of": x < -0.5, "to the right of": x > 0.5, "above": y < -0.5, "below": y > 0.5}[relation]


def _apart(a, b, gap: int = GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def place_boxes(n: int, rng: np.random.Generator, resolution: int = RESOLUTION, relation: str | None = None,
                tries: int = 500) -> list[tuple[int, int, int, int]]:
    """``n`` square boxes obeying the size, gap and canvas rules (and, with ``relation``, "box 0
    {relation} box 1"). Rejection sampling; raises ``RuntimeError`` if ``tries`` attempts fail."""
    lo = int(np.ceil(MIN_SIDE * resolution))
    hi = int(np.floor((MAX_SIDE_LONE if n == 1 else MAX_SIDE_SEVERAL) * resolution))
    for _ in range(tries):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            side = int(rng.integers(lo, hi + 1))
            x0 = int(rng.integers(0, resolution - side + 1))
            y0 = int(rng.integers(0, resolution - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if not all(_apart(box, b) for b in boxes):
                break
            boxes.append(box)
        if len(boxes) == n and (relation is None or relation_holds(boxes[0], boxes[1], relation)):
            return boxes
    raise RuntimeError(f"could not place {n} objects in {tries} tries")


def scene_for(prompt: Prompt, generator=None, resolution: int = RESOLUTION) -> Scene:
    """A random scene that ``prompt`` describes (colours a prompt leaves free are drawn at random,
    never the background's)."""
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    boxes = place_boxes(prompt.n_objects, rng, resolution, prompt.relation)
    others = [c for c in COLOURS if c != prompt.background]
    objects = []
    for (colour, shape), box in zip(prompt.objects, boxes):
        colour = colour or others[rng.integers(len(others))]
        objects.append(SceneObject(colour, shape, box))
    order = rng.permutation(len(objects))  # drawing order carries no meaning
    return Scene(prompt.background, tuple(objects[i] for i in order))


# the mix of categories in training batches: singles stay common (v2's world), the rest share the rest
TRAIN_MIX = {"single": 0.28, "two_object": 0.16, "counting": 0.18, "colour_attr": 0.18, "position": 0.20}


@dataclass
class SceneBatch:
    images: np.ndarray  # uint8 [N, H, W, 3]
    scenes: list[Scene]
    prompts: list[Prompt]
    captions: list[str]
    # what each caption says: its Prompt, or for a v2 template caption the attributes it names
    # ({"colour": .., "shape": .., "background": ..}, None where the caption does not name one)
    specs: list

    def __len__(self) -> int:
        return len(self.scenes)

    def tensors(self, device=None):
        """Images as float ``[N, 3, H, W]`` in [0, 1]."""
        import torch

        t = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)
        return t.to(device) if device is not None else t


def legacy_caption(prompt: Prompt, rng: np.random.Generator) -> tuple[str, dict]:
    """A random v2 template caption of a single-object prompt ("a red circle", "something red", ...)
    and the attributes it names."""
    (colour, shape), = prompt.objects
    values = {"colour": colour, "shape": shape, "background": prompt.background}
    tpl = TEMPLATES[rng.integers(len(TEMPLATES))]
    used = template_attributes(tpl)
    return caption(**{a: values[a] for a in used}, template=tpl), {a: (values[a] if a in used else None) for a in values}


def sample_scenes(n: int, generator=None, mix: dict[str, float] | None = None, resolution: int = RESOLUTION,
                  legacy_caption_prob: float = 0.0, plain_article_prob: float = 0.0) -> SceneBatch:
    """``n`` scenes: a category drawn by ``mix`` (default :data:`TRAIN_MIX`), a random prompt of it and a
    scene it describes. Captions are the prompts' texts, except that a share ``legacy_caption_prob`` of
    single-object scenes gets a v2 template caption, and a share ``plain_article_prob`` of captions keeps
    "a" before a vowel ("a orange circle", as users write)."""
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    mix = TRAIN_MIX if mix is None else mix
    cats = list(mix)
    p = np.asarray([mix[c] for c in cats], dtype=np.float64)
    picks = rng.choice(len(cats), size=n, p=p / p.sum())
    prompts = [random_prompt(cats[k], rng) for k in picks]
    scenes = [scene_for(pr, rng, resolution) for pr in prompts]
    images = np.stack([draw_scene(s, resolution) for s in scenes]) if n else np.zeros((0, resolution, resolution, 3), np.uint8)
    captions, specs = [], []
    for pr in prompts:
        text, spec = pr.text, pr
        if legacy_caption_prob and pr.category == "single" and rng.uniform() < legacy_caption_prob:
            text, spec = legacy_caption(pr, rng)
        if plain_article_prob and rng.uniform() < plain_article_prob:
            text = text.replace("an ", "a ")
        captions.append(text)
        specs.append(spec)
    return SceneBatch(images, scenes, prompts, captions, specs)


__all__ = ["CATEGORIES", "RELATIONS", "GAP", "Scene", "SceneObject", "SceneBatch", "template_mask", "object_mask", "draw_scene",
           "relation_score", "relation_holds", "place_boxes", "scene_for", "sample_scenes", "TRAIN_MIX"]
