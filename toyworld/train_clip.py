"""Train a toy CLIP on the toy world and save it as a transformers ``CLIPModel`` folder.

The folder holds ``config.json`` + ``model.safetensors`` (fp16 tensors; ``config.json`` says
float32 so ``from_pretrained`` upcasts), the real OpenAI CLIP BPE tokenizer files and a
``preprocessor_config.json`` for ``CLIPImageProcessor`` -- so ``CLIPModel``, ``CLIPTokenizer``,
``CLIPProcessor`` and ``AutoProcessor`` all load it offline.

Training is contrastive (InfoNCE with a learnable logit scale) on freshly sampled images and
captions from every template. Because a caption such as "a red circle" describes many images
of a batch, the targets are soft: each image's target is spread uniformly over every caption
in the batch that describes it, and vice versa. Images go through guidance-like augmentations
(random resized crops of 40-100% area, flips, small affine/perspective warps, blur, gaussian
noise, mild brightness/contrast -- never hue) and a share of them are deliberately imperfect
(blended with noise, partially drawn, with impure colours) so the model's gradients point a
noisy image towards the right colours and shapes.

Besides the in-batch loss, every image is scored against fixed caption sets (all 224 full
captions and the single-attribute captions), so it always meets hard negatives that differ in
one attribute only. Schedule: the first ``shape_first`` share of the steps trains shape
recognition alone (image vs "a circle" / "a square" / ...) -- with every loss from the start
the easy colour terms take the small model's features and shape accuracy stalls near chance;
the first ``curriculum`` share uses clean images and mild augmentation. A training-only linear
head classifies each patch token (background or the shape's class; with ``patch_types`` the
object's colour-shape type) as dense auxiliary supervision; it is not saved. Per-step loss terms and the reasons are in ``train_clip``.

Toy world v3 (``shared/TOYWORLD.md``): the images are scenes of 1-3 objects over the five prompt
categories (``scenes.sample_scenes``); single-object scenes are often captioned with a v2 template
(partial attributes, "a red circle"). Every image also meets its prompt's hard negatives
(``negatives.hard_negatives``: swapped colours, the opposite relation, another count, ...) in a
cross-entropy over [true caption, negatives], so the model learns binding, relations and counts.
No augmentation flips an image (a flip would swap "left" and "right"). Training checkpoints every
``CHECKPOINT_EVERY`` steps into the output folder and resumes from there with ``resume=True``.

Layout supervision (recipe fields ``structure_weight`` ... ``scale_heads``; on in the judge ``clip_b``'s recipe,
off in the guiding CLIPs', measured in docs/toyworld.md "The toy CLIPs read objects, not relations"): training-only heads make the
image embedding say what the scene holds and where, and the text embedding what the caption states
(``scene_structure``, ``caption_structure``), and ``sincos_init`` starts the vision position codes loud.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from guidance.encoders import OPENAI_MEAN, OPENAI_STD

from . import world
from .negatives import hard_negatives
from .prompts import Prompt
from .rule import matches
from .scenes import Scene, SceneObject, draw_scene, sample_scenes, template_mask
from .tokenizer import write_clip_tokenizer
from .train_state import Checkpointer

CLIP_MEAN, CLIP_STD = OPENAI_MEAN, OPENAI_STD      # the toy CLIPs normalise images as OpenAI's do


@dataclass(frozen=True)
class ClipRecipe:
    name: str
    seed: int
    steps: int
    batch_size: int
    lr: float
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    projection_dim: int
    imperfect_prob: float = 0.3  # share of images made deliberately imperfect
    patch_aux_weight: float = 2.0  # auxiliary per-patch shape loss (training only)
    shape_first: float = 0.3  # share of steps at the start that train shape recognition only
    curriculum: float = 0.45  # share of steps at the start with clean images and mild augmentation
    grad_clip: float = 1.0
    negatives: int = 6  # hard-negative captions per image (v3)
    legacy_caption_prob: float = 0.5  # share of single-object scenes captioned with a v2 template
    structure_weight: float = 0.0  # auxiliary layout losses on both embeddings (``structure``; training only)
    position_weight: float = 1.0  # weight of the x / y slots within them
    binding_weight: float = 0.0  # if set, the colour-shape type counts are averaged apart, with this weight
    sincos_init: float = 0.0  # start the vision position embeddings as 2D sine-cosine codes of this norm
    tied_layout: bool = False  # the x / y slots are the embeddings' first dimensions themselves (no head)
    scale_heads: bool = True  # the layout heads read the embeddings scaled by sqrt(projection_dim)
    shared_head: bool = False  # one layout head reads both embeddings (the layout in the same directions)
    mine_temperature: float = 0.0  # after the curriculum, fill each image's ``negatives`` (after the structural
    # ones) by drawing candidates with probability softmax(cosine / this) under the current model (0: at random)
    negative_images: float = 0.0  # weight of a caption-side loss: each caption against its image and the same
    # scene with the objects' colours rotated or two objects' places exchanged (``swapped_scene``), where false
    tied_types: float = 0.0  # if set, the colour-shape type count slots are the embeddings' first dimensions times
    # this (no head; held at 0 where a caption does not state them): the cosine then counts matching types
    patch_types: bool = False  # the per-patch head names the colour-shape type covering each patch (not only the
    # shape), so each patch state holds the conjunction the pooled embedding needs to bind colours to shapes
    negative_scale: float = 0.0  # if set, the hard-negative losses (captions and images) use this fixed logit scale
    # instead of the model's learnt one (~14 in these runs), so they weigh the nearest negatives most


RECIPES = {
    "clip_a": ClipRecipe(
        name="clip_a", seed=1001, steps=3000, batch_size=64, lr=1.5e-3,
        image_size=64, patch_size=8, vision_hidden=64, vision_layers=4, vision_heads=4,
        text_hidden=64, text_layers=3, text_heads=4, projection_dim=64,
    ),
    # The judge: 8-px patches like A (with 16-px patches a 3-object scene falls into 16 tokens and the
    # relations and colour binding stay near chance), wider and deeper than the guiding CLIPs. Layout
    # supervision, sixteen mined hard negatives and per-patch colour-shape types make it read relations,
    # counts and colour binding (>= 95% among hard negatives in every category; docs/toyworld.md).
    "clip_b": ClipRecipe(
        name="clip_b", seed=2002, steps=6000, batch_size=64, lr=1.5e-3,
        image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=8,
        text_hidden=64, text_layers=4, text_heads=4, projection_dim=64,
        shape_first=0.15, curriculum=0.25, negatives=16, mine_temperature=0.1, patch_types=True,
        structure_weight=1.0, position_weight=5.0, sincos_init=3.0, shared_head=True,
    ),
    # Two more guiding CLIPs (the toy preset ensembles them with A; B stays the judge). Coarse 16-px
    # patches like B, but their own seeds and widths: an image optimised against A alone finds colour
    # patterns A reads as shapes, which differently built CLIPs do not share.
    "clip_c": ClipRecipe(
        name="clip_c", seed=4004, steps=3000, batch_size=64, lr=1.5e-3,
        image_size=64, patch_size=16, vision_hidden=96, vision_layers=4, vision_heads=4,
        text_hidden=64, text_layers=3, text_heads=4, projection_dim=64,
    ),
    "clip_d": ClipRecipe(
        name="clip_d", seed=5005, steps=3000, batch_size=64, lr=1.5e-3,
        image_size=64, patch_size=16, vision_hidden=80, vision_layers=3, vision_heads=4,
        text_hidden=64, text_layers=3, text_heads=4, projection_dim=64,
    ),
}


# ---------------------------------------------------------------------------------------------
# Structure supervision: what a scene holds and where, and what a caption says, as vectors
# ---------------------------------------------------------------------------------------------
# A contrastive dual encoder starts with neither tower encoding where things are, and the hard
# negatives alone give no gradient out of that state (text "left of" and "right of" stay equal
# because the image side cannot tell them apart, and vice versa): probed by ridge regression,
# clip_b's image embedding predicts no object's x or y (R^2 ~ 0). Two training-only linear heads
# break the symmetry: the image embedding must predict the scene's layout (counts per colour-shape
# type, per colour and per shape; their centroids; the background) and the text embedding what the
# caption states (the same counts where it names them, and for a relation which colour / shape lies
# towards which side). The contrastive losses then only have to align the two.
_N_TYPES = len(world.COLOURS) * len(world.SHAPES)
_NC, _NS = len(world.COLOURS), len(world.SHAPES)
STRUCT_DIM = _N_TYPES + _NC + _NS + _NC + 2 * (_NC + _NS)  # counts (type, colour, shape), background, x/y
_X0 = _N_TYPES + _NC + _NS + _NC  # first x/y slot: colour c -> _X0 + 2c, shape s -> _X0 + 2 (_NC + s)
_REL = {"to the left of": (0, -1.0), "to the right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


def _slot_xy(colour: str | None, shape: str | None) -> list[int]:
    out = []
    if colour is not None:
        out.append(_X0 + 2 * world.COLOURS.index(colour))
    if shape is not None:
        out.append(_X0 + 2 * (_NC + world.SHAPES.index(shape)))
    return out


def scene_structure(scene: Scene, object_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and mask ``[STRUCT_DIM]`` of what an (augmented) image shows. ``object_masks`` ``[3, H, W]``:
    each object's mask after the image's warps; an object counts where over half of it is still seen;
    x / y slots hold the mean centre (in [-1, 1]) of the seen objects of that colour / shape."""
    t, m = torch.zeros(STRUCT_DIM), torch.zeros(STRUCT_DIM)
    m[:_X0] = 1
    t[_N_TYPES + _NC + _NS + world.COLOURS.index(scene.background)] = 1
    h, w = object_masks.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    sums: dict[int, list[torch.Tensor]] = {}
    for k, o in enumerate(scene.objects):
        area_drawn = float(template_mask(o.shape, o.box, h, w).sum())
        mk = object_masks[k]
        seen = float(mk.sum())
        if area_drawn == 0 or seen < 0.5 * area_drawn:
            continue
        c, s = world.COLOURS.index(o.colour), world.SHAPES.index(o.shape)
        t[c * _NS + s] += 1
        t[_N_TYPES + c] += 1
        t[_N_TYPES + _NC + s] += 1
        centre = torch.stack([(mk.sum(0) * xs).sum() / seen, (mk.sum(1) * ys).sum() / seen])
        for slot in _slot_xy(o.colour, o.shape):
            sums.setdefault(slot, []).append(centre)
    for slot, cs in sums.items():
        t[slot : slot + 2] = torch.stack(cs).mean(0)
        m[slot : slot + 2] = 1
    return t, m


