"""Toy world v3 (shared/TOYWORLD.md): prompts, scenes, the judging rule on right and deliberately wrong
scenes, hard negatives, and resumable training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toyworld import rule
from toyworld.negatives import hard_negatives
from toyworld.prompts import CATEGORIES, RELATIONS, Prompt, is_world_prompt, parse_prompt, prompt_set, random_prompt
from toyworld.scenes import (GAP, Scene, SceneObject, draw_scene, relation_holds, relation_score,
                             sample_scenes, scene_for, template_mask)
from toyworld.world import COLOURS, PALETTE, SHAPES


def _judge(scene: Scene, prompt) -> bool:
    return rule.judge(draw_scene(scene), prompt)[0]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def test_prompt_texts_follow_the_grammar_and_parse_back():
    examples = {
        "a red circle on a blue background": Prompt("single", "blue", (("red", "circle"),)),
        "a circle and a cross on a white background": Prompt("two_object", "white", ((None, "circle"), (None, "cross"))),
        "three yellow squares on a black background": Prompt("counting", "black", (("yellow", "square"),) * 3),
        "a green square and an orange triangle on a purple background":
            Prompt("colour_attr", "purple", (("green", "square"), ("orange", "triangle"))),
        "a blue cross above a red circle on a yellow background":
            Prompt("position", "yellow", (("blue", "cross"), ("red", "circle")), "above"),
        "two white crosses on an orange background": Prompt("counting", "orange", (("white", "cross"),) * 2),
    }
    for text, prompt in examples.items():
        assert prompt.text == text
        assert parse_prompt(text) == prompt
    assert parse_prompt("a orange circle on a blue background") == parse_prompt("an orange circle on a blue background")
    assert not is_world_prompt("a cat on a mat")
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt("a red circle next to a blue square on a white background")


@pytest.mark.parametrize("bad", [
    lambda: Prompt("single", "red", (("red", "circle"),)),  # object colour = background
    lambda: Prompt("single", "red", (("blue", "hexagon"),)),
    lambda: Prompt("position", "red", (("blue", "circle"), ("green", "square"))),  # no relation
    lambda: Prompt("colour_attr", "red", (("blue", "circle"), ("green", "square")), "above"),
])
def test_invalid_prompts_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_prompt_sets_are_fixed_disjoint_and_obey_the_constraints():
    tuning, bench = prompt_set("tuning", 12), prompt_set("benchmark", 12)
    assert prompt_set("tuning", 12) == tuning and prompt_set("tuning", 4) == [
        p for c in CATEGORIES for p in [q for q in tuning if q.category == c][:4]]  # a prefix per category
    assert not {p.text for p in tuning} & {p.text for p in prompt_set("benchmark", 40)}
    assert not {p.text for p in prompt_set("tuning", 40)} & {p.text for p in bench}
    for p in tuning + bench:
        assert parse_prompt(p.text) == p
        if p.category in ("two_object", "colour_attr"):
            assert p.objects[0][1] != p.objects[1][1]
        if p.category == "colour_attr":
            assert p.objects[0][0] != p.objects[1][0]
        if p.category == "position":
            assert p.objects[0] != p.objects[1] and p.relation in RELATIONS
    assert [p.category for p in bench] == [c for c in CATEGORIES for _ in range(12)]
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompt_set("test")


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------
def test_scenes_obey_the_world_rules():
    batch = sample_scenes(300, 3)
    for img, scene, prompt in zip(batch.images, batch.scenes, batch.prompts):
        colours = {tuple(int(v) for v in px) for px in img.reshape(-1, 3)}
        assert colours <= {PALETTE[c] for c in COLOURS}  # no anti-aliasing
        n = len(scene.objects)
        assert 1 <= n <= 3 and n == prompt.n_objects
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 == y1 - y0
            assert 0.22 * 64 <= x1 - x0 <= (0.75 if n == 1 else 0.45) * 64
            assert o.colour != scene.background
        masks = [template_mask(o.shape, o.box) for o in scene.objects]
        for i in range(n):  # at least GAP background pixels between any two objects
            grown = F.max_pool2d(torch.from_numpy(masks[i]).float()[None, None], 2 * GAP + 1, 1, GAP)[0, 0] > 0
            for j in range(i + 1, n):
                assert not (grown.numpy() & masks[j]).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_templates_fill_their_box(shape):
    m = template_mask(shape, (10, 20, 40, 50))
    ys, xs = np.nonzero(m)
    assert xs.min() >= 10 and xs.max() <= 39 and ys.min() >= 20 and ys.max() <= 49
    assert xs.max() - xs.min() >= 28 and ys.max() - ys.min() >= 28
    frac = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}[shape]
    assert m.sum() == pytest.approx(frac * 900, rel=0.06)
    if shape == "triangle":
        rows = m.sum(1)[20:50]
        assert rows[1] < rows[-1] / 4  # apex up


def test_position_rule_is_genevals():
    # A at centre (10, 32), B at (50, 32): offset (-40, 0); shrink by 0.1*(20+20)=4 -> -36; /40 = -0.9
    a, b = (0, 22, 20, 42), (40, 22, 60, 42)
    assert relation_score(a, b) == pytest.approx((-0.9, 0.0))
    assert relation_holds(a, b, "to the left of") and relation_holds(b, a, "to the right of")
    assert not relation_holds(a, b, "above") and not relation_holds(a, b, "below")
    # diagonal at 45 degrees: each part 0.707 before the margin; the margin (4 px) keeps both above 0.5
    c, d = (0, 0, 20, 20), (40, 40, 60, 60)
    assert relation_holds(c, d, "above") and relation_holds(c, d, "to the left of")
    # a small horizontal offset is eaten by the margin: neither left nor right
    e, f = (10, 0, 30, 20), (14, 40, 34, 60)
    assert relation_score(e, f)[0] == 0.0 and relation_holds(e, f, "above")
    assert relation_score(a, a) is None and not relation_holds(a, a, "above")


def test_scene_for_draws_what_the_prompt_says():
    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        for _ in range(20):
            p = random_prompt(category, rng)
            s = scene_for(p, rng)
            assert rule.matches(p, s.background, s.objects)


# ---------------------------------------------------------------------------------------------
# The judging rule
# ---------------------------------------------------------------------------------------------
def test_rule_reads_every_clean_scene_of_both_prompt_sets_right():
    rng = np.random.default_rng(1)
    prompts = prompt_set("tuning", 24) + prompt_set("benchmark", 24)
    images = np.stack([draw_scene(scene_for(p, rng)) for p in prompts])
    assert all(rule.judge(images, prompts))
    # every accepted image form gives the same answer
    t = torch.from_numpy(images[:10]).permute(0, 3, 1, 2).float() / 255
    from PIL import Image

    assert rule.judge(t, prompts[:10]) == rule.judge([Image.fromarray(im) for im in images[:10]], prompts[:10])


def _obj(colour, shape, x, y, side=18):
    return SceneObject(colour, shape, (x, y, x + side, y + side))


def test_rule_finds_colours_shapes_and_boxes():
    scene = Scene("white", (_obj("red", "circle", 4, 6), _obj("blue", "cross", 30, 30, 24), _obj("green", "triangle", 40, 2)))
    r = rule.read(draw_scene(scene).astype(np.float64) / 255)
    assert r.background == "white"
    found = sorted((o.colour, o.shape) for o in r.objects)
    assert found == [("blue", "cross"), ("green", "triangle"), ("red", "circle")]
    assert {o.box for o in r.objects if o.shape != "triangle"} == {(4, 6, 22, 24), (30, 30, 54, 54)}
    assert all(o.iou > 0.9 for o in r.objects)


def test_rule_refuses_deliberately_wrong_scenes():
    bg = "black"
    two = Scene(bg, (_obj("red", "circle", 4, 20), _obj("blue", "square", 40, 20)))
    # colour binding: the colours swapped
    assert _judge(two, "a red circle and a blue square on a black background")
    assert not _judge(two, "a blue circle and a red square on a black background")
    # relation: right one holds, the opposite and the reversed do not
    assert _judge(two, "a red circle to the left of a blue square on a black background")
    assert not _judge(two, "a red circle to the right of a blue square on a black background")
    assert not _judge(two, "a blue square to the left of a red circle on a black background")
    assert not _judge(two, "a red circle above a blue square on a black background")
    # an extra object makes the image wrong; a missing one too
    three = Scene(bg, two.objects + (_obj("green", "cross", 22, 44),))
    assert not _judge(three, "a red circle and a blue square on a black background")
    assert not _judge(three, "a circle and a square on a black background")
    one = Scene(bg, two.objects[:1])
    assert not _judge(one, "a circle and a square on a black background")
    assert _judge(one, "a red circle on a black background")
    # wrong count
    threes = Scene(bg, (_obj("yellow", "square", 2, 2), _obj("yellow", "square", 24, 24), _obj("yellow", "square", 44, 44)))
    assert _judge(threes, "three yellow squares on a black background")
    assert not _judge(threes, "two yellow squares on a black background")
    assert not _judge(Scene(bg, threes.objects[:2]), "three yellow squares on a black background")
    # one of the counted objects in another colour or shape
    odd = Scene(bg, threes.objects[:2] + (_obj("red", "square", 44, 44),))
    assert not _judge(odd, "three yellow squares on a black background")
    # another background
    assert not _judge(one, "a red circle on a white background")
    # two_object ignores colours but not shapes
    assert _judge(two, "a square and a circle on a black background")
    assert not _judge(two, "a square and a cross on a black background")


def test_small_stray_regions_are_ignored_large_ones_are_objects():
    scene = Scene("green", (_obj("red", "square", 10, 10, 30),))
    img = draw_scene(scene)
    stray = img.copy()
    stray[50:57, 50:58] = PALETTE["blue"]  # 56 px = 1.37% of the image: not an object
    assert rule.judge(stray, "a red square on a green background") == [True]
    stray[50:57, 50:59] = PALETTE["blue"]  # 63 px = 1.54%: an extra object
    assert rule.judge(stray, "a red square on a green background") == [False]
    r = rule.read(stray.astype(np.float64) / 255)
    assert len(r.objects) == 2 and {o.colour for o in r.objects} == {"red", "blue"}


def test_blur_fringes_are_tolerated_and_noise_snaps_to_the_palette():
    rng = np.random.default_rng(4)
    prompts = prompt_set("tuning", 8)
    x = torch.from_numpy(np.stack([draw_scene(scene_for(p, rng)) for p in prompts])).permute(0, 3, 1, 2).float() / 255
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) * 0.5 + x * 0.5
    noisy = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert np.mean(rule.judge(blurred, prompts)) >= 0.9
    assert all(rule.judge(noisy, prompts))


def test_category_scores_report_the_mean_of_the_categories_with_intervals():
    prompts = prompt_set("tuning", 4)
    correct = [p.category == "single" or i % 2 == 0 for i, p in enumerate(prompts)]
    s = rule.category_scores(prompts, correct)
    assert s["single"]["accuracy"] == 1.0 and s["single"]["n"] == 4
    assert s["overall"] == pytest.approx(np.mean([s[c]["accuracy"] for c in CATEGORIES]))
    lo, hi = s["counting"]["ci95"]
    assert lo < s["counting"]["accuracy"] < hi
    from scipy.stats import binomtest

    ci = binomtest(2, 4).proportion_ci(method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


# ---------------------------------------------------------------------------------------------
# Hard negatives
# ---------------------------------------------------------------------------------------------
def test_hard_negatives_are_false_for_the_scene_and_include_the_structural_ones():
    rng = np.random.default_rng(2)
    for category in CATEGORIES:
        for _ in range(10):
            p = random_prompt(category, rng)
            s = scene_for(p, rng)
            negs = hard_negatives(p, s)
            assert negs and len({q.text for q in negs}) == len(negs) and p.text not in {q.text for q in negs}
            assert not any(rule.matches(q, s.background, s.objects) for q in negs)
            few = hard_negatives(p, s, k=6, generator=0)
            assert len(few) == 6 and all(q in negs for q in few)
    p = parse_prompt("a red circle to the left of a blue square on a white background")
    texts = {q.text for q in hard_negatives(p)}
    assert {"a blue circle to the left of a red square on a white background",
            "a red circle to the right of a blue square on a white background",
            "a blue square to the left of a red circle on a white background"} <= texts
    p = parse_prompt("two red circles on a white background")
    assert {"three red circles on a white background", "a red circle on a white background"} <= {q.text for q in hard_negatives(p)}


def test_clip_structure_targets_say_what_scenes_show_and_captions_state():
    """The training-only layout targets of the judging CLIP: an unwarped scene's targets hold its counts and each
    colour's / shape's box centre; a relation caption and its opposite differ exactly in the sign of the named
    axis; an object mostly cropped away is not counted."""
    from toyworld.negatives import OPPOSITE
    from toyworld.prompts import Prompt
    from toyworld.scenes import scene_for
    from toyworld.train_clip import _X0, caption_structure, scene_structure
    from toyworld.world import COLOURS, SHAPES

    p = Prompt("position", "white", (("red", "circle"), ("blue", "square")), "to the left of")
    scene = scene_for(p, np.random.default_rng(4))
    masks = torch.from_numpy(np.stack([template_mask(o.shape, o.box, 64) for o in scene.objects]).astype(np.float32))
    t, m = scene_structure(scene, masks)
    red, circle = _X0 + 2 * COLOURS.index("red"), _X0 + 2 * (len(COLOURS) + SHAPES.index("circle"))
    box = next(o.box for o in scene.objects if o.colour == "red")
    centre = [(box[0] + box[2]) / 64 - 1, (box[1] + box[3]) / 64 - 1]
    assert t[red : red + 2].tolist() == pytest.approx(centre, abs=0.03) and t[circle : circle + 2].tolist() == pytest.approx(centre, abs=0.03)
    assert t[COLOURS.index("red") * len(SHAPES) + SHAPES.index("circle")] == 1 and t[:_X0].sum() > 0 and m[red] == 1
    assert m[_X0 + 2 * COLOURS.index("green")] == 0                       # absent colours have no centre
    cropped = masks.clone()
    cropped[[o.colour for o in scene.objects].index("red")] = 0
    assert scene_structure(scene, cropped)[0][COLOURS.index("red") * len(SHAPES) + SHAPES.index("circle")] == 0

    t1, m1 = caption_structure(p)
    t2, m2 = caption_structure(Prompt(p.category, p.background, p.objects, OPPOSITE[p.relation]))
    assert torch.equal(m1, m2) and torch.equal(t1[:_X0], t2[:_X0])
    assert t1[red] == -1 and t2[red] == 1 and m1[red + 1] == 0            # left of: x named, y left open
    assert torch.equal(t1[_X0:], -t2[_X0:])
    legacy, lm = caption_structure({"colour": "red", "shape": None, "background": None})
    assert lm[: len(COLOURS) * len(SHAPES)].sum() == 0 and legacy[len(COLOURS) * len(SHAPES) + COLOURS.index("red")] == 1


def test_clip_layout_supervision_trains_and_makes_the_image_embedding_say_where_things_are(tmp_path):
    """A short clip_b-like run with the layout heads and sine-cosine position codes: the image layout loss falls,
    and the saved model's image embedding moves when one object moves far more than without them."""
    import dataclasses

    from transformers import CLIPModel

    from toyworld.train_clip import RECIPES, ClipRecipe, normalise, train_clip

    # clip_b's seed and patches with every training lever at its default (off): the plain contrastive recipe
    levers = {f.name: f.default for f in dataclasses.fields(ClipRecipe) if f.default is not dataclasses.MISSING}

    def run(name, **kw):
        r = dataclasses.replace(RECIPES["clip_b"], **{**levers, **kw}, steps=101, batch_size=16, vision_hidden=32,
                                vision_heads=4, text_hidden=32, text_layers=1, vision_layers=2)
        lines = []
        train_clip(r, tmp_path / name, log=lines.append)
        return CLIPModel.from_pretrained(str(tmp_path / name)).float().eval(), lines

    plain, _ = run("plain")
    layout = dict(structure_weight=1.0, position_weight=5.0, sincos_init=3.0)
    laid, lines = run("layout", **layout)
    # the same with one head for both towers, the type counts weighted apart, mined negatives and per-patch types
    shared, shared_lines = run("shared", **layout, shared_head=True, binding_weight=5.0, mine_temperature=0.1,
                               negative_images=1.0, negative_scale=40.0, tied_types=4.0, patch_types=True)
    for log in (lines, shared_lines):
        losses = [float(line.split("image layout ")[1].split()[0]) for line in log if "image layout" in line]
        assert len(losses) == 2 and losses[-1] < 0.7 * losses[0]
    assert "hard-negative acc" in shared_lines[-1] and "image-negative acc" in shared_lines[-1]
    moved = [draw_scene(Scene("white", (SceneObject("red", "square", (x0, 24, x0 + 16, 40)),))) for x0 in (4, 44)]
    x = normalise(torch.from_numpy(np.stack(moved)).permute(0, 3, 1, 2).float() / 255)
    shift = []
    with torch.no_grad():
        for model in (plain, laid, shared):
            emb = model.get_image_features(pixel_values=x)
            emb = getattr(emb, "pooler_output", emb)
            shift.append(1 - F.cosine_similarity(emb[0], emb[1], dim=0).item())
    assert shift[1] > 3 * shift[0] and shift[2] > 3 * shift[0]


