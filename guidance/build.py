"""Objectives and scores from plain options (the keys of ``scripts/generate.py``'s guidance options).

``build_schedule(opts)`` turns the prompt options into a :class:`PromptSchedule`,
``build_objective(opts, schedule, ...)`` into the objective that steers a run (a ``CLIPLoss``, or
``None`` with ``clip: none``), ``score_images`` scores finished images with an evaluation CLIP.
Encoders are kept across runs in the one model cache (:mod:`guidance.cache`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .encoders import CLIP_VIT_L14

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_EVAL = CLIP_VIT_L14
DEFAULT_EVAL_ALT = "openai/clip-vit-base-patch16"  # when the large one guided
NONE_WORDS = ("none", "off", "no", "false", "")


def is_none_word(value: Any) -> bool:
    return value is None or str(value).strip().lower() in NONE_WORDS


def story_entries(story) -> dict[int, list]:
    """``"0=a forest; 100=a city|night:0.5"`` or ``{0: "a forest", 100: "a city"}`` -> {step: prompts}."""
    from .prompts import parse_prompts

    if isinstance(story, Mapping):
        try:
            return {int(k): parse_prompts(v) for k, v in story.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"story must map steps to prompts, e.g. {{0: 'a forest', 100: 'a city'}}: {err}") from None
    entries: dict[int, list] = {}
    for part in (p for p in str(story).split(";") if p.strip()):
        step, sep, rest = part.partition("=")
        if not (sep and step.strip().isdigit()):
            raise ValueError(f"story entry {part.strip()!r} needs a step: write 'STEP=prompts', "
                             "e.g. '0=a forest; 100=a city'")
        entries[int(step)] = parse_prompts(rest)
    return entries


def build_schedule(opts: Mapping[str, Any]):
    """The ``PromptSchedule`` of text/image/noise prompts and the story, or ``None`` without prompts.

    The prompt is the step-0 entry of the story (so ``prompt`` + ``story="100=a city"`` works);
    image and noise prompts apply at every step.
    """
    from .prompts import PromptSchedule, image_prompts, parse_prompts

    extra = image_prompts(opts.get("image_prompts") or [])
    extra += parse_prompts(list(opts.get("noise_prompts") or []), kind="noise")
    prompt, story = opts.get("prompt"), opts.get("story")
    entries = story_entries(story) if story else {}
    if isinstance(prompt, str) and "^" in prompt:
        return caret_story(prompt, int(opts.get("change_prompt_every") or 0), extra, story)
    if opts.get("change_prompt_every"):
        raise ValueError("--change-prompt-every goes with '^'-separated story phrases in the prompt "
                         "('a sunflower ^ a rose'); without '^' drop it")
    if prompt:
        if 0 in entries:
            raise ValueError("both a prompt and a story entry for step 0 were given; drop one of them "
                             "(the prompt is the story's step 0)")
        entries[0] = parse_prompts(prompt)
    if not entries:
        entries = {0: []}
    elif 0 not in entries:
        raise ValueError(f"the story starts at step {min(entries)}; give the first prompt (positional) or "
                         "a '0=...' entry")
    entries = {step: list(prompts) + extra for step, prompts in sorted(entries.items())}
    if not any(entries.values()):
        return None
    for step, prompts in entries.items():
        if not prompts:
            raise ValueError(f"story step {step} has no prompts")
    return PromptSchedule(entries)


def caret_story(prompt: str, every: int, extra: list, story=None):
    """VQGAN-CLIP's story syntax as nerdyrodent's ``generate.py`` reads it (``-p "a|b:-1 ^ c" -cpe N``):
    phrase k applies from step k*N, and after the last phrase the story starts again (a periodic
    :class:`PromptSchedule`); image and noise prompts apply throughout."""
    from .prompts import PromptSchedule, parse_prompts

    if story:
        raise ValueError("give the story once: '^' phrases in the prompt (with --change-prompt-every) or --story")
    if every < 1:
        raise ValueError("'^' separates VQGAN-CLIP story phrases: add --change-prompt-every N to switch phrase "
                         "every N steps, or write the story as --story '0=a sunflower; 100=a rose'")
    phrases = [parse_prompts(phrase) for phrase in prompt.split("^")]
    return PromptSchedule({k * every: prompts + extra for k, prompts in enumerate(phrases)},
                          period=len(phrases) * every)


def clip_specs(opts: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(model, weight) of each guiding CLIP; ``[]`` for ``clip: none``."""
    from .encoders import parse_encoder_spec

    specs = [s for s in (opts.get("clip") or []) if s is not None]
    if any(is_none_word(s) for s in specs):
        return []
    return [parse_encoder_spec(str(s).strip()) for s in specs]


def augmentation_list(opts: Mapping[str, Any]) -> list[str]:
    items: list[str] = []
    for entry in opts.get("augmentations") or []:
        items += str(entry).replace(",", " ").split()
    if any(is_none_word(i) for i in items):
        return []
    return items


def load_encoders(names: list[str], *, device, precision) -> list:
    """CLIP encoders by name, loaded once per (name, device, precision) and kept in the model cache."""
    from .cache import cached
    from .encoders import load_encoder

    return [cached("encoder", (name, str(device), str(precision)),
                   lambda name=name: load_encoder(name, device=device, precision=precision)) for name in names]