def caption_structure(spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and mask ``[STRUCT_DIM]`` of what a caption states: counts where it fixes them, the
    background where it names one, and for a relation -1 / +1 on the axis it names for the colour and
    shape of each side (left / above: -1), where the two sides differ in it."""
    t, m = torch.zeros(STRUCT_DIM), torch.zeros(STRUCT_DIM)
    bg_slot = _N_TYPES + _NC + _NS
    if isinstance(spec, Prompt):
        objs, bg = list(spec.objects), spec.background
    else:  # a v2 attribute dict: one object, some attributes unnamed
        objs, bg = [(spec.get("colour"), spec.get("shape"))], spec.get("background")
    if bg is not None:
        t[bg_slot + world.COLOURS.index(bg)] = 1
        m[bg_slot : bg_slot + _NC] = 1
    all_colours = all(c is not None for c, _ in objs)
    all_shapes = all(s is not None for _, s in objs)
    for c, s in objs:
        if all_colours and all_shapes:
            t[world.COLOURS.index(c) * _NS + world.SHAPES.index(s)] += 1
        if all_colours:
            t[_N_TYPES + world.COLOURS.index(c)] += 1
        if all_shapes:
            t[_N_TYPES + _NC + world.SHAPES.index(s)] += 1
    if all_colours and all_shapes:
        m[:_N_TYPES] = 1
    if all_colours:
        m[_N_TYPES : _N_TYPES + _NC] = 1
    if all_shapes:
        m[_N_TYPES + _NC : _N_TYPES + _NC + _NS] = 1
    if isinstance(spec, Prompt) and spec.relation is not None:
        axis, sign = _REL[spec.relation]
        (c1, s1), (c2, s2) = spec.objects
        pairs = []
        if c1 != c2:
            pairs += [(_slot_xy(c1, None)[0], sign), (_slot_xy(c2, None)[0], -sign)]
        if s1 != s2:
            pairs += [(_slot_xy(None, s1)[0], sign), (_slot_xy(None, s2)[0], -sign)]
        for slot, v in pairs:
            t[slot + axis] = v
            m[slot + axis] = 1
    return t, m


def structure_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, position_weight: float,
                   binding_weight: float = 0.0) -> torch.Tensor:
    """Masked squared error, averaged within the count / background slots and within the x / y slots apart
    (the few x / y slots would otherwise drown among the many count slots), the latter weighted; with a
    ``binding_weight`` the colour-shape type counts are a third group of their own."""
    err = (pred - target) ** 2 * mask

    def mean(a: int, b: int | None) -> torch.Tensor:
        return err[:, a:b].sum() / mask[:, a:b].sum().clamp_min(1)

    if binding_weight:
        return mean(_N_TYPES, _X0) + binding_weight * mean(0, _N_TYPES) + position_weight * mean(_X0, None)
    return mean(0, _X0) + position_weight * mean(_X0, None)


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """``[grid * grid, dim]`` 2D sine-cosine position codes (half the channels for x, half for y)."""
    quarter = dim // 4
    freqs = 1.0 / (grid ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter - 1)))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None] * freqs[None] * math.pi
        parts += [torch.sin(angle), torch.cos(angle)]
    out = torch.cat(parts, 1)
    return F.pad(out, (0, dim - out.shape[1]))


def make_config(r: ClipRecipe):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408, hidden_size=r.text_hidden, intermediate_size=4 * r.text_hidden,
        num_hidden_layers=r.text_layers, num_attention_heads=r.text_heads,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=r.projection_dim,
    )
    vision = dict(
        image_size=r.image_size, patch_size=r.patch_size, hidden_size=r.vision_hidden,
        intermediate_size=4 * r.vision_hidden, num_hidden_layers=r.vision_layers,
        num_attention_heads=r.vision_heads, projection_dim=r.projection_dim,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=r.projection_dim)


# ---------------------------------------------------------------------------------------------
# Data: world images, imperfect variants, guidance-like augmentations
# ---------------------------------------------------------------------------------------------
def _imperfect(
    images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator, prob: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make a share ``prob`` of the images imperfect, the way an image being optimised is.

    images: float [N, 3, H, W] in [0, 1]; masks: bool [N, H, W] of the shape. Returns the new
    images and shape masks (a partially drawn shape loses part of its mask).
    """
    n, _, h, w = images.shape
    out = images.clone()
    masks = masks.clone()
    pick = rng.uniform(0, 1, n) < prob
    kind = rng.integers(0, 4, n)
    for i in np.nonzero(pick)[0]:
        k = kind[i]
        if k == 0:  # blended with (possibly smooth) noise: a partly-optimised image
            res = int(rng.choice([4, 8, 16, 64]))
            noise = torch.rand(1, 3, res, res, generator=gen)
            noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)[0]
            a = rng.uniform(0.35, 0.9)
            out[i] = a * out[i] + (1 - a) * noise
        elif k == 1:  # partially drawn shape: cut by a random line, rest left as background
            m = masks[i]
            if m.any():
                ys, xs = torch.nonzero(m, as_tuple=True)
                theta = rng.uniform(0, 2 * math.pi)
                proj = xs.float() * math.cos(theta) + ys.float() * math.sin(theta)
                thr = torch.quantile(proj, rng.uniform(0.7, 0.95))
                gone = proj > thr
                y0, x0 = torch.nonzero(~m)[0]  # any pixel outside the shape has the background colour
                out[i, :, ys[gone], xs[gone]] = images[i, :, y0, x0][:, None]
                masks[i, ys[gone], xs[gone]] = False
        elif k == 2:  # impure colours: small per-region RGB offsets and per-pixel texture
            m = masks[i].float()[None]
            off_fg = torch.from_numpy(rng.uniform(-0.1, 0.1, (3, 1, 1))).float()
            off_bg = torch.from_numpy(rng.uniform(-0.1, 0.1, (3, 1, 1))).float()
            tex = 0.06 * torch.randn(3, h, w, generator=gen)
            out[i] = out[i] + m * off_fg + (1 - m) * off_bg + tex
        else:  # soft, blotchy rendering: heavy blur plus low-frequency brightness variation
            k_sz = int(rng.choice([5, 7, 9]))
            sigma = rng.uniform(0.8, 2.0)
            out[i] = _blur(out[i : i + 1], k_sz, sigma)[0]
            blot = F.interpolate(torch.rand(1, 1, 4, 4, generator=gen), size=(h, w), mode="bilinear")[0]
            out[i] = out[i] * (0.85 + 0.3 * blot)
    return out.clamp(0, 1), masks