def test_swapped_scenes_change_one_binding_or_place_so_that_the_caption_is_false():
    """``negative_images``: the negative image of a caption is its scene with the colours rotated or two objects'
    boxes exchanged -- same background, shapes, colours and boxes, and false for the caption by the rule."""
    from toyworld.train_clip import describes, swapped_scene

    rng = np.random.default_rng(3)
    kinds = set()
    for category in ("two_object", "counting", "colour_attr", "position"):
        for _ in range(40):
            p = random_prompt(category, rng)
            scene = scene_for(p, rng)
            sw = swapped_scene(scene, p, rng)
            if sw is None:  # nothing to swap that the caption would notice
                assert category in ("two_object", "counting") or len({(o.colour, o.shape) for o in scene.objects}) == 1
                continue
            assert not describes(p, sw) and rule.matches(p, scene.background, scene.objects)
            assert sw.background == scene.background and len(sw.objects) == len(scene.objects)
            for attr in ("colour", "shape", "box"):
                assert sorted(getattr(o, attr) for o in sw.objects) == sorted(getattr(o, attr) for o in scene.objects)
            same_boxes = [o.box for o in sw.objects] == [o.box for o in scene.objects]
            kinds.add(("colours rotated" if same_boxes else "places exchanged", category))
    assert {("colours rotated", "colour_attr"), ("places exchanged", "position")} <= kinds
    one = Scene("white", (SceneObject("red", "square", (4, 4, 20, 20)),))
    assert swapped_scene(one, Prompt("single", "white", (("red", "square"),)), rng) is None