def build_cutouts(opts: Mapping[str, Any]):
    from .cutouts import Cutouts

    return Cutouts(opts["cutouts"], cut_pow=opts["cut_pow"], num_overview=opts["overview"],
                   min_fraction=opts["min_fraction"], augmentations=augmentation_list(opts))


def reward_specs(opts: Mapping[str, Any]) -> list[dict]:
    """The ``rewards`` option parsed: ``[{"spec", "name", "model", "weight", "label"}]`` (labels unique:
    ``pickscore``, ``pickscore2``...). Bad names and weights fail here, before any model loads."""
    from .rewards import parse_reward_spec

    out, seen = [], {}
    for spec in opts.get("rewards") or []:
        if spec is None or is_none_word(spec):
            continue
        name, model, weight = parse_reward_spec(str(spec))
        seen[name] = seen.get(name, 0) + 1
        out.append({"spec": str(spec).strip(), "name": name, "model": model, "weight": weight,
                    "label": name if seen[name] == 1 else f"{name}{seen[name]}"})
    return out


def build_objective(opts: Mapping[str, Any], schedule, *, seed: int, device, precision):
    """The objective of a run: a ``CLIPLoss`` from the guidance options (``None`` for ``clip: none``),
    or, with ``rewards``, a ``WeightedObjectives`` of the CLIP loss (weight 1, named ``clip_loss``) and
    each reward (its weight times ``-score``, named after it); rewards share one resize per step."""
    from .clip_loss import CLIPLoss

    specs = clip_specs(opts)
    rewards = reward_specs(opts)
    if (not specs and not rewards) or schedule is None:
        return None
    clip_loss = None
    if specs:
        cutouts = build_cutouts(opts)   # bad cutout options fail before any model loads
        encoders = load_encoders([name for name, _ in specs], device=device, precision=precision)
        image_losses = {name: opts[f"{name}_weight"] for name in ("tv", "range", "saturation", "symmetry")
                        if opts.get(f"{name}_weight")}
        clip_loss = CLIPLoss(encoders, schedule, cutouts=cutouts, encoder_weights=[w for _, w in specs],
                             distance=opts["distance"], image_losses=image_losses, seed=seed)
    if not rewards:
        return clip_loss
    from .objective import WeightedObjectives
    from .rewards import SharedResize, cached_reward

    if not schedule.positive_text(0) and any(r["name"] != "aesthetic" for r in rewards):
        raise ValueError("the reward models score images against a text prompt; give one (positional)")
    resize = SharedResize()
    members, names = [], []
    if clip_loss is not None:
        members.append((clip_loss, 1.0))
        names.append("clip_loss")
    for r in rewards:
        model = cached_reward(f"{r['name']}:{r['model']}" if r["model"] else r["name"], device=device,
                              precision=precision)
        model.set_prompts(schedule)
        model.resize = resize
        model.gradient_checkpointing = bool(opts.get("reward_checkpointing"))
        members.append((model, r["weight"]))
        names.append(r["label"])
    return WeightedObjectives(members, names=names)


def eval_model_for(opts: Mapping[str, Any]) -> str | None:
    """The evaluation CLIP: as given, ``None`` for 'none', or a different CLIP from the guiding one."""
    value = opts.get("eval_model")
    if is_none_word(value):
        return None
    if str(value).strip().lower() != "auto":
        return str(value)
    guiding = [name for name, _ in clip_specs(opts)]
    return DEFAULT_EVAL_ALT if DEFAULT_EVAL in guiding else DEFAULT_EVAL


def scoring_caption(schedule, step: int) -> str:
    """The caption a run is scored against: its positive-weight text prompts active at *step*, joined
    with ", " ("" when there are none). ``scripts/evaluate.py`` reads the same caption back from run.json."""
    return "" if schedule is None else schedule.positive_text(step)


def score_images(images: torch.Tensor, schedule, *, model: str, step: int, device) -> dict[str, Any]:
    """CLIP score (torchmetrics definition, ``100*cos``) of *images* against :func:`scoring_caption`:
    ``{"clip_score" (the batch's score, mean clamped at 0), "per_image", "caption"}``."""
    from .score import clip_score

    caption = scoring_caption(schedule, step)
    if not caption:
        return {"clip_score": None, "per_image": [], "caption": None,
                "note": "no positive text prompt to score against"}
    scores = clip_score(images, caption, model=model, reduction="none", device=device).double().cpu()
    return {"clip_score": max(float(scores.mean()), 0.0), "per_image": scores.tolist(), "caption": caption,
            "definition": "torchmetrics (100*cos; mean clamped at 0) against the positive text prompts joined "
                          "with ', '"}


__all__ = ["DEFAULT_CLIP", "DEFAULT_EVAL", "DEFAULT_EVAL_ALT", "NONE_WORDS", "is_none_word", "build_schedule",
           "story_entries", "caret_story", "clip_specs", "augmentation_list", "load_encoders", "build_cutouts", "build_objective", "reward_specs",
           "eval_model_for", "score_images", "scoring_caption"]