def _blur(x: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    ax = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    xp = F.pad(x, (k // 2,) * 4, mode="replicate")
    xp = F.conv2d(xp, g.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(xp, g.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)


def guidance_augment(size: int, with_mask: bool = False, mild: bool = False):
    """Augmentations like those applied to an image being guided (cutouts and small warps).
    With ``with_mask`` the returned module takes and returns ``(images, masks)``, warping a
    float mask ``[N, 1, H, W]`` along with the images (intensity changes apply to images only).
    ``mild`` (used early in training) keeps crops above 70% of the area and skips perspective."""
    import kornia.augmentation as K

    if mild:
        return K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=(0.7, 1.0), ratio=(0.9, 1.1), p=0.5),
            K.RandomGaussianNoise(std=0.03, p=0.3),
            data_keys=["input", "mask"] if with_mask else ["input"],
        )
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(0.85, 1.18), p=0.85),
        K.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1), shear=5, padding_mode="border", p=0.4),
        K.RandomPerspective(0.2, p=0.2),
        K.ColorJiggle(brightness=0.1, contrast=0.1, p=0.5),
        K.RandomGaussianBlur((5, 5), sigma=(0.1, 1.5), p=0.3),
        K.RandomGaussianNoise(std=0.06, p=0.3),
        data_keys=["input", "mask"] if with_mask else ["input"],
    )


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class _TokenCache:
    """Tokenise each distinct caption once (padding to the longest caption of a batch)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if new:
            for c, ids in zip(new, self.tok(new)["input_ids"]):
                self.cache[c] = ids
        seqs = [self.cache[c] for c in captions]
        length = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        return ids, att


# ---------------------------------------------------------------------------------------------
# v3 data: scenes, captions (v3 grammar or a v2 template for single objects), hard negatives
# ---------------------------------------------------------------------------------------------
SINGLES = {"single": 1.0}
EVAL_SEED = 777_777


def describes(spec, scene: Scene) -> bool:
    """Whether a caption spec (a v3 :class:`Prompt` or a v2 attribute dict) describes ``scene``."""
    if isinstance(spec, Prompt):
        return matches(spec, scene.background, scene.objects)
    if len(scene.objects) != 1:
        return False
    o = scene.objects[0]
    actual = {"colour": o.colour, "shape": o.shape, "background": scene.background}
    return all(v is None or actual[k] == v for k, v in spec.items())


def swapped_scene(scene: Scene, spec, rng: np.random.Generator) -> Scene | None:
    """The scene with its objects' colours rotated (each object takes the next one's colour) or with two objects'
    boxes exchanged, drawn at random among those that ``spec`` does not describe; ``None`` if neither changes
    what the caption says (one object, or all alike)."""
    objs = scene.objects
    if len(objs) < 2:
        return None
    rotated = tuple(SceneObject(objs[(k + 1) % len(objs)].colour, o.shape, o.box) for k, o in enumerate(objs))
    i, j = sorted(rng.choice(len(objs), size=2, replace=False).tolist())
    moved = list(objs)
    moved[i], moved[j] = SceneObject(objs[i].colour, objs[i].shape, objs[j].box), SceneObject(objs[j].colour, objs[j].shape, objs[i].box)
    options = [Scene(scene.background, o) for o in (rotated, tuple(moved))]
    options = [sc for sc in options if not describes(spec, sc)]
    return options[int(rng.integers(len(options)))] if options else None


def training_batch(n: int, rng: np.random.Generator, r: ClipRecipe, singles_only: bool = False, mine: bool = False):
    """Scenes, their captions and caption specs, each image's hard negatives (prompts), the per-shape masks
    ``[N, len(SHAPES), H, W]`` (float) the patch head learns from and each object's mask ``[N, 3, H, W]``."""
    batch = sample_scenes(n, rng, mix=SINGLES if singles_only else None, legacy_caption_prob=r.legacy_caption_prob,
                          plain_article_prob=0.25)
    captions, specs = batch.captions, batch.specs
    k = None if mine else r.negatives  # mining: every candidate, chosen from in ``train_clip``
    negatives = [hard_negatives(p, sc, k=k, generator=rng) for p, sc in zip(batch.prompts, batch.scenes)]
    size = batch.images.shape[1]
    masks = np.zeros((n, len(world.SHAPES), size, size), dtype=np.float32)
    objects = np.zeros((n, 3, size, size), dtype=np.float32)
    for i, sc in enumerate(batch.scenes):
        for k, o in enumerate(sc.objects):
            objects[i, k] = template_mask(o.shape, o.box, size)
            masks[i, world.SHAPES.index(o.shape)] = np.maximum(masks[i, world.SHAPES.index(o.shape)], objects[i, k])
    return batch, captions, specs, negatives, torch.from_numpy(masks), torch.from_numpy(objects)