def test_patch_targets_name_the_shape_or_the_colour_shape_type_of_the_object_covering_each_patch():
    """``patch_types``: the per-patch head learns each patch's colour-shape type (the conjunction colour binding needs)
    instead of its shape alone; patches no object reaches are background (the last class) either way."""
    from toyworld import world
    from toyworld.scenes import template_mask
    from toyworld.train_clip import patch_targets

    scene = Scene("white", (SceneObject("red", "square", (0, 0, 24, 24)), SceneObject("blue", "circle", (40, 40, 64, 64))))
    objects = torch.zeros(1, 3, 64, 64)
    shapes = torch.zeros(1, len(world.SHAPES), 64, 64)
    for k, o in enumerate(scene.objects):
        objects[0, k] = torch.from_numpy(template_mask(o.shape, o.box, 64)).float()
        shapes[0, world.SHAPES.index(o.shape)] += objects[0, k]
    n_s, n_t = len(world.SHAPES), len(world.COLOURS) * len(world.SHAPES)
    by_shape = patch_targets([scene], shapes, objects, 8).reshape(8, 8)
    by_type = patch_targets([scene], shapes, objects, 8, types=True).reshape(8, 8)
    red_square = world.COLOURS.index("red") * n_s + world.SHAPES.index("square")
    blue_circle = world.COLOURS.index("blue") * n_s + world.SHAPES.index("circle")
    assert by_shape[1, 1] == world.SHAPES.index("square") and by_shape[6, 6] == world.SHAPES.index("circle")
    assert by_type[1, 1] == red_square and by_type[6, 6] == blue_circle
    assert by_shape[0, 7] == n_s and by_type[0, 7] == n_t and by_type[4, 4] == n_t  # background
    assert set(by_type.unique().tolist()) == {red_square, blue_circle, n_t}


