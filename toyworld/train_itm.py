"""Train the toy world's image-text matching model (the compositional reward) and save it as a
transformers ``BlipForImageTextRetrieval`` folder with its ``BlipProcessor``.

A tiny BLIP: a ViT over 8-pixel patches of the 64x64 image and a BERT-style text encoder whose layers
cross-attend to the patches; the ITM head reads the [CLS] state. Each training image comes with its own
caption and ``NEGATIVES`` of its hard negatives (``toyworld.negatives``: swapped colours, the opposite or
reversed relation, another count, ...); each position scene also comes mirrored along its relation's axis
(``mirrored``: the same objects, the relation reversed), an image-side negative of its caption. These losses
train it:

- the match head as a binary classifier (caption = match, negatives and mirrored scenes = no match);
- a ranking loss: the softmax over one image's candidates puts the caption first, and the softmax over a
  position caption's scene and its mirror puts the scene first (what the reward is used for: ranking
  images or captions by match);
- while training only, a linear head reads every patch state and predicts the share of each palette colour
  and each shape (or none) in that patch of the clean scene, and where the patch is. It gives the vision
  tower a dense signal from the first step, so it learns what is where long before the match head alone
  would teach it, and keeps the patches' places, which the CLIP it starts from has washed out; it is
  not saved;
- while training only, a linear head reads the text state of each object's shape word and predicts that
  object's centre in the image (``_grounding_targets``), and another reads each relation word's state and
  predicts how far the relation holds (``_relation_targets``: the two centres' offset along its direction,
  reversed in the mirrored scene): the words learn to find their object and the relation word to compare
  their places, which is what a relation is judged on. Neither is saved.

Images are made imperfect as the CLIPs' are (noise blends, cut shapes, impure colours, blur) and
photometrically augmented, never cropped, flipped or warped: a crop can remove an object or move it,
and the caption would then be wrong. It is the toy counterpart of ImageReward / VQAScore: an objective
(``--reward itm:toy``), a verifier for best-of-N search and a metric; it never judges the benchmark (the
rule does).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataclasses import replace

from .scenes import Scene, draw_scene, object_mask, sample_scenes, template_mask
from .tokenizer import write_bert_tokenizer
from .train_clip import CLIP_MEAN, CLIP_STD, _imperfect, normalise
from .train_state import Checkpointer
from .world import COLOURS, PALETTE, SHAPES

ITM_SEED = 7007
NEGATIVES = 7
# The vision tower has clip_a's shape (ViT 64px / patch 8, hidden 64, 4 layers, 4 heads) and starts from its
# weights (``vision_from_clip``): a ViT learns shapes slowly from scratch, and clip_a already tells them apart.
RECIPE = dict(steps=12000, batch_size=24, lr=1e-3, image_size=64, patch_size=8, hidden=64, layers=4, heads=4,
              text_layers=4, imperfect_prob=0.3, curriculum=0.3, patch_weight=1.0, vision_init="clip_a",
              ground_weight=1.0)


def make_config(vocab_size: int, r: dict = RECIPE):
    from transformers import BlipConfig

    h = r["hidden"]
    vision = dict(image_size=r["image_size"], patch_size=r["patch_size"], hidden_size=h, intermediate_size=4 * h,
                  num_hidden_layers=r["layers"], num_attention_heads=r["heads"], layer_norm_eps=1e-5,
                  hidden_act="quick_gelu")   # as the toy CLIPs' towers
    text = dict(vocab_size=vocab_size, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=r["text_layers"],
                num_attention_heads=r["heads"], encoder_hidden_size=h, max_position_embeddings=40, pad_token_id=0,
                bos_token_id=2, eos_token_id=3, sep_token_id=3)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=h)


@torch.no_grad()
def vision_from_clip(vision, clip_vision, images: torch.Tensor) -> None:
    """Copy a transformers CLIP vision tower (``CLIPVisionTransformer``) of the same shape into a BLIP one.

    The layers map one to one (q, k and v stacked into BLIP's fused ``qkv``). CLIP layer-normalises the
    embeddings before the first layer and BLIP does not; that norm is folded into the patch and position
    embeddings, exactly for the class token and for the patches up to the spread of their norms, measured
    on ``images`` (normalised pixels). Training starts from there."""
    ce, be = clip_vision.embeddings, vision.embeddings
    pre = clip_vision.pre_layrnorm
    d = ce.class_embedding.numel()
    centre = torch.eye(d) - 1.0 / d
    patches = ce.patch_embedding(images).flatten(2).transpose(1, 2) + ce.position_embedding.weight[1:]
    spread = (patches - patches.mean(-1, keepdim=True)).pow(2).mean(-1).add(pre.eps).sqrt().mean()
    scale = pre.weight / spread
    be.patch_embedding.weight.copy_(torch.einsum("o,oi,ichw->ochw", scale, centre, ce.patch_embedding.weight))
    be.patch_embedding.bias.copy_(pre.bias)
    pos = ce.position_embedding.weight
    be.position_embedding[0, 1:].copy_((pos[1:] @ centre.T) * scale)
    be.position_embedding[0, 0].zero_()
    be.class_embedding[0, 0].copy_(pre(ce.class_embedding + pos[0]))
    for bl, cl in zip(vision.encoder.layers, clip_vision.encoder.layers):
        a = cl.self_attn
        bl.self_attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        bl.self_attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        bl.self_attn.projection.load_state_dict(a.out_proj.state_dict())
        for name in ("layer_norm1", "layer_norm2", "mlp"):
            getattr(bl, name).load_state_dict(getattr(cl, name).state_dict())
    vision.post_layernorm.load_state_dict(clip_vision.post_layernorm.state_dict())


def processor_for(folder: Path, image_size: int):
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    tokenizer = BertTokenizer.from_pretrained(str(folder))
    images = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD), do_convert_rgb=True, resample=3)
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


def _candidates(batch, rng: np.random.Generator) -> tuple[list[int], list[str], list[int]]:
    """The training pairs of a batch: (image index, text) of each image's caption followed by up to
    NEGATIVES hard negatives of its prompt, and where each image's candidates start."""
    from .negatives import hard_negatives

    owners, texts, starts = [], [], []
    for i, (caption, prompt, scene) in enumerate(zip(batch.captions, batch.prompts, batch.scenes)):
        starts.append(len(texts))
        negatives = [q.text for q in hard_negatives(prompt, scene, k=NEGATIVES, generator=rng)]
        owners += [i] * (1 + len(negatives))
        texts += [caption, *negatives]
    return owners, texts, starts


def _patch_targets(batch, patch: int) -> torch.Tensor:
    """``[N, P, C + 1 + S]``: per patch of each clean scene, the share of its pixels in each palette colour,
    then the share that is background (no shape) or each shape."""
    x = batch.tensors()
    palette = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255
    nearest = ((x[:, None] - palette[None, :, :, None, None]) ** 2).sum(2).argmin(1)
    colours = F.one_hot(nearest, len(COLOURS)).permute(0, 3, 1, 2).float()
    size = x.shape[-1]
    shapes = np.zeros((len(batch), 1 + len(SHAPES), size, size), np.float32)
    shapes[:, 0] = 1
    for i, scene in enumerate(batch.scenes):
        for o in scene.objects:
            m = template_mask(o.shape, o.box, size)
            shapes[i, 0][m] = 0
            shapes[i, 1 + SHAPES.index(o.shape)][m] = 1
    maps = torch.cat([colours, torch.from_numpy(shapes)], 1)
    return F.avg_pool2d(maps, patch).flatten(2).transpose(1, 2)


def _patch_coordinates(patches: int) -> torch.Tensor:
    """``[P, 2]``: each patch's centre (x, y) in [-1, 1], row-major as the ViT orders them."""
    g = math.isqrt(patches)
    centres = (torch.arange(g, dtype=torch.float32) + 0.5) / g * 2 - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)


