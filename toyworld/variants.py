"""The generator configurations compared on the toy world: the rows of the quality benchmark
(``benchmarks/quality.py``) and of the README's grid (``scripts/make_figures.py``), defined once here.

Each :class:`Variant` is a backend and the ``generators.runs.generate`` options that make it this
configuration, with the toy model folders (``toyworld/weights/<name>``) it needs. Pure data: nothing
here imports the generators.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    Variant("best-of-n+clip", "best-of-N noises, same renderer calls", "noise", {"method": "best-of-n"},
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
    Variant("noise+itm", "noise optimisation + toy ITM reward (ReNO)", "noise", {"rewards": ["itm:toy=1"]},
            _SD + ("itm",)),
    Variant("best-of-n+itm", "best-of-N noises, toy ITM verifier", "noise",
            {"method": "best-of-n", "rewards": ["itm:toy=1"]}, _SD + ("itm",)),
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