def test_mined_negatives_keep_the_structural_ones_and_draw_the_rest_by_the_models_cosine():
    """``mine_temperature``: each image keeps its structural negatives; the other places go to candidates drawn by
    the current model's cosine -- at a tiny temperature the best-scoring one, at a large one any of them."""
    from transformers import CLIPModel

    from toyworld.negatives import _structural
    from toyworld.paths import weights_dir
    from toyworld.train_clip import _mine, _tokenizer, _TokenCache, normalise

    folder = weights_dir("clip_b")
    model = CLIPModel.from_pretrained(str(folder), use_safetensors=True).float().eval()
    tokens = _TokenCache(_tokenizer(folder))
    p = Prompt("position", "white", (("red", "circle"), ("blue", "square")), "to the left of")
    scene = scene_for(p, np.random.default_rng(4))
    x = torch.from_numpy(draw_scene(scene)).permute(2, 0, 1)[None].float() / 255
    cands = hard_negatives(p, scene)
    key = [q for q in cands if _structural(p, q)]
    rest = [q for q in cands if q not in key]
    with torch.no_grad():
        img = F.normalize(model.get_image_features(pixel_values=normalise(x)).pooler_output, dim=-1)[0]
        ids, att = tokens([q.text for q in rest])
        cos = F.normalize(model.get_text_features(input_ids=ids, attention_mask=att).pooler_output, dim=-1) @ img
    best = rest[int(cos.argmax())]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        mined = _mine(model, tokens, x, [p], [cands], len(key) + 1, 1e-4, gen)[0]
        assert mined[: len(key)] == key and mined[-1] == best
    drawn = {_mine(model, tokens, x, [p], [cands], len(key) + 1, 100.0, gen)[0][-1].text for _ in range(40)}
    assert len(drawn) > 10
    assert len(_mine(model, tokens, x, [p], [cands], len(cands) + 5, 1e-4, gen)[0]) == len(cands)