def _patch_loss(head: torch.nn.Linear, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of the patch head's colour and shape predictions against ``_patch_targets``, and
    the error of its guess of where the patch is. A tower started from a CLIP keeps no trace of where a patch
    lies (a linear probe of the CLIP-initialised states guesses the patch's column no better than chance),
    and without it no caption word can tell left from right."""
    out = head(states[:, 1:])      # the patches, not the class token
    c, k = len(COLOURS), len(COLOURS) + 1 + len(SHAPES)
    colour = -(targets[..., :c] * out[..., :c].log_softmax(-1)).sum(-1).mean()
    shape = -(targets[..., c:k] * out[..., c:k].log_softmax(-1)).sum(-1).mean()
    where = F.smooth_l1_loss(out[..., k:], _patch_coordinates(out.shape[1]).expand_as(out[..., k:]), beta=0.1)
    return colour + shape + where


def mirrored(scene: Scene, relation: str, size: int) -> Scene:
    """``scene`` with every box reflected across the canvas's middle along ``relation``'s axis: the same
    objects, their relation reversed (shapes stay upright). For a position caption it is an image-side hard
    negative: only where things are tells it from the scene the caption describes."""
    horizontal = relation in ("to the left of", "to the right of")

    def flip(box):
        x0, y0, x1, y1 = box
        return (size - x1, y0, size - x0, y1) if horizontal else (x0, size - y1, x1, size - y0)

    return Scene(scene.background, tuple(replace(o, box=flip(o.box)) for o in scene.objects))


def _centre(scene: Scene, colour: str | None, shape: str, size: int) -> tuple[float, float]:
    """The centre, in [-1, 1], of the object of ``scene`` a prompt names (colour None: any colour)."""
    obj = next(o for o in scene.objects if o.shape == shape and (colour is None or o.colour == colour))
    x0, y0, x1, y1 = obj.box
    return (x0 + x1) / size - 1.0, (y0 + y1) / size - 1.0


def _grounding_targets(batch, ids: torch.Tensor, starts: list[int], shape_ids: list[int], size: int):
    """Where each named object is: ``(rows, token positions, [K, 2] centres in [-1, 1])`` for the shape word
    of every object of each caption (captions whose shape words name their objects one to one, in order;
    not counting, whose objects share one word). Trains the text states to find their object in the image."""
    rows, cols, centres = [], [], []
    is_shape = torch.isin(ids, torch.tensor(shape_ids))
    for prompt, scene, row in zip(batch.prompts, batch.scenes, starts):
        where = is_shape[row].nonzero().flatten().tolist()
        if prompt.category == "counting" or len(where) != len(prompt.objects):
            continue
        for (colour, shape), col in zip(prompt.objects, where):
            rows.append(row)
            cols.append(col)
            centres.append(_centre(scene, colour, shape, size))
    return rows, cols, torch.tensor(centres, dtype=torch.float32).reshape(-1, 2)


# the word of each relation, and the direction in which the first object lies from the second where it holds
RELATION_WORDS = {"to the left of": ("left", (-1, 0)), "to the right of": ("right", (1, 0)), "above": ("above", (0, -1)),
                  "below": ("below", (0, 1))}


def _relation_targets(batch, ids: torch.Tensor, starts: list[int], tokenizer, size: int):
    """How far the relation a caption states holds: ``(rows, token positions, [K] values)`` for the relation
    word of each position caption: the offset of the first object's centre from the second's along the
    relation's direction (in half-canvases; positive where the objects lie as the caption says). The
    relation word learns to compare the two places its objects' words found."""
    rows, cols, values = [], [], []
    for prompt, scene, row in zip(batch.prompts, batch.scenes, starts):
        if not prompt.relation:
            continue
        word, (dx, dy) = RELATION_WORDS[prompt.relation]
        where = (ids[row] == tokenizer.convert_tokens_to_ids(word)).nonzero().flatten().tolist()
        if len(where) != 1:
            continue
        (c1, s1), (c2, s2) = prompt.objects
        (xa, ya), (xb, yb) = _centre(scene, c1, s1, size), _centre(scene, c2, s2, size)
        rows.append(row)
        cols.append(where[0])
        values.append(dx * (xa - xb) + dy * (ya - yb))
    return rows, cols, torch.tensor(values, dtype=torch.float32)


def photometric_augment():
    """Brightness / contrast jitter, blur and noise: what changes in a rendered image without moving,
    removing or adding an object."""
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.ColorJiggle(brightness=0.1, contrast=0.1, p=0.5),
        K.RandomGaussianBlur((5, 5), sigma=(0.1, 1.5), p=0.3),
        K.RandomGaussianNoise(std=0.06, p=0.3),
        data_keys=["input"],
    )


@torch.no_grad()
def evaluate(model, tokenizer, per_category: int = 64, noise: float = 0.0) -> dict[str, float]:
    """Per category, how often the true prompt scores above every hard negative (``ranking_accuracy``)."""
    from guidance.rewards.itm import match_logodds

    from .evaluation import ranking_accuracy

    model.eval()

    def score(x, texts):
        embeds = model.vision_model(pixel_values=normalise(x)).last_hidden_state
        out = []
        for i, caps in enumerate(texts):
            tok = tokenizer(caps, padding=True, return_tensors="pt")
            out.append(match_logodds(model, embeds[i : i + 1].expand(len(caps), -1, -1), tok["input_ids"],
                                     tok["attention_mask"]))
        return out

    return ranking_accuracy(score, per_category, noise=noise)


def train_itm(out_dir: str | Path, steps: int | None = None, log=print, resume: bool = False,
              clip_folder: str | Path | None = None) -> dict:
    """Train the toy ITM model from its seed, save it to ``out_dir`` and measure it. Returns metrics.
    ``clip_folder``: the CLIP whose vision tower it starts from (default: ``RECIPE["vision_init"]`` next to
    ``out_dir``)."""
    from transformers import BlipForImageTextRetrieval

    from guidance.rewards.itm import logodds_from_states, match_states

    r = RECIPE
    steps = steps or r["steps"]
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    torch.manual_seed(ITM_SEED)
    rng = np.random.default_rng(ITM_SEED)
    gen = torch.Generator().manual_seed(ITM_SEED)
    write_bert_tokenizer(out_dir)
    processor = processor_for(out_dir, r["image_size"])
    tokenizer = processor.tokenizer
    model = BlipForImageTextRetrieval(make_config(len(tokenizer), r)).float().train()
    clip_folder = Path(clip_folder) if clip_folder else out_dir.parent / r["vision_init"]
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_folder), use_safetensors=True).float()   # a resumed run overwrites it
    sample = sample_scenes(64, np.random.default_rng(ITM_SEED + 1))
    vision_from_clip(model.vision_model, clip.vision_model, normalise(sample.tensors()))
    del clip
    patch_head = torch.nn.Linear(r["hidden"], len(COLOURS) + 1 + len(SHAPES) + 2)   # training only, not saved
    ground_head = torch.nn.Linear(r["hidden"], 2)   # training only: a shape word's state -> its object's centre
    relation_head = torch.nn.Linear(r["hidden"], 1)   # training only: a relation word's state -> how far it holds
    shape_ids = tokenizer.convert_tokens_to_ids(list(SHAPES))
    heads = {"patch_head": patch_head, "ground_head": ground_head, "relation_head": relation_head}
    params = list(model.parameters()) + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=0.05, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    aug = photometric_augment()
    ckpt = Checkpointer(out_dir / ".training", "itm", resume=resume, log=log,
                        objects={"model": model, **heads, "opt": opt, "sched": sched}, np_rng=rng,
                        generators={"gen": gen})
    first, extra = ckpt.start()
    running = extra.get("running")
    pos_weight = torch.tensor(float(NEGATIVES))  # as much weight on the one match as on its negatives
    for step in range(first, steps):
        early = step < int(r["curriculum"] * steps)
        batch = sample_scenes(r["batch_size"], rng, legacy_caption_prob=0.3, plain_article_prob=0.25)
        size = batch.images.shape[1]
        owners, texts, starts = _candidates(batch, rng)
        # image-side negatives: each position scene mirrored along its relation's axis, with the same caption
        flips = [i for i, p in enumerate(batch.prompts) if p.relation]
        scenes = list(batch.scenes) + [mirrored(batch.scenes[i], batch.prompts[i].relation, size) for i in flips]
        clean = torch.cat([batch.tensors(), torch.from_numpy(np.stack([draw_scene(sc, size) for sc in scenes[len(batch):]]))
                           .permute(0, 3, 1, 2).float().div(255) if flips else batch.tensors()[:0]])
        union = torch.from_numpy(np.stack([object_mask(sc, size) for sc in scenes]))
        x, _ = _imperfect(clean, union, rng, 0.0 if early else r["imperfect_prob"], gen)
        x = x if early else aug(x).clamp(0, 1)
        owners += [len(batch) + k for k in range(len(flips))]
        texts += [texts[starts[i]] for i in flips]
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        states = model.vision_model(pixel_values=normalise(torch.cat([x, clean[: len(batch)]]))).last_hidden_state
        text_states = match_states(model, states[torch.tensor(owners)], tok["input_ids"], tok["attention_mask"])
        logits = logodds_from_states(model, text_states)
        labels = torch.zeros(len(texts))
        labels[starts] = 1.0
        ends = starts[1:] + [len(texts) - len(flips)]
        groups = [torch.arange(a, b) for a, b in zip(starts, ends)]   # each image's caption and its negatives
        mirror_rows = len(texts) - len(flips) + torch.arange(len(flips))
        groups += [torch.stack([torch.tensor(starts[i]), m]) for i, m in zip(flips, mirror_rows)]   # caption: image vs mirror
        ranking = torch.stack([F.cross_entropy(logits[g][None], torch.zeros(1, dtype=torch.long)) for g in groups]).mean()
        rows, cols, centres = _grounding_targets(batch, tok["input_ids"], starts, shape_ids, size)
        ground = (F.smooth_l1_loss(ground_head(text_states[rows, cols]), centres, beta=0.1) if rows
                  else logits.new_zeros(()))
        rows, cols, held = _relation_targets(batch, tok["input_ids"], starts, tokenizer, size)
        if rows:   # a mirrored scene reverses each offset along the relation's axis
            back = {starts[i]: int(m) for i, m in zip(flips, mirror_rows)}
            rows, cols = rows + [back[q] for q in rows], cols + cols
            held = torch.cat([held, -held])
            ground = ground + F.smooth_l1_loss(relation_head(text_states[rows, cols])[:, 0], held, beta=0.1)
        loss = (F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight) + ranking
                + r["patch_weight"] * _patch_loss(patch_head, states[len(x):], _patch_targets(batch, r["patch_size"]))
                + r["ground_weight"] * ground)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"[itm] step {step}/{steps} loss {running:.3f} ({time.perf_counter() - t0:.0f}s)")
        if step % 1000 == 999:
            log(f"[itm] step {step} ranking accuracy {evaluate(model, tokenizer, per_category=32)}")
            model.train()
        ckpt.step_done(step, {"running": running})
    train_time = ckpt.elapsed()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(out_dir), safe_serialization=True)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(str(out_dir))
    ckpt.finish()
    loaded = BlipForImageTextRetrieval.from_pretrained(str(out_dir)).float()
    return {"name": "itm", "seed": ITM_SEED, "steps": steps, "batch_size": r["batch_size"], "negatives": NEGATIVES,
            "params": sum(p.numel() for p in model.parameters()), "vision_init": clip_folder.name, "train_seconds": train_time, "recipe": dict(r),
            "hard_negatives": {"clean": evaluate(loaded, tokenizer), "noisy": evaluate(loaded, tokenizer, noise=0.1)}}