def patch_targets(scenes: list[Scene], shape_masks: torch.Tensor, object_masks: torch.Tensor, grid: int,
                  types: bool = False) -> torch.Tensor:
    """The class of every patch ``[N, grid * grid]`` the per-patch head learns: the shape covering most of it
    (``shape_masks`` ``[N, len(SHAPES), H, W]``) or, with ``types``, the colour-shape type of the object covering
    most of it (``object_masks`` ``[N, 3, H, W]``, index ``colour * len(SHAPES) + shape``); where nothing covers
    over 5% of a patch, the last class (background)."""
    n_shapes = len(world.SHAPES)
    if types:
        frac = F.adaptive_avg_pool2d(object_masks, grid).flatten(2)  # [N, 3, grid*grid]
        best, k_obj = frac.max(1)
        kinds = torch.tensor([[world.COLOURS.index(o.colour) * n_shapes + world.SHAPES.index(o.shape) for o in sc.objects]
                              + [0] * (3 - len(sc.objects)) for sc in scenes])
        cls, n_classes = kinds.gather(1, k_obj), _N_TYPES
    else:
        frac = F.adaptive_avg_pool2d(shape_masks, grid).flatten(2)  # [N, shapes, grid*grid]
        (best, cls), n_classes = frac.max(1), n_shapes
    return torch.where(best > 0.05, cls, torch.full_like(cls, n_classes))