# ---------------------------------------------------------------------------------------------
# Resumable training
# ---------------------------------------------------------------------------------------------
def test_a_stopped_training_resumed_ends_with_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from toyworld import train_state, train_vqgan

    monkeypatch.setattr(train_state, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(train_vqgan, "evaluate", lambda model: {})  # measuring is not what is tested here
    train_vqgan.train_vqgan(tmp_path / "straight", steps=5, log=lambda *a: None)

    real_batch, calls = train_vqgan._batch, []

    def stop_at_fourth(n, rng):
        calls.append(n)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_batch(n, rng)

    monkeypatch.setattr(train_vqgan, "_batch", stop_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        train_vqgan.train_vqgan(tmp_path / "stopped", steps=5, log=lambda *a: None)
    assert (tmp_path / "stopped" / ".training" / "vqgan.json").is_file()
    monkeypatch.setattr(train_vqgan, "_batch", real_batch)
    train_vqgan.train_vqgan(tmp_path / "stopped", steps=5, log=lambda *a: None, resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "stopped" / ".training" / "vqgan.json").exists()  # cleared when done


def test_the_sd_vae_stage_tunes_only_the_decoder_and_a_stopped_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The toy SD's VAE stage: a VAE from scratch, then its decoder alone (the encoder, so the latents a UNet
    learned, bit for bit as they were; the reconstruction error goes down); stopped in the decoder part and
    resumed, it ends with the weights of a run that never stopped."""
    from toyworld import train_sd, train_state

    monkeypatch.setattr(train_state, "CHECKPOINT_EVERY", 2)
    quiet = lambda *a: None  # noqa: E731
    base, _ = train_sd.train_vae(steps=3, log=quiet, **train_sd.VAE_RECIPE)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = train_sd.sample_scenes(8, np.random.default_rng(5)).tensors() * 2 - 1

    def error(vae):
        with torch.no_grad():
            return float((vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean())

    base_error = error(base)
    straight, seconds = train_sd.vae_stage(tmp_path / "straight", 3, 20, log=quiet)
    assert set(seconds) == {"vae", "decoder"}
    after = straight.state_dict()
    encoder = [k for k in after if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    assert all(not torch.equal(after[k], before[k]) for k in after if k.startswith("decoder.conv_out"))
    assert error(straight) < base_error

    real, calls = train_sd.sample_scenes, []

    def stop_in_the_decoder_part(n, rng, **kw):
        calls.append(n)
        if len(calls) == 3 + 7:
            raise KeyboardInterrupt
        return real(n, rng, **kw)

    monkeypatch.setattr(train_sd, "sample_scenes", stop_in_the_decoder_part)
    with pytest.raises(KeyboardInterrupt):
        train_sd.vae_stage(tmp_path / "stopped", 3, 20, log=quiet)
    training = tmp_path / "stopped" / ".training"
    assert (training / "sd-vae-decoder.json").is_file() and (training / "vae-base" / "config.json").is_file()
    monkeypatch.setattr(train_sd, "sample_scenes", real)
    resumed, _ = train_sd.vae_stage(tmp_path / "stopped", 3, 20, log=quiet, resume=True)
    assert all(torch.equal(after[k], v) for k, v in resumed.state_dict().items())
    assert not (training / "vae-base").exists() and not (training / "sd-vae-decoder.json").exists()


def test_evaluate_judges_a_folder_per_category_with_the_rule(tmp_path, capsys):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("clipsteer_evaluate_v3", root / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = evaluate
    spec.loader.exec_module(evaluate)
    rng = np.random.default_rng(8)
    prompts = prompt_set("tuning", 2)
    lines = []
    for i, p in enumerate(prompts):
        scene = scene_for(p, rng)
        if i % 2:  # every second image is drawn for another prompt: wrong
            scene = scene_for(hard_negatives(p, scene)[0], rng)
        Image.fromarray(draw_scene(scene)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": p.text}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.json"
    assert evaluate.main([str(tmp_path), "--pairs", str(tmp_path / "pairs.jsonl"), "--metric", "toy_judge",
                          "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    values = [r["toy_judge"] for r in data["rows"]]
    assert values == [1.0, 0.0] * 5
    groups = {s["group"]: s for s in data["summary"]}
    assert set(groups) == {"all", *CATEGORIES} and groups["counting"]["mean"] == 0.5 and groups["all"]["n"] == 10
    assert "counting" in capsys.readouterr().out


@pytest.mark.slow  # trains, then measures on 640 held-out scenes: about a minute on an idle 2-core machine
def test_train_toy_only_itm_makes_a_blip_itm_folder_that_loads_as_a_reward(tmp_path):
    """``train_toy.py --only itm``: a BlipForImageTextRetrieval folder with its processor; as the ``itm`` reward
    its score is differentiable in the pixels and its reference (metric) form gives the same number on 8-bit
    images."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from guidance.rewards import load_reward
    from toyworld.paths import MODELS

    import shutil

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "toyworld" / "weights" / "clip_a", tmp_path / "clip_a")   # its vision tower starts from clip_a's
    proc = subprocess.run([sys.executable, str(root / "scripts" / "train_toy.py"), "--only", "itm", "--steps-scale",
                           "0.001", "--out", str(tmp_path)], capture_output=True, text=True, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all((tmp_path / "itm" / f).is_file() for f in MODELS["itm"])
    metrics = json.loads((tmp_path / "training_metrics.json").read_text())
    assert metrics["itm"]["steps"] == 12 and set(metrics["itm"]["hard_negatives"]["clean"]) == set(CATEGORIES)
    assert "## Toy image-text matching model (`itm`" in (tmp_path / "TRAINING.md").read_text()
    reward = load_reward(f"itm:{tmp_path / 'itm'}")
    p = prompt_set("tuning", 1)[4]
    x = torch.from_numpy(draw_scene(scene_for(p, 0))).permute(2, 0, 1)[None].float() / 255
    x.requires_grad_(True)
    s = reward.score(x, p.text)
    s.sum().backward()
    assert s.shape == (1,) and x.grad.abs().sum() > 0
    ref = reward.score_reference((x.detach() * 255).round().to(torch.uint8), [p.text])
    assert ref.double() == pytest.approx(s.detach().double(), abs=1e-4)
    from guidance.rewards import RewardLoadError

    with pytest.raises(RewardLoadError, match="could not load the ITM model"):
        load_reward(f"itm:{tmp_path}")


def test_itm_training_mirrors_position_scenes_and_grounds_each_shape_word():
    """The ITM's position signals: a mirrored scene makes its caption false and the opposite relation true (by
    the judging rule); each shape word of a caption is paired with its own object's centre; each relation word
    with how far its relation holds (positive in the scene, the negative in its mirror); the patch head's
    place targets are the patches' centres in ViT order."""
    from transformers import BertTokenizer

    from toyworld.negatives import OPPOSITE
    from toyworld.scenes import SceneBatch
    from toyworld.train_itm import RELATION_WORDS, _grounding_targets, _patch_coordinates, _relation_targets, mirrored
    from toyworld.paths import weights_dir

    rng = np.random.default_rng(4)
    for _ in range(40):
        p = random_prompt("position", rng)
        sc = scene_for(p, rng)
        m = mirrored(sc, p.relation, 64)
        assert rule.matches(p, sc.background, sc.objects) and not rule.matches(p, m.background, m.objects)
        assert rule.matches(Prompt("position", p.background, p.objects, OPPOSITE[p.relation]), m.background, m.objects)

    prompts = [random_prompt(c, rng) for c in ("position", "colour_attr", "two_object", "counting", "single")]
    scenes = [scene_for(p, rng) for p in prompts]
    batch = SceneBatch(np.stack([draw_scene(sc) for sc in scenes]), scenes, prompts, [p.text for p in prompts], prompts)
    tok = BertTokenizer.from_pretrained(str(weights_dir("itm")))
    ids = tok([p.text for p in prompts], padding=True, return_tensors="pt")["input_ids"]
    rows, cols, centres = _grounding_targets(batch, ids, list(range(5)), tok.convert_tokens_to_ids(list(SHAPES)), 64)
    assert rows == [0, 0, 1, 1, 2, 2, 4]      # counting's objects share their word: none
    for row, col, centre in zip(rows, cols, centres):
        word = tok.convert_ids_to_tokens(int(ids[row, col]))
        obj = [o for o in scenes[row].objects if o.shape == word]
        named = [c for c, s in prompts[row].objects if s == word][0]
        obj = [o for o in obj if named is None or o.colour == named][0]
        assert centre.tolist() == pytest.approx([(obj.box[0] + obj.box[2]) / 64 - 1, (obj.box[1] + obj.box[3]) / 64 - 1])

    pos = [random_prompt("position", rng) for _ in range(8)]
    scenes = [scene_for(p, rng) for p in pos]
    batch = SceneBatch(np.stack([draw_scene(sc) for sc in scenes]), scenes, pos, [p.text for p in pos], pos)
    ids = tok([p.text for p in pos], padding=True, return_tensors="pt")["input_ids"]
    rows, cols, held = _relation_targets(batch, ids, list(range(8)), tok, 64)
    assert rows == list(range(8)) and bool((held > 0).all())     # each caption's relation holds in its scene
    assert [tok.convert_ids_to_tokens(int(ids[r, c])) for r, c in zip(rows, cols)] == [
        RELATION_WORDS[p.relation][0] for p in pos]
    flipped = SceneBatch(batch.images, [mirrored(sc, p.relation, 64) for sc, p in zip(scenes, pos)], pos, batch.captions, pos)
    assert _relation_targets(flipped, ids, list(range(8)), tok, 64)[2].tolist() == pytest.approx((-held).tolist())

    where = _patch_coordinates(64)
    assert where[1].tolist() == pytest.approx([-0.625, -0.875]) and where[8].tolist() == pytest.approx([-0.875, -0.625])


def test_itm_vision_tower_starts_as_clip_a():
    """``vision_from_clip``: the BLIP tower made from clip_a's weights gives clip_a's patch states (after its
    post-layernorm) on held-out scenes, up to the pre-layernorm that BLIP lacks (folded in approximately), and
    an untouched tower does not."""
    from transformers import BlipForImageTextRetrieval, CLIPModel

    from toyworld.evaluation import held_out_scenes
    from toyworld.paths import weights_dir
    from toyworld.scenes import sample_scenes
    from toyworld.train_clip import normalise
    from toyworld.train_itm import RECIPE, make_config, vision_from_clip

    clip = CLIPModel.from_pretrained(str(weights_dir("clip_a")), use_safetensors=True).float().eval()
    torch.manual_seed(0)
    blip = BlipForImageTextRetrieval(make_config(64, RECIPE)).eval()
    _, x = held_out_scenes(4)
    x = normalise(x)
    with torch.no_grad():
        want = clip.vision_model.post_layernorm(clip.vision_model(pixel_values=x).last_hidden_state)
        before = F.cosine_similarity(blip.vision_model(pixel_values=x).last_hidden_state, want, dim=-1).mean()
        vision_from_clip(blip.vision_model, clip.vision_model, normalise(sample_scenes(64, np.random.default_rng(1)).tensors()))
        after = F.cosine_similarity(blip.vision_model(pixel_values=x).last_hidden_state, want, dim=-1)
    assert after.mean() > 0.97 and after.min() > 0.7 and before < 0.5


def test_resume_keeps_finished_models_and_reruns_the_rest(tmp_path):
    """``train_toy.py --resume`` keeps a model whose folder is complete and measured, and trains one with a
    pending checkpoint or no record again."""
    import importlib.util
    import sys
    from pathlib import Path

    from toyworld.paths import MODELS

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("clipsteer_train_toy_v3", root / "scripts" / "train_toy.py")
    train_toy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_toy
    spec.loader.exec_module(train_toy)
    for name in ("clip_c", "clip_d", "sd"):
        for f in MODELS[name]:
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).write_text("x")
    (tmp_path / "clip_d" / ".training").mkdir()
    (tmp_path / "clip_d" / ".training" / "clip_d.json").write_text("{}")  # stopped part-way
    metrics = {"clip_c": {}, "clip_d": {}, "sd": {}, "sd_guided": {}}
    tasks = ["clip_a", "clip_c", "clip_d", "sd_vae", "sd", "guided", "itm"]
    assert train_toy.finished_tasks(tasks, tmp_path, metrics) == {"clip_c", "sd_vae", "sd", "guided"}
    assert train_toy.finished_tasks(tasks, tmp_path, {"clip_c": {}}) == {"clip_c"}  # sd not measured: retrained


