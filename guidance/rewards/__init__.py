"""Human-preference reward models as objectives (to steer by) and as metrics (to judge by).

Each reward is a :class:`Reward` (an :class:`~guidance.objective.Objective`): ``score(images,
prompts)`` is higher-is-better and differentiable in images ``[B,3,H,W]`` in ``[0,1]``; as an
objective its loss is ``-score`` and an ensemble weight multiplies it. ``score_reference`` is the
metric form, with each model's reference preprocessing on 8-bit PIL images.

    >>> from guidance.rewards import load_reward            # doctest: +SKIP
    >>> pick = load_reward("pickscore")                     # yuvalkirstain/PickScore_v1
    >>> pick.score(images, "a red fox in the snow")         # [B], differentiable

Specs (``--reward`` and ``--metric``) are ``NAME[:MODEL][=WEIGHT]``: ``pickscore=0.05``,
``hps:v2=5``, ``imagereward``, ``aesthetic:/models/mlp.pth``, ``clip:openai/clip-vit-base-patch32=0.01``.
"""

from __future__ import annotations

import math


from .aesthetic import AestheticPredictor
from .base import Reward, RewardLoadError, SharedResize, load_state_dict, resize_crop
from .hps import HPSv2
from .imagereward import ImageReward
from .itm import ITMReward
from .itm_views import ITMViews
from .pickscore import CLIPReward, PickScore

REWARDS: dict[str, type[Reward]] = {}
ALIASES = {"hpsv2": "hps", "hpsv2.1": "hps", "image_reward": "imagereward", "image-reward": "imagereward",
           "laion_aesthetic": "aesthetic", "aesthetics": "aesthetic", "pick": "pickscore", "itm-views": "itm_views"}
#: weight of each reward when ``=W`` is not given: ReNO's defaults (Eyring et al. 2024) for CLIP,
#: PickScore, HPSv2.1 and ImageReward; the aesthetic weight is this project's choice (ReNO leaves
#: it off by default): 0.1 makes one rating point weigh like 0.1 ImageReward standard deviations; the ITM
#: log-odds (this project's addition) weigh 1, and so does their mean over views.
DEFAULT_WEIGHTS = {"clip": 0.01, "pickscore": 0.05, "hps": 5.0, "imagereward": 1.0, "aesthetic": 0.1, "itm": 1.0,
                   "itm_views": 1.0}


def register_reward(name: str, cls: type[Reward], *, default_weight: float = 1.0) -> None:
    """Make *cls* (a :class:`Reward` with a ``load(model, *, device, precision, ...)`` classmethod)
    available as ``--reward NAME`` and ``--metric NAME``."""
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise TypeError(f"{cls!r} is not a guidance.rewards.Reward subclass")
    REWARDS[name] = cls
    DEFAULT_WEIGHTS.setdefault(name, float(default_weight))


for _name, _cls in (("clip", CLIPReward), ("pickscore", PickScore), ("hps", HPSv2), ("imagereward", ImageReward),
                    ("aesthetic", AestheticPredictor), ("itm", ITMReward),
                    ("itm_views", ITMViews)):
    register_reward(_name, _cls)


def reward_class(name: str) -> type[Reward]:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))}")
    return REWARDS[key]


def parse_reward_spec(spec: str) -> tuple[str, str | None, float]:
    """``NAME[:MODEL][=WEIGHT]`` -> (registered name, model or None, weight). One-line errors for an
    unknown name or a weight that is not a finite number; the default weight is ``DEFAULT_WEIGHTS``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty reward; write NAME[:MODEL][=WEIGHT], e.g. pickscore=0.05")
    text = spec.strip()
    weight: float | None = None
    head, sep, tail = text.rpartition("=")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            raise ValueError(f"reward {spec!r}: weight {tail!r} is not a number; write NAME[:MODEL]=WEIGHT, "
                             "e.g. hps=5") from None
        if not math.isfinite(weight):
            raise ValueError(f"reward {spec!r}: weight {tail!r} is not finite")
        text = head
    name, _, model = text.partition(":")
    cls = reward_class(name)
    key = next(k for k, v in REWARDS.items() if v is cls)
    return key, (model.strip() or None), (DEFAULT_WEIGHTS.get(key, 1.0) if weight is None else weight)


def load_reward(spec: str, *, device=None, precision=None, prompts=None, gradient_checkpointing: bool = False,
                resize: SharedResize | None = None) -> Reward:
    """A reward from ``NAME[:MODEL]`` (any ``=WEIGHT`` is ignored here), on *device* at *precision*."""
    name, model, _ = parse_reward_spec(spec)
    reward = REWARDS[name].load(model, device=device, precision=precision,
                                gradient_checkpointing=gradient_checkpointing, resize=resize)
    if prompts is not None:
        reward.set_prompts(prompts)
    return reward


def cached_reward(spec: str, *, device=None, precision=None) -> Reward:
    """:func:`load_reward` through the one model cache (kind ``"reward"``); prompts are set by the caller."""
    from ..cache import cached
    from ..runtime import resolve_device

    name, model, _ = parse_reward_spec(spec)
    key = (name, model, str(resolve_device(device)), str(precision or "fp32"))
    return cached("reward", key, lambda: load_reward(f"{name}:{model}" if model else name, device=device,
                                                     precision=precision))


__all__ = ["Reward", "RewardLoadError", "SharedResize", "REWARDS", "DEFAULT_WEIGHTS", "register_reward",
           "reward_class", "parse_reward_spec", "load_reward", "cached_reward", "CLIPReward",
           "PickScore", "HPSv2", "ImageReward", "AestheticPredictor", "ITMReward", "ITMViews", "load_state_dict", "resize_crop"]