@torch.no_grad()
def _mine(model, tokens, x: torch.Tensor, prompts: list, candidates: list[list], k: int, temperature: float,
          gen: torch.Generator) -> list[list]:
    """Each image's ``k`` hard negatives: its structural ones (``negatives._structural``) first, then other
    candidates drawn without replacement, with probability softmax(cosine with the image / ``temperature``)."""
    from .negatives import _structural

    img = model.get_image_features(pixel_values=normalise(x))
    img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
    texts = list(dict.fromkeys(q.text for cands in candidates for q in cands))
    ids, att = tokens(texts)
    txt = model.get_text_features(input_ids=ids, attention_mask=att)
    txt = F.normalize(getattr(txt, "pooler_output", txt), dim=-1)
    row = {t: i for i, t in enumerate(texts)}
    out = []
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        key = [q for q in cands if q.category == p.category and _structural(p, q)][:k]
        rest = [q for q in cands if q not in key]
        take = min(k - len(key), len(rest))
        if take <= 0:
            out.append(key)
            continue
        # floored: sampling without replacement needs as many nonzero weights as draws
        prob = torch.softmax(txt[[row[q.text] for q in rest]] @ img[i] / temperature, 0).clamp_min(1e-12)
        out.append(key + [rest[j] for j in sorted(torch.multinomial(prob, take, generator=gen).tolist())])
    return out