def test_committed_itm_reward_is_blips_itm_head_and_ranks_two_object_captions():
    """``--reward itm:toy`` loads the committed weights; its score is transformers' own
    ``BlipForImageTextRetrieval(use_itm_head=True)`` log-odds on the processor's pixels, and it puts a
    two-object scene's caption above the caption with one of the objects replaced by another shape, a
    colour_attr scene's caption above the one with the two colours swapped, and a position caption's scene
    above the same scene mirrored (the relation reversed), on most held-out scenes."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from guidance.rewards import load_reward
    from toyworld.paths import weights_dir

    reward = load_reward("itm:toy")
    rng = np.random.default_rng(3)
    prompts = [random_prompt("two_object", rng) for _ in range(16)]
    scenes = [scene_for(p, rng) for p in prompts]
    images = torch.stack([torch.from_numpy(draw_scene(sc)).permute(2, 0, 1) for sc in scenes])
    swapped = [next(q for q in hard_negatives(p, sc) if q.background == p.background and q.category == p.category)
               for p, sc in zip(prompts, scenes)]

    folder = str(weights_dir("itm"))
    model = BlipForImageTextRetrieval.from_pretrained(folder).float().eval()
    processor = BlipProcessor.from_pretrained(folder)
    from PIL import Image

    pils = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images[:4]]
    batch = processor(images=pils, text=[p.text for p in prompts[:4]], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch, use_itm_head=True).itm_score
    ours = reward.score_reference(images[:4], [p.text for p in prompts[:4]])
    assert ours.double() == pytest.approx((logits[:, 1] - logits[:, 0]).double(), abs=1e-4)

    true = reward.score(images.float() / 255, [p.text for p in prompts])
    false = reward.score(images.float() / 255, [q.text for q in swapped])
    assert (true > false).float().mean() >= 0.75

    binding = [random_prompt("colour_attr", rng) for _ in range(16)]
    scenes = [scene_for(p, rng) for p in binding]
    images = torch.stack([torch.from_numpy(draw_scene(sc)).permute(2, 0, 1) for sc in scenes]).float() / 255
    swapped = [Prompt("colour_attr", p.background, ((p.objects[1][0], p.objects[0][1]), (p.objects[0][0], p.objects[1][1])))
               .text for p in binding]
    true = reward.score(images, [p.text for p in binding])
    false = reward.score(images, swapped)
    assert (true > false).float().mean() >= 0.75

    from toyworld.train_itm import mirrored

    placed = [random_prompt("position", rng) for _ in range(16)]
    scenes = [scene_for(p, rng) for p in placed]
    as_said = torch.stack([torch.from_numpy(draw_scene(sc)).permute(2, 0, 1) for sc in scenes]).float() / 255
    reversed_ = torch.stack([torch.from_numpy(draw_scene(mirrored(sc, p.relation, 64))).permute(2, 0, 1)
                             for sc, p in zip(scenes, placed)]).float() / 255
    texts = [p.text for p in placed]
    assert (reward.score(as_said, texts) > reward.score(reversed_, texts)).float().mean() >= 0.75


def test_itm_views_reward_is_the_itm_mean_over_mirrored_and_shifted_views():
    """``--reward itm_views:toy``: the mean of the ``itm`` reward's log-odds over the image, its left-right
    mirror with "left"/"right" swapped in the caption, its upside-down view with "above"/"below" swapped,
    both, and the image rolled by 1/16 of its size each way; differentiable in the pixels."""
    from guidance.rewards import load_reward
    from guidance.rewards.itm_views import mirror_caption

    assert mirror_caption("a red square to the left of a cross, leftover right", "horizontal") == \
        "a red square to the right of a cross, leftover left"
    assert mirror_caption("a circle above a square below", "vertical") == "a circle below a square above"
    assert mirror_caption("a circle above a square", "horizontal") == "a circle above a square"

    single, views = load_reward("itm:toy"), load_reward("itm-views:toy")
    rng = np.random.default_rng(5)
    placed = [random_prompt("position", rng) for _ in range(3)]
    images = torch.stack([torch.from_numpy(draw_scene(scene_for(p, rng))).permute(2, 0, 1) for p in placed]).float() / 255
    texts = [p.text for p in placed]
    lr = [t.replace("left", "@").replace("right", "left").replace("@", "right") for t in texts]
    ab = [t.replace("above", "@").replace("below", "above").replace("@", "below") for t in texts]
    both = [mirror_caption(t, "vertical") for t in lr]
    with torch.no_grad():
        by_hand = [single.score(images, texts), single.score(images.flip(-1), lr), single.score(images.flip(-2), ab),
                   single.score(images.flip(-1).flip(-2), both)]
        by_hand += [single.score(torch.roll(images, shift, dims=(-2, -1)), texts)
                    for shift in ((0, 4), (4, 0), (0, -4), (-4, 0))]
        assert views.score(images, texts) == pytest.approx(torch.stack(by_hand).mean(0), abs=1e-4)
    pixels = images.clone().requires_grad_(True)
    views.score(pixels, texts).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_committed_vqgan_reconstructs_every_category_as_training_md_records():
    """The toy VQGAN, loaded the way the VQGAN backend loads any taming folder, keeps drawn scenes of every
    category right by the rule in >= 98% (issue 29's bar), and the figures recorded in TRAINING.md are these."""
    import json

    from generators.vqgan.backend import load_vqgan
    from toyworld.bars import RECONSTRUCTION_BAR
    from toyworld.evaluation import reconstruction_scores
    from toyworld.paths import WEIGHTS_DIR

    model = load_vqgan(WEIGHTS_DIR / "vqgan")
    assert model.downsample == 2
    with torch.no_grad():
        scores = reconstruction_scores(lambda x: (model.decode(model.encode(x * 2 - 1)) + 1) / 2)
    recorded = json.loads((WEIGHTS_DIR / "training_metrics.json").read_text())["vqgan"]["judge_by_category"]
    for category in CATEGORIES:
        assert scores[category]["accuracy"] >= RECONSTRUCTION_BAR, (category, scores[category])
        assert scores[category]["right"] == recorded[category]["right"], category
