"""The generator configurations compared on the toy world: the rows of the quality benchmark
(``benchmarks/quality.py``) and of the README's grid (``scripts/make_figures.py``), defined once here.

Each :class:`Variant` is a backend and the ``generators.runs.generate`` options that make it this
configuration, with the toy model folders (``toyworld/weights/<name>``) it needs. Pure data: nothing
here imports the generators.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .paths import WEIGHTS_DIR


@dataclass(frozen=True)
class Variant:
    """One generator configuration: a backend and the options that make it this variant."""

    name: str
    label: str
    backend: str
    options: dict = field(default_factory=dict)
    models: tuple[str, ...] = ()  # toy model folders it needs (toyworld/weights/<name>)
    composed_prompt: bool = False  # the prompt's objects as separate parts (composable prompts)


# The variants compared. Add a row here for a new backend or configuration.
VARIANTS: tuple[Variant, ...] = (
    Variant("vqgan+clip", "VQGAN+CLIP", "vqgan", {}, ("clip_a", "clip_c", "clip_d", "vqgan")),
    Variant("sd", "SD, no CLIP guidance", "sd", {"clip_guidance_scale": 0.0}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+clip", "SD + CLIP guidance", "sd", {}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("pixels+clip", "RGB pixels + CLIP (no prior)", "pixels", {}, ("clip_a", "clip_c", "clip_d")),
    Variant("fft-pixels+clip", "Fourier pixels + CLIP (no prior)", "pixels", {"parameterisation": "fft"},
            ("clip_a", "clip_c", "clip_d")),
    Variant("sd+dps", "SD + DPS", "sd", {"guider": "dps", "clip_guidance_scale": 1.0}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+mpgd", "SD + MPGD", "sd", {"guider": "mpgd", "clip_guidance_scale": 10.0},
            ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+freedom", "SD + FreeDoM", "sd", {"guider": "freedom", "clip_guidance_scale": 0.2},
            ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+ugd", "SD + Universal Guidance (2 backward steps)", "sd",
            {"guider": "ugd", "backward_steps": 2, "backward_lr": 1.0}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+tfg", "SD + TFG", "sd", {"guider": "tfg", "clip_guidance_scale": 5.0, "backward_steps": 2,
                                          "backward_lr": 10.0, "backward_schedule": "decreasing"},
            ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("noise+clip", "noise optimisation + CLIP (ReNO)", "noise", {}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("best-of-n+clip", "few-step model, best of 30 by CLIP", "noise", {"method": "best-of-n"},
            ("clip_a", "clip_c", "clip_d", "sd")),
)
_SD = ("clip_a", "clip_c", "clip_d", "sd")
VARIANTS += (
    Variant("sd+ae", "SD + Attend-and-Excite", "sd", {"clip_guidance_scale": 0.0, "attend_excite": True}, _SD),
    Variant("sd+layout", "SD + layout guidance (boxes from the prompt)", "sd",
            {"clip_guidance_scale": 0.0, "layout": "auto"}, _SD),
    Variant("sd+ae+layout", "SD + Attend-and-Excite + layout guidance", "sd",
            {"clip_guidance_scale": 0.0, "attend_excite": True, "layout": "auto"}, _SD),
    Variant("sd+composable", "SD, composable prompts (a part per object)", "sd",
            {"clip_guidance_scale": 0.0, "composable": True}, _SD, composed_prompt=True),
    # the noise rows' own baseline: their renderer (the few-step model) on the seed's noise, nothing steered
    Variant("turbo", "few-step model, one noise (no steering)", "noise",
            {"method": "best-of-n", "budget": 1}, _SD),
    Variant("noise+itm", "noise optimisation + CLIP + ITM (ReNO)", "noise", {"rewards": ["itm:toy=1"]},
            _SD + ("itm",)),
    Variant("best-of-n+itm", "few-step model, best of 30 by CLIP + ITM", "noise",
            {"method": "best-of-n", "rewards": ["itm:toy=1"]}, _SD + ("itm",)),
)
# Search through the toy SD itself rather than its few-step student (the noise backend with the SD as renderer):
# each noise rendered with 4 DDIM steps and CFG 5 (the backend's renderer when no few-step model exists), the best
# of 30 kept; or with 10 steps, the best of 10 (as many sampler steps as three 30-step images), of 30 or of 60
# (60 did better than 30 on the tuning set: docs/benchmarks.md)
_SD4 = {"sd_model": str(WEIGHTS_DIR / "sd"), "render_steps": 4, "scheduler": "ddim", "cfg_scale": 5.0}
VARIANTS += (
    Variant("sd4", "SD 4 steps, one noise (no steering)", "noise",
            {**_SD4, "method": "best-of-n", "budget": 1}, _SD),
    Variant("sd4+best-of-n+itm", "SD 4 steps, best of 30 by CLIP + ITM", "noise",
            {**_SD4, "method": "best-of-n", "rewards": ["itm:toy=1"]}, _SD + ("itm",)),
    Variant("sd10", "SD 10 steps, one noise (no steering)", "noise",
            {**_SD4, "render_steps": 10, "method": "best-of-n", "budget": 1}, _SD),
    Variant("sd10+best-of-10+clip", "SD 10 steps, best of 10 by CLIP", "noise",
            {**_SD4, "render_steps": 10, "method": "best-of-n", "budget": 10}, _SD),
    Variant("sd10+best-of-10+itm", "SD 10 steps, best of 10 by CLIP + ITM",
            "noise", {**_SD4, "render_steps": 10, "method": "best-of-n", "budget": 10, "rewards": ["itm:toy=1"]},
            _SD + ("itm",)),
    Variant("sd10+best-of-30+itm", "SD 10 steps, best of 30 by CLIP + ITM",
            "noise", {**_SD4, "render_steps": 10, "method": "best-of-n", "budget": 30, "rewards": ["itm:toy=1"]},
            _SD + ("itm",)),
    Variant("sd10+best-of-60+itm", "SD 10 steps, best of 60 by CLIP + ITM",
            "noise", {**_SD4, "render_steps": 10, "method": "best-of-n", "budget": 60, "rewards": ["itm:toy=1"]},
            _SD + ("itm",)),
)
# The same searches with the ITM averaged over eight mirrored and shifted views of each candidate
# (guidance/rewards/itm_views.py; chosen over the single view on the tuning set: docs/benchmarks.md)
VARIANTS += tuple(
    Variant(f"sd10+best-of-{n}+itm-views", f"SD 10 steps, best of {n} by CLIP + ITM over 8 views", "noise",
            {**_SD4, "render_steps": 10, "method": "best-of-n", "budget": n, "rewards": ["itm_views:toy=1"]},
            _SD + ("itm",)) for n in (30, 60))
# Layout sketch (generators/diffusion/layout_sketch.py): start from the prompt's layout painted as colour blobs
# (SDEdit), strength 0.7 (chosen on the tuning set: docs/benchmarks.md, "Layout sketch"); a prompt with one
# subject (single, counting) has no layout and samples from noise as its row without the sketch
_SKETCH = {"layout_sketch": "auto", "strength": 0.7}
VARIANTS += (
    Variant("sd+sketch", "SD + layout sketch (img2img from the prompt's layout)", "sd",
            {"clip_guidance_scale": 0.0, **_SKETCH}, _SD),
    Variant("sd10+sketch", "SD 10 steps from the layout sketch, one noise (no steering)", "noise",
            {**_SD4, "render_steps": 10, "method": "best-of-n", "budget": 1, **_SKETCH}, _SD),
    *(Variant(f"sd10+sketch+best-of-{n}+itm", f"SD 10 steps from the layout sketch, best of {n} by CLIP + ITM", "noise",
              {**_SD4, "render_steps": 10, "method": "best-of-n", "budget": n, "rewards": ["itm:toy=1"], **_SKETCH},
              _SD + ("itm",)) for n in (30, 10)),
)
# Issue 35: what half precision costs in quality. The toy preset keeps fp32 even under ``--precision auto``
# (tiny models run no faster in bf16), so these rows force bf16: what ``auto`` picks for real models on GPUs
# and on CPUs with AMX or AVX-512 BF16. Each is its fp32 row with the run option precision="bf16".
BF16_OF = ("vqgan+clip", "sd+clip", "noise+clip")
VARIANTS += tuple(Variant(f"{v.name}@bf16", f"{v.label}, bf16", v.backend, {**v.options, "precision": "bf16"},
                          v.models, v.composed_prompt) for name in BF16_OF for v in VARIANTS if v.name == name)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


def variant(name: str) -> Variant:
    """The row of :data:`VARIANTS` called *name*."""
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no variant {name!r}; choose from {', '.join(VARIANT_NAMES)}")


def composed_text(prompt) -> str:
    """A two-object world prompt as one part per object, each on the background, joined by `` AND ``
    (A1111's composable syntax); other prompts unchanged."""
    from .prompts import articles

    if prompt.category not in ("two_object", "colour_attr"):
        return prompt.text
    return " AND ".join(articles(f"a {colour + ' ' if colour else ''}{shape} on a {prompt.background} background")
                        for colour, shape in prompt.objects)


__all__ = ["Variant", "VARIANTS", "VARIANT_NAMES", "BF16_OF", "variant", "composed_text"]