def match_matrix(specs: list, scenes: list[Scene]) -> torch.Tensor:
    """M[i, j] = 1 if caption spec j describes scene i."""
    return torch.tensor([[describes(sp, sc) for sp in specs] for sc in scenes], dtype=torch.float32)


@torch.no_grad()
def evaluate_compositional(model, tokenizer, per_category: int = 64, noise: float = 0.0) -> dict[str, float]:
    """Zero-shot accuracy per category among hard negatives (``evaluation.ranking_accuracy``): cosine
    similarity of the image with each caption."""
    from .evaluation import ranking_accuracy

    model.eval()
    size = model.config.vision_config.image_size

    def score(x: torch.Tensor, texts: list[list[str]]) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        img = model.get_image_features(pixel_values=normalise(x).to(next(model.parameters()).dtype))
        img = F.normalize(getattr(img, "pooler_output", img).float(), dim=-1)
        out = []
        for i, caps in enumerate(texts):
            tok = tokenizer(caps, padding=True, return_tensors="pt")
            txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            out.append(F.normalize(getattr(txt, "pooler_output", txt).float(), dim=-1) @ img[i])
        return out

    return ranking_accuracy(score, per_category, noise=noise)


def _soft_clip_loss(logits_per_image: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    t_img = match / match.sum(1, keepdim=True)
    t_txt = match.t() / match.t().sum(1, keepdim=True)
    li = -(t_img * F.log_softmax(logits_per_image, 1)).sum(1).mean()
    lt = -(t_txt * F.log_softmax(logits_per_image.t(), 1)).sum(1).mean()
    return (li + lt) / 2


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def zero_shot(model, tokenizer, images: torch.Tensor, image_size: int | None = None) -> list[tuple[str, str, str]]:
    """Zero-shot (colour, shape, background) of each image: argmax over all 224 canonical captions."""
    model.eval()
    table = world.all_full_captions()
    tok = tokenizer([t[0] for t in table], padding="max_length", max_length=77, return_tensors="pt")
    txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    txt = getattr(txt, "pooler_output", txt)
    txt = F.normalize(txt.float(), dim=-1)
    size = image_size or model.config.vision_config.image_size
    preds = []
    for chunk in images.split(256):
        x = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        emb = model.get_image_features(pixel_values=normalise(x).to(next(model.parameters()).dtype))
        emb = F.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1)
        best = (emb @ txt.t()).argmax(1)
        preds += [(table[k][1], table[k][2], table[k][3]) for k in best.tolist()]
    return preds


def evaluate(model, tokenizer, n: int = 512, seed: int = EVAL_SEED) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy on a fixed held-out set: clean images, noisy images (sigma 0.1), and
    guidance-style augmented views."""
    batch = world.sample(n, seed)
    x = batch.tensors()
    gen = torch.Generator().manual_seed(seed)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    torch.manual_seed(seed)
    aug = guidance_augment(x.shape[-1])(x)
    out = {}
    for name, imgs in (("clean", x), ("noisy", noisy), ("augmented", aug)):
        preds = zero_shot(model, tokenizer, imgs)
        c = np.mean([p[0] == t for p, t in zip(preds, batch.colours)])
        s = np.mean([p[1] == t for p, t in zip(preds, batch.shapes)])
        b = np.mean([p[2] == t for p, t in zip(preds, batch.backgrounds)])
        a = np.mean([p == (tc, ts, tb) for p, tc, ts, tb in zip(preds, batch.colours, batch.shapes, batch.backgrounds)])
        out[name] = {"colour": float(c), "shape": float(s), "background": float(b), "all": float(a)}
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def save_clip_folder(model, folder: Path, image_size: int) -> None:
    """Write model (fp16 tensors, float32 config), tokenizer and image processor into ``folder``."""
    from transformers import CLIPImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    model.to(torch.float32)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_clip_tokenizer(folder)
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
                       crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
                       do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                       do_convert_rgb=True).save_pretrained(str(folder))


def train_clip(recipe: ClipRecipe | str, out_dir: str | Path, log=print, steps: int | None = None,
               eval_every: int = 0, resume: bool = False) -> dict:
    """Train one toy CLIP from its recipe's seed and save it to ``out_dir``. Returns metrics.

    With ``resume`` a run stopped part-way continues from its last checkpoint in ``out_dir`` and ends
    with the same weights as an uninterrupted run."""
    from transformers import CLIPModel

    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    steps = steps or r.steps
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    torch.manual_seed(r.seed)
    rng = np.random.default_rng(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    write_clip_tokenizer(out_dir)  # the tokenizer is needed to tokenise captions
    tokens = _TokenCache(_tokenizer(out_dir))
    model = CLIPModel(make_config(r)).float()
    if r.sincos_init:  # position codes as loud as the patches from the start, so layout is easy to read
        with torch.no_grad():
            pe = model.vision_model.embeddings.position_embedding.weight
            codes = sincos_positions(r.image_size // r.patch_size, r.vision_hidden)
            pe[1:] = codes * (r.sincos_init / codes.norm(dim=1, keepdim=True).clamp_min(1e-6))
    model.train()
    aug = guidance_augment(r.image_size, with_mask=True)
    mild_aug = guidance_augment(r.image_size, with_mask=True, mild=True)
    curriculum = int(r.curriculum * steps)  # first steps: clean images, mild augmentation
    # Shape first: with all caption losses from the start, the easy colour terms take the small
    # model's features and shape recognition stalls near chance; learning shapes alone first (on
    # single-object scenes) and adding the caption losses afterwards avoids that.
    shape_only = int(r.shape_first * steps)
    shape_captions = [world.caption(shape=s) for s in world.SHAPES]
    # training-only head: classifies every patch token as background or one of the shapes; dense
    # supervision makes the ViT learn colour-independent edge/corner features far sooner than
    # the caption losses alone. It is not part of the saved model.
    patch_head = torch.nn.Linear(r.vision_hidden, (_N_TYPES if r.patch_types else len(world.SHAPES)) + 1)
    # training-only layout heads on the two embeddings (see ``scene_structure``); built only when used,
    # so the recipes without them draw the same random numbers as before
    heads = ([torch.nn.Linear(r.projection_dim, STRUCT_DIM) for _ in range(1 if r.shared_head else 2)]
             if r.structure_weight else [])
    # the heads read the unit-length embeddings scaled to unit-size components: on the unit sphere a head
    # needs weights of ~sqrt(dim) to give targets of 1, more than Adam's small steps reach in a run
    head_scale = math.sqrt(r.projection_dim) if r.scale_heads else 1.0

    def layout(k: int, emb: torch.Tensor) -> torch.Tensor:
        pred = heads[k % len(heads)](emb * head_scale)
        if r.tied_layout:  # the x / y slots read straight off the first dimensions: the dot product of an image
            # and a caption then rewards each named colour / shape lying on the side the caption names
            pred = torch.cat([pred[:, :_X0], emb[:, : STRUCT_DIM - _X0] * head_scale], 1)
        if r.tied_types:  # the type counts read straight off the first dimensions: the dot product of an image and a
            # caption then counts the colour-shape types they share, which swapped colours do not
            pred = torch.cat([emb[:, :_N_TYPES] * r.tied_types, pred[:, _N_TYPES:]], 1)
        return pred

    def tied(mask: torch.Tensor) -> torch.Tensor:  # tied slots: every unnamed / absent slot is held at 0
        if r.tied_layout:
            mask = torch.cat([mask[:, :_X0], torch.ones_like(mask[:, _X0:])], 1)
        if r.tied_types:
            mask = torch.cat([torch.ones_like(mask[:, :_N_TYPES]), mask[:, _N_TYPES:]], 1)
        return mask
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay + list(patch_head.parameters()) + [q for h in heads for q in h.parameters()],
          "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
        lr=r.lr, betas=(0.9, 0.98),
    )
    grid = r.image_size // r.patch_size
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    ckpt = Checkpointer(out_dir / ".training", r.name, resume=resume, log=log,
                        objects={"model": model, "patch_head": patch_head, "opt": opt, "sched": sched,
                                 **{f"structure_head_{i}": h for i, h in enumerate(heads)}},
                        np_rng=rng, generators={"gen": gen})
    first, extra = ckpt.start()
    running = extra.get("running")
    for step in range(first, steps):
        early = step < curriculum
        shape_phase = step < shape_only
        mine = bool(r.mine_temperature) and not early
        batch, captions, specs, negatives, shape_masks, object_masks = training_batch(
            r.batch_size, rng, r, singles_only=shape_phase, mine=mine)
        x = batch.tensors()
        union = shape_masks.amax(1) > 0
        x, union = _imperfect(x, union, rng, 0.0 if early else r.imperfect_prob, gen)
        shape_masks = shape_masks * union[:, None]
        if heads or r.patch_types:  # warp each object's mask along with the image (the warps do not depend on channels)
            x, m = (mild_aug if early else aug)(x, torch.cat([shape_masks, object_masks * union[:, None]], 1))
            m, object_masks = m[:, : len(world.SHAPES)], m[:, len(world.SHAPES) :]
        else:
            x, m = (mild_aug if early else aug)(x, shape_masks)
        x = x.clamp(0, 1)
        n = len(batch)
        parts: dict[str, torch.Tensor] = {}
        if shape_phase:
            ids, att = tokens(shape_captions)
            out = model(input_ids=ids, attention_mask=att, pixel_values=normalise(x))
            target = torch.tensor([world.SHAPES.index(sc.objects[0].shape) for sc in batch.scenes])
            loss = F.cross_entropy(out.logits_per_image, target)
        else:
            k = r.negatives
            if mine:
                negatives = _mine(model, tokens, x, batch.prompts, negatives, k, r.mine_temperature, gen)
            flat = [q for negs in negatives for q in (negs + negs[:1] * (k - len(negs)))]  # pad short lists
            ids, att = tokens(captions + [p.text for p in batch.prompts] + [q.text for q in flat])
            out = model(input_ids=ids, attention_mask=att, pixel_values=normalise(x))
            logits = out.logits_per_image  # [N, N + N + N * k]
            # in-batch contrastive loss with soft targets (a caption may describe several images)
            loss = _soft_clip_loss(logits[:, :n], match_matrix(specs, batch.scenes))
            # hard negatives: each image's prompt against its own negatives
            rows = torch.arange(n)
            true = logits[rows, n + rows][:, None]
            neg = logits[rows[:, None], 2 * n + rows[:, None] * k + torch.arange(k)[None]]
            hard = torch.cat([true, neg], 1)
            if r.negative_scale:  # the same cosines, sharper
                hard = hard * (r.negative_scale / model.logit_scale.exp())
            loss = loss + F.cross_entropy(hard, torch.zeros(n, dtype=torch.long))
            parts["hard-negative acc"] = (true[:, 0] > neg.max(1).values).float().mean()
            if r.negative_images:  # each caption against its image and the same scene changed in one binding / place
                swaps = [swapped_scene(sc, sp, rng) for sc, sp in zip(batch.scenes, specs)]
                keep = [i for i, sw in enumerate(swaps) if sw is not None]
                if keep:
                    xn = torch.from_numpy(np.stack([draw_scene(swaps[i]) for i in keep])).permute(0, 3, 1, 2).float() / 255
                    xn = (mild_aug if early else aug)(xn, torch.zeros(len(keep), 1, *xn.shape[2:]))[0].clamp(0, 1)
                    img_n = model.get_image_features(pixel_values=normalise(xn))
                    img_n = F.normalize(getattr(img_n, "pooler_output", img_n), dim=-1)
                    txt = out.text_embeds[keep]  # the images' own captions
                    pair = torch.stack([(txt * out.image_embeds[keep]).sum(1), (txt * img_n).sum(1)], 1)
                    parts["image-negative acc"] = (pair[:, 0] > pair[:, 1]).float().mean()
                    scale = r.negative_scale or model.logit_scale.exp()
                    loss = loss + r.negative_images * F.cross_entropy(scale * pair,
                                                                      torch.zeros(len(keep), dtype=torch.long))
            if heads:  # what each caption states
                txt_t, txt_m = map(torch.stack, zip(*(caption_structure(sp) for sp in list(specs) + list(batch.prompts) + flat)))
                parts["text"] = structure_loss(layout(1, out.text_embeds), txt_t, tied(txt_m),
                                               r.position_weight, r.binding_weight)
                loss = loss + r.structure_weight * parts["text"]
        if heads:  # what each image shows, from the shape phase on
            img_t, img_m = map(torch.stack, zip(*(scene_structure(sc, om) for sc, om in zip(batch.scenes, object_masks))))
            parts["image"] = structure_loss(layout(0, out.image_embeds), img_t, tied(img_m),
                                            r.position_weight, r.binding_weight)
            loss = loss + r.structure_weight * parts["image"]
        patch_t = patch_targets(batch.scenes, m, object_masks, grid, r.patch_types)
        tokens_out = out.vision_model_output.last_hidden_state[:, 1:]
        loss = loss + r.patch_aux_weight * F.cross_entropy(patch_head(tokens_out).reshape(-1, patch_head.out_features), patch_t.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            said = "".join(f" {k}{'' if k.endswith('acc') else ' layout'} {v.item():.3f}" for k, v in parts.items())
            log(f"[{r.name}] step {step}/{steps} loss {running:.3f}{said} scale {model.logit_scale.exp().item():.1f} "
                f"({time.perf_counter() - t0:.0f}s)")
        if eval_every and step % eval_every == eval_every - 1:
            acc = evaluate_compositional(model, tokens.tok, per_category=32)
            model.train()
            log(f"[{r.name}] step {step} hard-negative accuracy {acc}")
        ckpt.step_done(step, {"running": running})
    train_time = ckpt.elapsed()  # over every resumed part of the run
    save_clip_folder(model, out_dir, r.image_size)
    ckpt.finish()
    # evaluate what was saved, loaded back through the public API
    loaded = CLIPModel.from_pretrained(str(out_dir)).float()
    tok = _tokenizer(out_dir)
    metrics = evaluate(loaded, tok)
    compositional = {"clean": evaluate_compositional(loaded, tok), "noisy": evaluate_compositional(loaded, tok, noise=0.1)}
    n_params = sum(p.numel() for p in model.parameters())
    return {"name": r.name, "seed": r.seed, "steps": steps, "batch_size": r.batch_size, "params": n_params,
            "train_seconds": train_time, "zero_shot": metrics, "hard_negatives": compositional, "recipe": r.__dict__}
